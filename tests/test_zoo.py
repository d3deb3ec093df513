"""The demo zoo meets its thresholds, and a second build is served from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transerve.cli import app
from transerve.models.checkpoint import load_checkpoint
from transerve.models.translator import TextTranslator
from typer.testing import CliRunner


@pytest.mark.slow
def test_zoo_thresholds(zoo_dir: Path) -> None:
    report = json.loads((zoo_dir / "zoo_report.json").read_text())["models"]
    assert report["vit-digits"]["test_accuracy"] >= 0.97
    assert report["vit-digits-bn"]["test_accuracy"] >= 0.97
    assert report["mt-en-de-numbers"]["exact_match"] >= 0.95
    assert report["mt-en-de-numbers"]["bleu"] > 90
    for entry in report.values():
        assert entry["train_seconds"] > 0 and entry["parameters"] > 0 and entry["checkpoint_bytes"] > 0


@pytest.mark.slow
def test_zoo_checkpoints_load_and_translate(zoo_dir: Path) -> None:
    translator = TextTranslator.load(zoo_dir / "mt-en-de-numbers")
    assert translator.translate(["three hundred and forty-two"]) == ["dreihundertzweiundvierzig"]
    _model, extra = load_checkpoint(zoo_dir / "vit-digits-bn")
    assert extra["report"]["labels"] == [str(d) for d in range(10)]


@pytest.mark.slow
def test_second_build_is_cached(zoo_dir: Path) -> None:
    weights = sorted(zoo_dir.glob("*/model.safetensors"))
    before = {w: w.stat().st_mtime_ns for w in weights}
    result = CliRunner().invoke(app, ["zoo", "build", "--out", str(zoo_dir)])
    assert result.exit_code == 0
    assert len(weights) == 3 and {w: w.stat().st_mtime_ns for w in weights} == before  # nothing retrained
    report = json.loads((zoo_dir / "zoo_report.json").read_text())["models"]
    assert all(entry["cached"] for entry in report.values())


@pytest.mark.slow
def test_zoo_exports_to_a_verified_repository(zoo_dir: Path, zoo_repo: Path) -> None:
    from transerve.export.zoo import export_zoo

    reports = {name: json.loads((zoo_repo / name / "1" / "export_report.json").read_text())
               for name in ("vit-digits", "vit-digits-bn", "mt-en-de-numbers")}
    zoo = json.loads((zoo_dir / "zoo_report.json").read_text())["models"]
    assert reports["vit-digits-bn"]["op_counts_before"]["model"]["BatchNormalization"] > 0
    for name, report in reports.items():
        assert all(c.get("BatchNormalization", 0) == 0 for c in report["op_counts_after"].values()), name
        attention = report["attention"]
        blocks = [attention] if "fused" in attention else list(attention.values())
        assert all(b["fused"] == b["expected"] > 0 for b in blocks), name
        assert report["parity"]["max_abs_diff"] <= 1e-4, name
        metric = "test_accuracy" if name.startswith("vit") else "exact_match"
        assert abs(report["accuracy"]["onnx"] - zoo[name][metric]) <= 0.005, name
    assert reports["mt-en-de-numbers"]["parity"]["tokens_equal"] is True
    assert reports["vit-digits"]["variants"]["int8"]["accuracy"] >= zoo["vit-digits"]["test_accuracy"] - 0.01
    again = export_zoo(zoo_dir, zoo_repo, on_status=lambda m: None)  # current entries are kept
    assert again["vit-digits"]["export_seconds"] == reports["vit-digits"]["export_seconds"]
