"""Memory, start-up and disk of the serving runtime, against the targets of the lean-runtime issue.

Measured in one run, each a real ``transerve serve`` process on loopback:

* ``import transerve.server.app`` (seconds, in a fresh interpreter; median of ``--repeats``);
* process start → ``grpc.health.v1`` SERVING (median of ``--repeats``);
* RSS once SERVING (every model has run a warm-up request by then), and after ``--requests`` mixed requests
  (translations with budgets 8–64 tokens, and classifications for the zoo) at concurrency 32;
* disk: the files one precision of an entry serves from, against that precision's weight bytes (the unique
  initializers of its graphs: a tensor two graphs share counts once).

Repositories: the demo zoo (``--zoo-repo``, as ``make serve`` builds it) and the opus-mt-en-de-shaped random
Marian translator (``opus_model.py``), fp32 and its int8 variant. The "before" row holds the figures measured
before this change (issue 12's, on an AMD EPYC of the same kind): the code before it cannot serve these
repositories (it needs ``decoder_step.onnx``), so it is not rerun here.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transerve_client import AsyncTranserveClient

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import command_line, machine, markdown, verdict, write_section

MB = 1 << 20
TEXTS = ["three hundred and forty-two", "seven", "one thousand and one", "nineteen eighty-four", "the first",
         "two million four hundred thousand and twelve", "ninety-nine", "eighteen hundred and six"]


def import_seconds() -> float:
    code = "import time; t = time.perf_counter(); import transerve.server.app; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(repo: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    """A server process and the seconds from its start to health SERVING."""
    port = free_port()
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "transerve", "serve", "--repo", str(repo), "--port", str(port),
                                "--metrics-port", "-1", "--log-level", "warning", "--http-port", "0",
                                "--precision", "fp32"],  # the files config.yaml names: what precision_repo chose
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server for {repo} exited with {process.returncode}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5, wait_for_ready=True).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return process, address, time.perf_counter() - began
            except grpc.RpcError:
                pass
            time.sleep(0.005)  # a benchmark's poll of the health check, not a test's wait


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(60)


async def load(address: str, requests: int, concurrency: int, classify: bool, longest: int) -> int:
    """``requests`` mixed requests at ``concurrency``: budgets 8–64 tokens (at most the model's ``longest``), and
    images when ``classify``."""
    rng = np.random.default_rng(0)
    plan = [(TEXTS[i % len(TEXTS)], min(longest, int(rng.integers(8, 65))), classify and i % 3 == 2)
            for i in range(requests)]
    images = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    queue: asyncio.Queue[tuple[str, int, bool]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    done = 0

    async def worker(client: AsyncTranserveClient) -> None:
        nonlocal done
        while not queue.empty():
            text, budget, image = queue.get_nowait()
            if image:
                await client.classify(list(images), model="vit-digits")
            else:
                await client.translate([text], max_new_tokens=budget)
            done += 1

    async with AsyncTranserveClient(address, timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return done


def entry_files(entry: Path, precision: str) -> list[Path]:
    """The files one precision of an entry serves from (its graphs, their external data, tokenizer, labels)."""
    config = yaml.safe_load((entry / "config.yaml").read_text())
    vdir = max((p for p in entry.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    suffix = "" if precision == "fp32" else f".{precision}"
    graphs = [vdir / f.replace(".onnx", f"{suffix}.onnx") for f in config["files"].values()]
    weights = [p for p in (vdir / f"weights{suffix}.bin",) if p.is_file()]
    return [*[p for p in entry.iterdir() if p.is_file()], *graphs, *weights]


def weight_bytes(graphs: list[Path]) -> int:
    """Unique initializer bytes over an entry's graphs (a tensor stored for two graphs counts once)."""
    import onnx
    from onnx import numpy_helper

    seen: set[str] = set()
    total = 0
    for path in graphs:
        model = onnx.load_model(str(path), load_external_data=True)
        for init in model.graph.initializer:
            data = numpy_helper.to_array(init, base_dir=str(path.parent)).tobytes()
            digest = hashlib.sha1(data).hexdigest()
            if digest not in seen:
                seen.add(digest)
                total += len(data)
    return total


def precision_repo(src: Path, name: str, precision: str, tmp: Path) -> Path:
    """A repository holding one precision of an entry (links, not copies), so a server loads only it."""
    repo = tmp / f"{name}-{precision}"
    if repo.exists():
        shutil.rmtree(repo)
    shutil.copytree(src / name, repo / name, copy_function=os.link)
    config_file = repo / name / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    if precision != "fp32":
        config["files"] = {g: f.replace(".onnx", f".{precision}.onnx") for g, f in config["files"].items()}
    config_file.unlink()
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return repo


def measure(label: str, repo: Path, files: list[Path], weights: int, requests: int, repeats: int,
            classify: bool) -> dict[str, Any]:
    starts, warm = [], []
    for _ in range(repeats):
        process, address, seconds = start(repo)
        starts.append(seconds)
        warm.append(rss_mb(process.pid))
        stop(process)
    process, address, _ = start(repo)
    try:
        began = time.perf_counter()
        longest = min(yaml.safe_load((e / "config.yaml").read_text())["max_new_tokens"] for e in repo.iterdir()
                      if (e / "config.yaml").is_file() and "translate" in (e / "config.yaml").read_text())
        done = asyncio.run(load(address, requests, 32, classify, longest))
        load_seconds = time.perf_counter() - began
        loaded = rss_mb(process.pid)
    finally:
        stop(process)
    disk = sum(p.stat().st_size for p in files)
    row: dict[str, Any] = {"what": label, "start→SERVING s": round(statistics.median(starts), 2),
                           "RSS warm MB": round(statistics.median(warm)), f"RSS after {done} req MB": round(loaded),
                           "load s": round(load_seconds, 1), "weights MB": round(weights / MB, 1),
                           "disk MB": round(disk / MB, 1),
                           "disk / weights": round(disk / weights, 2) if weights else "-"}
    print(row, flush=True)
    return row


def kv_bound_mb(entry: Path) -> float:
    """max_cached_tokens × layers × 2 (K, V) × d_model × 4 bytes × 2 buffers: the scheduler's cache ceiling."""
    config = yaml.safe_load((entry / "config.yaml").read_text())
    d = config["decoder"]
    tokens = config["scheduler"]["max_cached_tokens"]
    return tokens * d["num_layers"] * 2 * d["num_heads"] * d["head_dim"] * 4 * 2 / MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo-repo", type=Path, default=Path("repo"), help="the zoo's repository (make zoo)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/transerve-bench"), help="opus_model.py's cache")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    import opus_model

    print(machine(), flush=True)
    imports = [import_seconds() for _ in range(args.repeats)]
    rows = [{"what": "import transerve.server.app", "seconds": round(statistics.median(imports), 2),
             "target": verdict("≤ 0.8", statistics.median(imports) <= 0.8)}]
    print(rows, flush=True)

    serving = []
    zoo_graphs = [f for e in sorted(args.zoo_repo.iterdir()) if (e / "config.yaml").is_file()
                  for f in entry_files(e, "fp32")]
    zoo_weights = sum(weight_bytes([p for p in entry_files(e, "fp32") if p.suffix == ".onnx"])
                      for e in sorted(args.zoo_repo.iterdir()) if (e / "config.yaml").is_file())
    zoo = measure("zoo (3 models)", args.zoo_repo, zoo_graphs, zoo_weights, args.requests, args.repeats,
                  classify=True)
    serving.append(zoo | {"target": verdict("RSS ≤ 200 MB, SERVING ≤ 1.5 s", zoo["RSS warm MB"] <= 200
                                            and zoo["start→SERVING s"] <= 1.5)})
    opus_repo = opus_model.exported(args.work)
    entry = opus_repo / "opus-shaped"
    files = {p: entry_files(entry, p) for p in ("fp32", "int8")}
    weights = {p: weight_bytes([f for f in fs if f.suffix == ".onnx"]) for p, fs in files.items()}  # before any link
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "int8"):
            repo = precision_repo(opus_repo, "opus-shaped", precision, Path(tmp))
            row = measure(f"opus-mt-shaped {precision}", repo, files[precision], weights[precision],
                          args.requests, args.repeats, classify=False)
            shutil.rmtree(repo)
            limit = 1.3 * weights[precision] / MB + 150
            loaded = next(v for k, v in row.items() if k.startswith("RSS after"))
            met = (row["RSS warm MB"] <= limit and loaded <= row["RSS warm MB"] + kv_bound_mb(entry)
                   and row["disk MB"] <= 1.2 * row["weights MB"])
            row["target"] = verdict(f"RSS ≤ {limit:.0f} MB; after load ≤ warm + {kv_bound_mb(entry):.0f} MB (KV "
                                    f"bound); disk ≤ 1.2 × weights", met)
            serving.append(row)
    before = {"what": "before this change (issue 12's figures)", "import s": "5.4 (341 MB)",
              "start→SERVING s": "4+ (zoo)", "RSS warm MB": "≈380 zoo; 1 280–1 380 opus fp32",
              "disk MB": "opus fp32: 208 per decoder graph × 2 + encoder 208"}
    section = (f"## Memory: import, start-up, RSS and disk of the serving runtime (median of {args.repeats})\n\n"
               f"{command_line()}\n\n{machine()}\n\n{markdown(rows)}\n\n{markdown(serving)}\n\n"
               f"{markdown([before])}\n")
    print(section)
    write_section(Path(__file__).with_name("RESULTS.md"), "## Memory:", section)


if __name__ == "__main__":
    main()
