"""Every benchmark script runs: one tiny iteration each, so that none can rot between `make bench` runs.

``TRANSERVE_BENCH_SMOKE=1`` makes the opus-mt-shaped translator tiny (bench/opus_model.py) and
``TRANSERVE_BENCH_RESULTS`` sends each script's section (and plots) to a file of the test's, so the measured
figures in bench/RESULTS.md are never overwritten. What must hold: exit 0, and the section written under the
script's heading with the machine or command line beside it. Speed is not judged here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# script → (arguments, the heading its section starts with); {zoo}, {repo}, {work} filled in per run
SCRIPTS: dict[str, tuple[list[str], str]] = {
    "export_bench.py": (["--quick", "--repeats", "1"], "## Export:"),
    "precision_bench.py": (["--quick"], ""),  # --quick prints its table and writes nothing
    "roofline.py": (["--repeats", "1"], "## Roofline"),
    "fusion_bench.py": (["--zoo", "{zoo}", "--repeats", "1"], "## Fusion"),
    "server_bench.py": (["--repo", "{repo}", "--seconds", "0.5", "--repeats", "1"], "## Server"),
    "loadtest_bench.py": (["--repo", "{repo}", "--duration", "0.5"], "## Load generator"),
    "ct2_bench.py": (["--work", "{work}", "--repeats", "1"], "## Offline decode loop vs CTranslate2"),
    "int8_format_bench.py": (["--work", "{work}", "--repeats", "1"], "## int8 forms"),
    "continuous_bench.py": (["--work", "{work}", "--seconds", "1", "--rates", "4", "--ttft-rates", "4",
                             "--repeats", "1"], "## Continuous batching"),
    "memory_bench.py": (["--zoo-repo", "{repo}", "--work", "{work}", "--repeats", "1", "--requests", "20"],
                        "## Memory"),
    "peers_bench.py": (["--repo", "{repo}", "--work", "{work}", "--repeats", "1", "--seconds", "0.5"],
                       "## Serving peers"),  # installs MLServer, PyTriton and tritonclient into their own venvs
    "rest_bench.py": (["--repo", "{repo}", "--repeats", "1", "--seconds", "0.5"], "## REST vs gRPC"),
    "scaling_bench.py": (["--repo", "{repo}", "--duration", "1", "--repeats", "1"], "## Scale-out"),
    "image_bench.py": (["--quick", "--seconds", "0.5", "--repeats", "1"], "## Image path"),
    "sentence_splitters.py": (["--repeats", "1"], "## Sentence splitters"),
    "document_bench.py": (["--work", "{work}", "--repeats", "1", "--budget", "4"], "## Document translation"),
    "glossary_bench.py": (["--repo", "{repo}", "--work", "{work}", "--repeats", "1", "--budget", "4"],
                          "## Glossaries, scores and alignments"),
    "language_detection_bench.py": (["--sentences", "3", "--repeats", "1"], "## Language detection candidates"),
    "language_routing_bench.py": (["--work", "{work}", "--seconds", "1", "--clients", "2", "--cold-starts", "1",
                                   "--repeats", "1"], "## Language routing and lazy loading"),
}


def test_every_script_is_covered() -> None:
    helpers = {"opus_model.py", "reliability_report.py"}  # a model builder; the report has its own test below
    assert {p.name for p in BENCH.glob("*.py")} - helpers == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_runs_one_tiny_iteration(script: str, zoo_dir: Path, zoo_repo: Path,
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.getbasetemp() / "bench-work"  # the tiny opus model, built once for three scripts
    results = tmp_path_factory.mktemp("results") / "RESULTS.md"
    arguments, heading = SCRIPTS[script]
    filled = [a.format(zoo=zoo_dir, repo=zoo_repo, work=work) for a in arguments]
    env = {**os.environ, "TRANSERVE_BENCH_SMOKE": "1", "TRANSERVE_BENCH_RESULTS": str(results)}
    done = subprocess.run([sys.executable, str(BENCH / script), *filled], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    if heading:
        text = results.read_text()
        assert f"\n{heading}" in text or text.startswith(heading), text[:500]
        assert "Command: `python" in text or "CPU:" in text, text[:500]
    else:
        assert "CPU:" in done.stdout and "| model |" in done.stdout, done.stdout[-2000:]


def test_reliability_report_writes_its_section(tmp_path: Path) -> None:
    figures, out = tmp_path / "figures.jsonl", tmp_path / "RELIABILITY.md"
    figures.write_text(json.dumps({"test": "smoke.example", "time": "now", "sent": 3}) + "\n")
    shutil.copy(ROOT / "RELIABILITY.md", out)
    done = subprocess.run([sys.executable, str(BENCH / "reliability_report.py"), "--figures", str(figures),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| `smoke.example` (now) | sent: 3 |" in out.read_text()
