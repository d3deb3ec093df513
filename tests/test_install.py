"""The package as users install it: not editable, from wheels, used from the project root.

An editable install hides what a wheel shows: the import name must resolve to the installed modules from any
working directory — above all from the project root, where a top-level folder named like the package would
shadow it (the bug this guards: ``import transerve.server.app`` failed there, and so did Ray's build task).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import PROJECT


@pytest.mark.slow
def test_the_installed_package_imports_from_the_project_root(installed_python: Path) -> None:
    probe = ("import transerve, transerve.server.app, transerve.cli, transerve.server.edge.ray_serve\n"
             "import transerve_client\n"
             "for m in (transerve, transerve.server.app, transerve.cli, transerve_client):\n"
             "    print(m.__file__)\n")
    result = subprocess.run([str(installed_python), "-c", probe], cwd=PROJECT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    site = installed_python.parent.parent
    files = [Path(line) for line in result.stdout.split()]
    assert len(files) == 4 and all(site in f.parents for f in files), files  # the install's, not the checkout's


@pytest.mark.slow
def test_the_installed_command_runs_from_the_project_root(installed_python: Path) -> None:
    command = installed_python.parent / "transerve"
    result = subprocess.run([str(command), "--help"], cwd=PROJECT, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout and "export" in result.stdout


def test_no_top_level_folder_is_named_after_an_import_package() -> None:
    """A folder at the root named like a package (``transerve/``, ``transerve_client/``) shadows the install."""
    shadowing = {"transerve", "transerve_client"} & {p.name for p in PROJECT.iterdir() if p.is_dir()}
    assert not shadowing
