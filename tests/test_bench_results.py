"""bench/RESULTS.md bookkeeping: a script rewrites its own section where it stands."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from export_bench import write_section


def headings(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("## ")]


def test_a_rerun_section_keeps_its_place_and_a_new_one_goes_last(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "RESULTS.md"
    monkeypatch.delenv("TRANSERVE_BENCH_RESULTS", raising=False)
    for name in ("A", "B", "C"):
        write_section(path, f"## {name}:", f"## {name}: table\n\nCPU: x\n\n| {name} first |\n")
    write_section(path, "## B:", "## B: table\n\nCPU: y\n\n| B again |\n")
    write_section(path, "## D:", "## D: table\n\nCPU: z\n\n| D |\n")
    text = path.read_text()
    assert headings(path) == ["## A: table", "## B: table", "## C: table", "## D: table"]
    assert "| B again |" in text and "| B first |" not in text and text.count("| A first |") == 1
    assert text.startswith("# Benchmark results") and text.endswith("| D |\n")
