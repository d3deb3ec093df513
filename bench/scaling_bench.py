"""Scale-out on one machine: one process vs 2 Ray Serve replicas vs 2 processes behind the SDK's round-robin.

Usage: ``python bench/scaling_bench.py [--repo repo] [--duration 10] [--repeats 3] [--concurrency 16]``.
Each setup serves the zoo repository; ``transerve-loadtest`` (one process, closed loop) sends classifications
(one PNG digit per request, and eight) and translations (one sentence per request) to it; the figures are medians over
the repeats. The setups:

- ``1 process``: ``transerve serve --threads 2``;
- ``2 Ray replicas``: ``serve run`` on a copy of ``deploy/ray/serve.yaml`` with ``num_replicas: 2`` in place
  of autoscaling and an ephemeral gRPC port (1 ONNX Runtime thread and 1 Ray CPU per replica);
- ``2 processes, round-robin``: two ``transerve serve --threads 1``, the load test given both addresses.

Everything — servers, Ray, the load generator — shares this machine's cores, so 2 replicas can only add what
the cores leave over. RSS is the sum over each setup's process tree once the load is done. Writes its section
of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import command_line, machine, markdown, write_section

ROOT = Path(__file__).resolve().parent.parent
SERVE_YAML = ROOT / "deploy" / "ray" / "serve.yaml"
TASKS = [("classify", 1), ("classify", 8), ("translate", 1)]  # (task, images or texts per request)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants (from /proc), MB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        pid = int(status.parent.name)
        children.setdefault(int(fields["PPid"]), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total / 1024


def wait_serving(address: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)  # a benchmark's start-up poll, not a test
    raise RuntimeError(f"{address} not SERVING after {timeout} s")


def serve_process(repo: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "transerve", "serve", "--repo", str(repo), "--port", str(port),
                                "--metrics-port", "-1", "--threads", str(threads), "--no-http"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"127.0.0.1:{port}"


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    process.send_signal(sig)
    try:
        process.wait(90)
    except subprocess.TimeoutExpired:
        process.kill()


@contextmanager
def processes(repo: Path, count: int, threads: int) -> Iterator[tuple[str, list[int]]]:
    started = [serve_process(repo, threads) for _ in range(count)]
    try:
        for _, address in started:
            wait_serving(address)
        yield ",".join(a for _, a in started), [p.pid for p, _ in started]
    finally:
        for p, _ in started:
            stop(p)


def ray_config(port: int, replicas: int) -> dict:
    config = yaml.safe_load(SERVE_YAML.read_text())
    config["grpc_options"]["port"] = port
    config["http_options"]["port"] = free_port()
    (deployment,) = config["applications"][0]["deployments"]
    deployment.pop("autoscaling_config")
    deployment["num_replicas"] = replicas
    return config


@contextmanager
def ray_replicas(repo: Path, replicas: int) -> Iterator[tuple[str, list[int]]]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "serve.yaml"
        path.write_text(yaml.safe_dump(ray_config(port, replicas)))
        env = {**os.environ, "TRANSERVE_REPO": str(repo.resolve()), "RAY_USAGE_STATS_ENABLED": "0"}
        serve = Path(sys.executable).with_name("serve")
        process = subprocess.Popen([str(serve), "run", str(path)], env=env, cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            start = time.monotonic()
            wait_serving(f"127.0.0.1:{port}")
            print(f"ray: {replicas} replicas serving after {time.monotonic() - start:.0f} s", flush=True)
            yield f"127.0.0.1:{port}", [process.pid]
        finally:
            stop(process, signal.SIGINT)  # `serve run` shuts Serve and its local cluster down on Ctrl-C
            subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def load(url: str, task: str, concurrency: int, duration: float, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        subprocess.run([sys.executable, "-m", "transerve_client.loadtest", "--url", url, "--task", task,
                        "--batch", str(batch), "--concurrency", str(concurrency), "--duration", str(duration),
                        "--warmup", "32", "--timeout", "60", "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
        (step,) = json.loads(out.read_text())["steps"]
        return dict(step)


def measure(setup: str, url: str, pids: list[int], args: argparse.Namespace) -> list[dict]:
    rows = []
    for task, batch in TASKS:
        steps = [load(url, task, args.concurrency, args.duration, batch) for _ in range(args.repeats)]
        rows.append({"setup": setup, "task": f"{task} ×{batch}",
                     "requests/s": round(statistics.median(s["throughput_rps"] for s in steps), 1),
                     "items/s": round(batch * statistics.median(s["throughput_rps"] for s in steps)),
                     "p50 ms": round(statistics.median(s["latency_ms"]["p50"] for s in steps), 1),
                     "p99 ms": round(statistics.median(s["latency_ms"]["p99"] for s in steps), 1),
                     "errors": sum(sum(s["errors"].values()) for s in steps)})
        print(rows[-1], flush=True)
    rss = sum(tree_rss_mb(p) for p in pids)
    for row in rows:
        row["RSS MB"] = round(rss)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("repo"))
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    rows: list[dict] = []
    with processes(args.repo, 1, threads=2) as (url, pids):
        rows += measure("1 process (2 threads)", url, pids, args)
    with ray_replicas(args.repo, 2) as (url, pids):
        rows += measure("2 Ray Serve replicas (1 thread each)", url, pids, args)
    with processes(args.repo, 2, threads=1) as (url, pids):
        rows += measure("2 processes, SDK round-robin (1 thread each)", url, pids, args)
    single = {r["task"]: r["requests/s"] for r in rows[:len(TASKS)]}
    for row in rows:
        row["× 1 process"] = round(row["requests/s"] / single[row["task"]], 2)
    table = markdown(rows)
    print(table)
    cpu = machine()
    write_section(Path(__file__).with_name("RESULTS.md"), "## Scale-out",
                  f"## Scale-out: 1 process vs 2 Ray Serve replicas vs 2 processes behind round-robin "
                  f"(closed loop, concurrency {args.concurrency}, median of {args.repeats} × {args.duration:g} s)\n\n"
                  f"{command_line()}\n\n{cpu}\n\nServers, Ray and the load generator share the same cores; "
                  f"`× 1 process` is the same-run ratio.\n\n{table}\n")


if __name__ == "__main__":
    main()
