"""The house rules hold, and each one fails when broken.

The import contracts (pyproject.toml, ``[tool.importlinter]``) are checked by ``make lint`` over the package
assembled as installed (tools/package_tree.py); here each contract is shown to catch the import it forbids,
planted in a copy of the sources. File length and function complexity are held to the limits ``make lint``
and the style guide set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import PROJECT
from radon.complexity import cc_rank
from radon.visitors import ComplexityVisitor

sys.path.insert(0, str(PROJECT / "tools"))
import package_tree

PACKAGE_FOLDERS = ("common", "cli", "models", "export", "server")
MAX_LINES = 400


def planted(tmp_path: Path, module: str, line: str) -> str:
    """lint-imports' report over the sources with ``line`` appended to ``module`` (a dotted name)."""
    tree = package_tree.assemble(tmp_path)
    path = tree.joinpath(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + f"\n{line}\n")
    result = package_tree.run_check("imports", tree)
    assert result.returncode != 0, result.stdout  # broken contracts fail make lint
    return result.stdout


def test_the_contracts_hold(tmp_path: Path) -> None:
    result = package_tree.run_check("imports", package_tree.assemble(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("transerve.server.backends.cpu", "from transerve.server.edge import rpc", "server wings"),
    ("transerve.server.engine.batching", "from transerve.server.edge.request_log import RequestInfo", "server wings"),
    ("transerve.server.exceptions", "from transerve.server.engine import metrics", "server wings"),
    ("transerve.server.engine.manager", "import torch", "lean runtime"),
    ("transerve.server.edge.rest", "from transerve.models import vit", "lean runtime"),
    ("transerve.server.app", "from transerve.export import exporter", "lean runtime"),
    ("transerve.search", "from transerve.server import exceptions", "what both sides share"),
    ("transerve_client.codec", "import transerve", "transerve-client is its own distribution"),
    ("transerve.models.vit", "from transerve.export import graphs", "offline side"),
    ("transerve.server.backends.sessions", "from transerve.server.backends import tensorrt_runner",
     "each backend stands alone"),
    ("transerve.server.edge.task_service", "from transerve.server.edge import kserve_service",
     "the task API and KServe services"),
], ids=lambda value: value.split()[-1] if " " in value else value)
def test_a_planted_import_breaks_its_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    report = planted(tmp_path, module, line)
    broken = report[report.index("Broken contracts"):] if "Broken contracts" in report else report
    assert contract in " ".join(broken.split()), report


def package_files() -> list[Path]:
    return sorted(p for folder in PACKAGE_FOLDERS for p in (PROJECT / folder).rglob("*.py"))


def test_no_package_file_is_over_the_limit() -> None:
    files = package_files()
    assert len(files) > 80  # the walk found the packages
    long = {str(p.relative_to(PROJECT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_no_function_is_worse_than_c() -> None:
    """radon's rank counts boolean operators as branches (ruff's C901 does not); D starts at 21."""
    blocks = [(p, block) for p in package_files() for block in ComplexityVisitor.from_code(p.read_text()).blocks]
    assert any(cc_rank(block.complexity) == "C" for _, block in blocks)  # methods and functions are all seen
    worse = [f"{p.relative_to(PROJECT)}:{block.lineno} {block.name} {cc_rank(block.complexity)}"
             for p, block in blocks if cc_rank(block.complexity) > "C"]
    assert not worse, worse
