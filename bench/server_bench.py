"""Server benchmark: gRPC serving against the backend's own offline speed, and batching on vs off.

Usage: ``python bench/server_bench.py [--repo repo] [--seconds 8] [--repeats 3]`` (needs ``make serve``'s
repository, or ``transerve zoo build --repo repo``). Model: ``vit-digits``. The server runs as its own
process on 127.0.0.1 with ORT at 2 intra-op threads (uvloop, the server's default loop); the load comes from one
grpc.aio client process on uvloop on the same 2 cores (so the client's CPU is part of what is measured).
Figures are medians over ``--repeats``.

(a) saturation throughput through gRPC at batch 64 (requests of 64 images, 4 in flight) vs offline ORT
    on the same graph at batch 64. Both sides get their best configuration on this CPU: offline, the faster
    of one session with 2 intra-op threads and two 1-thread sessions running side by side; served, the
    faster of ``instances: 1`` + ``--threads 2`` and ``instances: 2`` + ``--threads 1`` (every row shown);
(b) latency the server adds at concurrency 1 (1 image): median round trip − median offline ``run`` with the same
    ORT thread count (2, the default, and 1: a batch of one runs faster on one thread here);
(c) dynamic batching on vs off (``max_batch_size: 1``) at concurrency 32, 1-image requests — "on" both with
    the zoo's latency-first defaults and with a throughput setting (``preferred_batch_sizes: [32, 64]``,
    ``max_queue_delay_ms: 5``, ``flush_when_idle: false``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import uvloop
import yaml
from transerve.server.seq2seq import make_session
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import command_line, markdown, median_ms, write_section

MODEL = "vit-digits"


def start(repo: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """A server on ``repo`` at fp32 — the precision of the offline anchors it is compared with (``auto`` could
    pick a faster variant and flatter the ratio)."""
    cmd = [sys.executable, "-m", "transerve", "serve", "--repo", str(repo), "--port", "0", "--metrics-port", "-1",
           "--precision", "fp32", *extra]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"on (127\.0\.0\.1:\d+)", line)
        if match:
            return process, match.group(1)
    raise RuntimeError("server did not start")


def request(images: np.ndarray) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=MODEL)
    r.inputs.add(name="images", datatype="FP32", shape=list(images.shape))
    r.raw_input_contents.append(images.astype("<f4").tobytes())
    return r


async def closed_loop(address: str, images_per_request: int, concurrency: int, seconds: float,
                      shape: tuple[int, ...]) -> tuple[float, list[float]]:
    """(images/s, per-request latencies in s) with ``concurrency`` requests always in flight."""
    msg = request(np.random.default_rng(0).standard_normal((images_per_request, *shape)).astype(np.float32))
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(20):
            await stub.ModelInfer(msg)  # warm-up
        stop = time.perf_counter() + seconds

        async def client() -> int:
            done = 0
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await stub.ModelInfer(msg)
                latencies.append(time.perf_counter() - t)
                done += images_per_request
            return done

        start = time.perf_counter()
        total = sum(await asyncio.gather(*(client() for _ in range(concurrency))))
        return total / (time.perf_counter() - start), latencies


def variant(repo: Path, tmp: Path, name: str, batching: dict[str, object] | None = None, **config: object) -> Path:
    """A copy of the repository holding only the model, with config changes."""
    out = tmp / name
    shutil.copytree(repo / MODEL, out / MODEL)
    path = out / MODEL / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data.update(config)
    data["batching"].update(batching or {})
    path.write_text(yaml.safe_dump(data))
    return out


def offline_side_by_side(path: Path, x: np.ndarray, seconds: float = 4.0) -> float:
    """Images/s of two 1-thread sessions running concurrently (ORT releases the GIL)."""
    sessions = [make_session(path, threads=1) for _ in range(2)]
    counts = [0, 0]
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            sessions[i].run(None, {"images": x})
            counts[i] += len(x)

    for session in sessions:
        session.run(None, {"images": x})
    start_t = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start_t)


def measure(repo: Path, images: int, concurrency: int, seconds: float, shape: tuple[int, ...],
            server_args: Sequence[str] = ()) -> tuple[float, list[float]]:
    process, address = start(repo, *server_args)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the lighter client loop
            return runner.run(closed_loop(address, images, concurrency, seconds, shape))
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("repo"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ort-spinning", action="store_true", help="serve with `transerve serve --ort-spinning`")
    args = parser.parse_args()
    server_args = ["--ort-spinning"] if args.ort_spinning else []
    config = yaml.safe_load((args.repo / MODEL / "config.yaml").read_text())
    shape = tuple(config["inputs"][0]["dims"][1:])
    model_path = args.repo / MODEL / "1" / "model.onnx"
    session = make_session(model_path)
    x64 = np.random.default_rng(0).standard_normal((64, *shape)).astype(np.float32)
    offline_one = 64e3 / median_ms(lambda: session.run(None, {"images": x64}), 200, warmup=20)
    offline_two = statistics.median(offline_side_by_side(model_path, x64) for _ in range(3))
    offline1 = median_ms(lambda: session.run(None, {"images": x64[:1]}), 2000, warmup=50)
    single = make_session(model_path, threads=1)
    offline1_single = median_ms(lambda: single.run(None, {"images": x64[:1]}), 2000, warmup=50)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        on = variant(args.repo, Path(tmp), "on", max_batch_size=64)
        on_two = variant(args.repo, Path(tmp), "on-two", max_batch_size=64, batching={"instances": 2})
        throughput = variant(args.repo, Path(tmp), "throughput", max_batch_size=64, batching={
            "preferred_batch_sizes": [32, 64], "max_queue_delay_ms": 5, "flush_when_idle": False})
        off = variant(args.repo, Path(tmp), "off", max_batch_size=1)
        sat_one = [measure(on, 64, 4, args.seconds, shape, server_args)[0] for _ in range(args.repeats)]
        sat_two = [measure(on_two, 64, 4, args.seconds, shape, [*server_args, "--threads", "1"])[0]
                   for _ in range(args.repeats)]
        lat = [statistics.median(measure(on, 1, 1, args.seconds, shape, server_args)[1]) * 1e3
               for _ in range(args.repeats)]
        lat_single = [statistics.median(measure(on, 1, 1, args.seconds, shape, [*server_args, "--threads", "1"])[1])
                      * 1e3 for _ in range(args.repeats)]
        batched = [measure(on, 1, 32, args.seconds, shape, server_args)[0] for _ in range(args.repeats)]
        batched_tp = [measure(throughput, 1, 32, args.seconds, shape, server_args)[0] for _ in range(args.repeats)]
        unbatched = [measure(off, 1, 32, args.seconds, shape, server_args)[0] for _ in range(args.repeats)]
    anchor = max(offline_one, offline_two)
    for label, runs in (("1 instance × 2 threads", sat_one), ("2 instances × 1 thread", sat_two)):
        served = statistics.median(runs)
        rows.append({"check": f"(a) saturation img/s, {label}, vs best offline ORT batch 64", "served": round(served),
                     "anchor": round(anchor), "ratio": round(served / anchor, 2), "target": "≥ 0.90"})
    rows.append({"check": "(a) offline anchors: 1 session × 2 threads, 2 sessions × 1 thread", "served": "",
                 "anchor": f"{round(offline_one)} / {round(offline_two)}", "ratio": "", "target": ""})
    for label, runs, anchor1 in (("2 threads", lat, offline1), ("--threads 1", lat_single, offline1_single)):
        p50 = statistics.median(runs)
        rows.append({"check": f"(b) ms at concurrency 1, {label}: round trip vs offline run at that thread count",
                     "served": round(p50, 3), "anchor": round(anchor1, 3), "ratio": f"+{p50 - anchor1:.3f} ms",
                     "target": "< 1 ms added"})
    off_rate = statistics.median(unbatched)
    for label, runs in (("zoo defaults", batched), ("throughput setting", batched_tp)):
        on_rate = statistics.median(runs)
        rows.append({"check": f"(c) img/s at concurrency 32: batching on ({label}) vs off", "served": round(on_rate),
                     "anchor": round(off_rate), "ratio": round(on_rate / off_rate, 2), "target": "≥ 3"})
    table = markdown(rows)
    print(table)
    setting = "ORT threads spinning between runs" if args.ort_spinning else "ORT spinning stopped after each run"
    heading = f"## Server ({setting})"
    write_section(Path(__file__).with_name("RESULTS.md"), heading,
                  f"{heading}: gRPC serving of {MODEL} (median of {args.repeats} runs of {args.seconds:g} s; "
                  f"server and client share the 2 cores)\n\n{command_line()}\n\n"
                  f"{table}\n")


if __name__ == "__main__":
    main()
