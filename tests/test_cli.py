"""The command line explains itself."""

from __future__ import annotations

from pathlib import Path

from transerve import __version__
from transerve.cli import app
from typer.testing import CliRunner

runner = CliRunner()


def test_top_level_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("zoo", "checkpoint"):
        assert command in result.output


def test_zoo_build_help_explains_each_option() -> None:
    result = runner.invoke(app, ["zoo", "build", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option, words in {"--out": "zoo_report.json", "--force": "Retrain", "--only": "vit-digits-bn",
                          "--threads": "threads"}.items():
        assert option in result.output and words in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_unknown_zoo_model_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["zoo", "build", "--out", str(tmp_path), "--only", "gpt-5"])
    assert result.exit_code == 2
    assert "unknown zoo model" in result.output and "gpt-5" in result.output
