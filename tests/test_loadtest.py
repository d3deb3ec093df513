"""transerve-loadtest against a real server on loopback: bounded, self-stopping, with real outputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ServerProcess, running_server
from PIL import Image


def loadtest(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "transerve_client.loadtest", "--url", server.address,
                           "--warmup", "3", *args], capture_output=True, text=True, timeout=120)


def test_closed_loop_sweep_writes_json_csv_and_a_real_plot(server: ServerProcess, tmp_path: Path) -> None:
    out = loadtest(server, "--task", "classify", "--concurrency", "1,2,4", "--requests", "60",
                   "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"),
                   "--plot", str(tmp_path / "r.png"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["throughput_rps"] > 0 and set(report["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert report["errors"] == {} and [s["load"] for s in report["steps"]] == [1, 2, 4]
    assert all(s["requests"] == 60 for s in report["steps"])
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [int(float(r["load"])) for r in rows] == [1, 2, 4]
    image = np.asarray(Image.open(tmp_path / "r.png").convert("L"), dtype=np.float32)
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert image.std() > 10  # axes, lines and labels: not a blank canvas


def test_open_loop_translate_reports_tokens(server: ServerProcess, tmp_path: Path) -> None:
    out = loadtest(server, "--task", "translate", "--rate", "50", "--requests", "40",
                   "--json", str(tmp_path / "t.json"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["steps"][0]["mode"] == "open" and report["steps"][0]["requests"] == 40
    assert report["tokens_per_s"] > 0


def test_errors_are_counted_by_status(server: ServerProcess, tmp_path: Path) -> None:
    out = loadtest(server, "--task", "translate", "--model", "nope", "--concurrency", "2", "--requests", "10",
                   "--warmup", "0", "--json", str(tmp_path / "e.json"))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "e.json").read_text())["errors"] == {"NOT_FOUND": 10}


def test_infer_task_shapes_payload_from_metadata(server: ServerProcess, tmp_path: Path) -> None:
    out = loadtest(server, "--task", "infer", "--model", "tiny-vit", "--batch", "4", "--concurrency", "2",
                   "--requests", "20", "--json", str(tmp_path / "i.json"))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "i.json").read_text())["errors"] == {}


@pytest.mark.parametrize("url", ["10.1.2.3:8001", "example.com:8001"])
def test_refuses_remote_targets(url: str) -> None:
    out = subprocess.run([sys.executable, "-m", "transerve_client.loadtest", "--url", url, "--requests", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--allow-remote" in out.stderr


def test_streamed_translation_with_mixed_budgets_reports_first_token(long_repo: Path, tmp_path: Path) -> None:
    # its translator never stops early: output length = the drawn budget
    with running_server(long_repo) as server:
        out = loadtest(server, "--task", "translate", "--stream", "--max-new-tokens", "3:9", "--concurrency", "2",
                       "--requests", "20", "--json", str(tmp_path / "s.json"))
        assert out.returncode == 0, out.stderr
        step = json.loads((tmp_path / "s.json").read_text())["steps"][0]
        ttft = step["extra"]["time_to_first_token_ms"]
        assert step["errors"] == {} and 0 < ttft["p50"] <= step["latency_ms"]["p50"]
        tokens = round(step["tokens_per_s"] * step["seconds"])
        assert 3 * 20 <= tokens <= 9 * 20 and tokens not in (3 * 20, 9 * 20)  # budgets drawn from 3..9
        bad = loadtest(server, "--task", "translate", "--max-new-tokens", "9:3")
        assert bad.returncode == 2 and "LO <= HI" in bad.stderr
