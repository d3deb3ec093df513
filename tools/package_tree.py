"""Run the checks that need the package as an install lays it out: the import contracts and the type check.

transerve's subpackages live in their own top-level folders (``package-dir`` in pyproject.toml maps
``transerve.server`` → ``server/``, the root package → ``common/``, …). import-linter (through grimp) finds a
package by walking its root's folder, and mypy resolves ``transerve.server…`` only where that folder sits under
``transerve/``; neither can follow an editable install's import hook. So this assembles a throwaway copy of the
sources as ``transerve/…`` (from ``package-dir`` itself, so it never drifts), runs the tool over it, and
prints its findings with the paths of this checkout.

    python tools/package_tree.py imports      # make lint: lint-imports with the contracts in pyproject.toml
    python tools/package_tree.py types        # make typecheck: mypy -p transerve -p transerve_client
    python tools/package_tree.py imports --keep DIR   # keep the assembled tree in DIR (to look, or to plant)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
CLIENT_PACKAGE = ("transerve_client", "clients/transerve_client")


def package_dirs(project: Path = PROJECT) -> dict[str, str]:
    """Import name → folder, as setuptools reads them, plus the client distribution's packages."""
    config = tomllib.loads((project / "pyproject.toml").read_text())
    dirs = dict(config["tool"]["setuptools"]["package-dir"])
    dirs[CLIENT_PACKAGE[0]] = CLIENT_PACKAGE[1]
    dirs[f"{CLIENT_PACKAGE[0]}._proto"] = f"{CLIENT_PACKAGE[1]}/_proto"  # generated stubs
    return dirs


def assemble(dest: Path, project: Path = PROJECT) -> Path:
    """Copy every package's sources and stubs to where an install puts them (``dest/transerve/server/…``)."""
    for name, folder in package_dirs(project).items():
        target = dest.joinpath(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in [*(project / folder).glob("*.py"), *(project / folder).glob("*.pyi")]:
            shutil.copy2(source, target / source.name)
    return dest


def checkout_paths(text: str, tree: Path, project: Path = PROJECT) -> str:
    """The tool's output with the assembled tree's paths turned back into this checkout's."""
    text = text.replace(f"{tree}/", "")
    for name, folder in sorted(package_dirs(project).items(), key=lambda item: -len(item[0])):
        text = text.replace(name.replace(".", "/") + "/", folder + "/")
    return text


def command(check: str, project: Path = PROJECT) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if check == "imports":
        return [str(bin_dir / "lint-imports"), str(project / "pyproject.toml"), "--no-cache", "--no-logo"]
    return [str(bin_dir / "mypy"), "--config-file", str(project / "pyproject.toml"), "--no-incremental",
            "-p", "transerve", "-p", CLIENT_PACKAGE[0]]


def run_check(check: str, tree: Path, project: Path = PROJECT) -> subprocess.CompletedProcess[str]:
    """``check`` (imports | types) over an assembled tree, the tree first on the import path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(command(check, project), cwd=tree, env=env, capture_output=True, text=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["imports", "types"])
    parser.add_argument("--keep", type=Path, help="assemble into this folder and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="transerve-tree-") as scratch:
        tree = assemble(args.keep or Path(scratch))
        result = run_check(args.check, tree)
    print(checkout_paths(result.stdout, tree), end="")
    print(checkout_paths(result.stderr, tree), end="", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
