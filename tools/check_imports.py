"""Check the import contracts in pyproject.toml (``[tool.importlinter]``) with import-linter.

import-linter (through grimp) finds a package by walking the folder of its root package, but transerve's
subpackages live in their own top-level folders (``package-dir`` in pyproject.toml maps ``transerve.server`` →
``server/`` and so on). So this assembles the package as an install would lay it out — a throwaway copy of
the sources, built from ``package-dir`` itself so it never drifts — and runs ``lint-imports`` over that copy.

    python tools/check_imports.py            # what `make lint` runs; exit status is lint-imports'
    python tools/check_imports.py --keep DIR # leave the assembled tree in DIR (to look at, or to plant a change)
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
    """Import name → folder, as setuptools reads them, plus the client distribution's package."""
    config = tomllib.loads((project / "pyproject.toml").read_text())
    dirs = dict(config["tool"]["setuptools"]["package-dir"])
    dirs[CLIENT_PACKAGE[0]] = CLIENT_PACKAGE[1]
    return dirs


def assemble(dest: Path, project: Path = PROJECT) -> Path:
    """Copy every package's ``.py`` files to where an install puts them (``transerve/server/...``) under ``dest``."""
    for name, folder in package_dirs(project).items():
        target = dest.joinpath(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in (project / folder).glob("*.py"):
            shutil.copy2(source, target / source.name)
    for proto in (project / CLIENT_PACKAGE[1] / "_proto").glob("*.py"):  # generated stubs: a package of their own
        (dest / CLIENT_PACKAGE[0] / "_proto").mkdir(exist_ok=True)
        shutil.copy2(proto, dest / CLIENT_PACKAGE[0] / "_proto" / proto.name)
    return dest


def lint_imports(tree: Path, project: Path = PROJECT) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with the project's contracts over an assembled tree (that tree first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [str(Path(sys.executable).parent / "lint-imports"), str(project / "pyproject.toml"), "--no-cache",
               "--no-logo"]
    return subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="assemble into this folder and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="transerve-imports-") as scratch:
        tree = assemble(args.keep or Path(scratch))
        result = lint_imports(tree)
    print(result.stdout, end="")
    print(result.stderr, end="", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
