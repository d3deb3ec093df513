"""Can one load-test process drive the server hard enough? transerve-loadtest against the trivial RPC.

Usage: ``python bench/loadtest_bench.py [--repo repo] [--duration 5]``. The trivial request is KServe
``ServerLive`` (no model work), so the figure is the load generator's and gRPC's own ceiling — the server and
the single load-test process share the machine's 2 cores. Writes its section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import command_line, markdown, write_section
from server_bench import start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("repo"))
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    process, address = start(args.repo)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "live.json"
            subprocess.run([sys.executable, "-m", "transerve_client.loadtest", "--url", address, "--task", "live",
                            "--concurrency", "1,8,32,64", "--duration", str(args.duration), "--json", str(out)],
                           check=True)
            steps = json.loads(out.read_text())["steps"]
    finally:
        process.terminate()
        process.wait(60)
    rows = [{"concurrency": int(s["load"]), "requests/s": round(s["throughput_rps"]),
             "p50 ms": round(s["latency_ms"]["p50"], 2), "p99 ms": round(s["latency_ms"]["p99"], 2),
             "errors": sum(s["errors"].values())} for s in steps]
    best = max(r["requests/s"] for r in rows)
    table = markdown(rows)
    print(table)
    write_section(Path(__file__).with_name("RESULTS.md"), "## Load generator",
                  f"## Load generator: one transerve-loadtest process, trivial requests (ServerLive)\n\n"
                  f"{command_line()}\n\nPeak {best} requests/s "
                  f"(target ≥ 5 000/s: {'met' if best >= 5000 else 'MISSED'}), server and client on the same 2 "
                  f"cores.\n\n"
                  f"{table}\n")


if __name__ == "__main__":
    main()
