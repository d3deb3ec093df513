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
    ``max_queue_delay_ms: 5``, ``flush_when_idle: false``);
(d) a realistic model: a ViT-Tiny-shaped classifier at 224 px (192 wide, 12 deep, random weights, exported
    here with the exporter's defaults), 16 one-image requests in flight vs offline ORT on the same graph at
    batch 16 with the server's thread count — where vit-digits (0.05 ms an image) measures gRPC's own CPU, this
    measures what serving costs a model whose compute dominates (issue 15: ≥ 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
import torch
import uvloop
import yaml
from transerve.export.exporter import ExportOptions, export_vit_entry
from transerve.export.variants import run_times
from transerve.models.vit import ViT, ViTConfig
from transerve.server.backends.sessions import make_session
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import command_line, markdown, median_ms, verdict, write_section

MODEL = "vit-digits"
TINY, TINY_CONCURRENCY = "vit-tiny", 16
VIT_DIGITS_READING = (
    "Reading of (a)–(c) on the AMD EPYC (2 vCPUs): vit-digits computes an image in ≈ 0.03 ms at batch 64 and a "
    "one-image batch in ≈ 0.08 ms, so these rows measure the front end, not the model. The floor row of the "
    "serving-peers table below — grpc.aio on uvloop answering with a prepared response, same client — reaches "
    "≈ 6 500–7 000 one-image requests/s on these 2 shared cores: (c)'s target of 3 × the unbatched rate (≈ 2 "
    "000–2 900 req/s here) is at or above what a Python gRPC front end serves with a model that costs nothing, "
    "so batching (which removes compute, not RPCs) cannot reach it; what batching does save shows in (a), where "
    "64-image requests amortise the RPC. (a) at 0.5–0.65 of offline: each 64-image request is 196 KB parsed and "
    "copied on the event loop and the client's own CPU takes a share of the two cores that offline ORT keeps. (b): "
    "the round trip is the floor's (≈ 0.5–0.6 ms) plus the handler and ONNX Runtime; requests to an idle "
    "classifier compute on the event loop (no thread hops) and small batches on a one-thread session. What would "
    "close (a) and (c): a front end outside the Python event loop (C++/Rust gRPC handing tensors to the batcher, "
    "as Triton does), zero-copy tensors for local clients (KServe's shared-memory extension), and a load "
    "generator on its own cores.")
REALISTIC_READING = (
    "Reading of (d), measured on the AMD EPYC with AVX-512 (2 vCPUs) with the per-thread CPU counters in /proc "
    "and py-spy: with 2 instances × 1 thread the two ONNX Runtime threads get 0.80–0.86 of a core each; the rest "
    "of the two cores goes to the server's event loop (0.10–0.12 core, ≈ 0.7 ms per 600 KB request, mostly "
    "grpc.aio's own receive path and copies; transerve's handler is ≈ 10 % of it), gRPC's event-engine threads "
    "(≈ 0.03) and the load generator (0.07–0.09), none of which offline ORT pays — a ceiling near 0.9 on two "
    "shared cores. Batch size is not the cost: one ONNX Runtime thread computes this model faster per image at "
    "batch 1–2 than at 8 (cache-resident activations; the anchors row shows it), and capping served batches at "
    "2 or 4 moved the ratio within this VM's run-to-run noise (± 10 %). With 1 instance × 2 threads, ONNX "
    "Runtime's parallel loops stall whenever other work preempts one of its two threads. What would close it: "
    "the load generator on another machine, zero-copy request tensors (KServe's shared-memory extension for "
    "local clients), or a front end outside the Python event loop.")


def start(repo: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """A server on ``repo`` at fp32 — the precision of the offline anchors it is compared with (``auto`` could
    pick a faster variant and flatter the ratio)."""
    process, address, _ = start_with_rest(repo, *extra, rest=False)
    return process, address


def start_with_rest(repo: Path, *extra: str, rest: bool = True) -> tuple[subprocess.Popen[str], str, str | None]:
    """As :func:`start`, and the REST address (an ephemeral port) when ``rest``."""
    cmd = [sys.executable, "-m", "transerve", "serve", "--repo", str(repo), "--port", "0", "--metrics-port", "-1",
           *(["--http-port", "0"] if rest else ["--no-http"]), "--precision", "fp32", *extra]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"on (127\.0\.0\.1:\d+)(?:.*REST on (127\.0\.0\.1:\d+))?", line)
        if match:
            return process, match.group(1), match.group(2)
    raise RuntimeError("server did not start")


def request(images: np.ndarray, model: str = MODEL) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model)
    r.inputs.add(name="images", datatype="FP32", shape=list(images.shape))
    r.raw_input_contents.append(images.astype("<f4").tobytes())
    return r


async def closed_loop(address: str, images_per_request: int, concurrency: int, seconds: float,
                      shape: tuple[int, ...], model: str = MODEL) -> tuple[float, list[float]]:
    """(images/s, per-request latencies in s) with ``concurrency`` requests always in flight."""
    msg = request(np.random.default_rng(0).standard_normal((images_per_request, *shape)).astype(np.float32), model)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = await stub.ModelInfer(msg)  # checked once, in full
        assert reply.outputs, reply
        # Then the request is serialized once and the reply left as bytes: the load generator shares the 2
        # cores with the server, so its own protobuf work per call is kept out of what is measured.
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        payload = msg.SerializeToString()
        for _ in range(20):
            await infer(payload)  # warm-up
        stop = time.perf_counter() + seconds

        async def client() -> int:
            done = 0
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await infer(payload)
                latencies.append(time.perf_counter() - t)
                done += images_per_request
            return done

        start = time.perf_counter()
        total = sum(await asyncio.gather(*(client() for _ in range(concurrency))))
        return total / (time.perf_counter() - start), latencies


def variant(repo: Path, tmp: Path, name: str, batching: dict[str, object] | None = None, model: str = MODEL,
            **config: object) -> Path:
    """A copy of the repository holding only the model, with config changes."""
    out = tmp / name
    shutil.copytree(repo / model, out / model)
    path = out / model / "config.yaml"
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
            server_args: Sequence[str] = (), model: str = MODEL, repeats: int = 1) -> list[tuple[float, list[float]]]:
    """``repeats`` closed-loop runs against one server process (started once: a restart per run would cost
    more than the runs)."""
    process, address = start(repo, *server_args)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the lighter client loop
            return [runner.run(closed_loop(address, images, concurrency, seconds, shape, model))
                    for _ in range(repeats)]
    finally:
        process.terminate()
        process.wait(60)


def vit_tiny_repo(tmp: Path) -> tuple[Path, ViTConfig]:
    """A repository holding one ViT-Tiny-shaped entry (a 1-layer micro ViT under ``TRANSERVE_BENCH_SMOKE``)."""
    if os.environ.get("TRANSERVE_BENCH_SMOKE") == "1":
        cfg = ViTConfig(image_size=32, patch_size=16, num_classes=10, dim=32, depth=1, num_heads=2)
    else:
        cfg = ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=192, depth=12, num_heads=3)
    torch.manual_seed(0)
    repo = tmp / "vit-tiny-repo"
    preprocessing = {"size": cfg.image_size, "mean": [0.5] * 3, "std": [0.5] * 3, "resample": "bilinear"}
    export_vit_entry(ViT(cfg).eval(), ExportOptions(repo=repo, name=TINY),
                     labels=[str(i) for i in range(cfg.num_classes)], preprocessing=preprocessing)
    return repo, cfg


def realistic_rows(tmp: Path, repeats: int, seconds: float, server_args: Sequence[str]) -> list[dict[str, object]]:
    """(d): served vs offline for the ViT-Tiny-shaped model. Like (a), each side gets its better configuration
    here: offline, one 2-thread session at batch 16 or two 1-thread sessions side by side at batch 1 or 8; served,
    ``instances: 1`` + 2 threads or ``instances: 2`` + ``--threads 1``."""
    repo, cfg = vit_tiny_repo(tmp)
    two = variant(repo, tmp, "vit-tiny-two", model=TINY, batching={"instances": 2})
    shape = (cfg.in_chans, cfg.image_size, cfg.image_size)
    x = np.random.default_rng(0).standard_normal((TINY_CONCURRENCY, *shape)).astype(np.float32)
    path = repo / TINY / "1" / "model.onnx"
    session = make_session(path)
    offline_one = [TINY_CONCURRENCY / t for t in run_times(lambda: session.run(None, {"images": x}), max(repeats, 5))]
    # two 1-thread sessions at batch 8, and at batch 1 (one thread computes this model faster per image there)
    offline_two = {b: [offline_side_by_side(path, x[:b], seconds=2.0) for _ in range(3)]
                   for b in (1, TINY_CONCURRENCY // 2)}
    offline = max(offline_one, *offline_two.values(), key=statistics.median)
    served = {label: [run[0] for run in measure(r, 1, TINY_CONCURRENCY, seconds, shape, extra, TINY, repeats)]
              for label, r, extra in (("1 instance × 2 threads", repo, server_args),
                                      ("2 instances × 1 thread", two, [*server_args, "--threads", "1"]))}
    rows: list[dict[str, object]] = []
    for label, runs in served.items():
        ratio = statistics.median(runs) / statistics.median(offline)
        rows.append({"check": f"(d) ViT-Tiny-shaped {cfg.image_size} px img/s, {label}: {TINY_CONCURRENCY} "
                              f"one-image requests in flight vs best offline ORT",
                     "served": f"{statistics.median(runs):.1f} ({min(runs):.1f}–{max(runs):.1f})",
                     "anchor": f"{statistics.median(offline):.1f} ({min(offline):.1f}–{max(offline):.1f})",
                     "ratio": round(ratio, 2), "target": f"≥ 0.90 {'met' if ratio >= 0.9 else 'MISSED'}"})
    rows.append({"check": f"(d) offline anchors: 1 session × 2 threads at batch {TINY_CONCURRENCY}; 2 sessions × 1 "
                          f"thread at batch 1, at batch {TINY_CONCURRENCY // 2}", "served": "",
                 "anchor": " / ".join(f"{statistics.median(v):.1f}" for v in (offline_one, *offline_two.values())),
                 "ratio": "", "target": ""})
    return rows

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("repo"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ort-spinning", action="store_true", help="serve with `transerve serve --ort-spinning`")
    parser.add_argument("--realistic-only", action="store_true", help="only (d), printed, RESULTS.md untouched")
    parser.add_argument("--no-realistic", action="store_true", help="skip (d) (make bench runs it once)")
    args = parser.parse_args()
    server_args = ["--ort-spinning"] if args.ort_spinning else []
    if args.realistic_only:  # (d) alone, printed: for profiling it
        with tempfile.TemporaryDirectory() as tmp:
            print(markdown(realistic_rows(Path(tmp), args.repeats, max(args.seconds, 3.0), server_args)))
        return
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
        n = args.repeats
        sat_one = [run[0] for run in measure(on, 64, 4, args.seconds, shape, server_args, repeats=n)]
        one = [*server_args, "--threads", "1"]
        sat_two = [run[0] for run in measure(on_two, 64, 4, args.seconds, shape, one, repeats=n)]
        lat = [statistics.median(run[1]) * 1e3 for run in measure(on, 1, 1, args.seconds, shape, server_args,
                                                                   repeats=n)]
        lat_single = [statistics.median(run[1]) * 1e3 for run in measure(on, 1, 1, args.seconds, shape, one,
                                                                          repeats=n)]
        batched = [run[0] for run in measure(on, 1, 32, args.seconds, shape, server_args, repeats=n)]
        batched_tp = [run[0] for run in measure(throughput, 1, 32, args.seconds, shape, server_args, repeats=n)]
        unbatched = [run[0] for run in measure(off, 1, 32, args.seconds, shape, server_args, repeats=n)]
        realistic = [] if args.no_realistic else realistic_rows(Path(tmp), args.repeats, max(args.seconds, 3.0),
                                                                  server_args)
    anchor = max(offline_one, offline_two)
    for label, runs in (("1 instance × 2 threads", sat_one), ("2 instances × 1 thread", sat_two)):
        served = statistics.median(runs)
        rows.append({"check": f"(a) saturation img/s, {label}, vs best offline ORT batch 64", "served": round(served),
                     "anchor": round(anchor), "ratio": round(served / anchor, 2),
                     "target": verdict("≥ 0.90", served >= 0.9 * anchor)})
    rows.append({"check": "(a) offline anchors: 1 session × 2 threads, 2 sessions × 1 thread", "served": "",
                 "anchor": f"{round(offline_one)} / {round(offline_two)}", "ratio": "", "target": ""})
    for label, runs, anchor1 in (("2 threads", lat, offline1), ("--threads 1", lat_single, offline1_single)):
        p50 = statistics.median(runs)
        rows.append({"check": f"(b) ms at concurrency 1, {label}: round trip vs offline run at that thread count",
                     "served": round(p50, 3), "anchor": round(anchor1, 3), "ratio": f"+{p50 - anchor1:.3f} ms",
                     "target": verdict("< 1 ms added", p50 - anchor1 < 1.0)})
    off_rate = statistics.median(unbatched)
    for label, runs in (("zoo defaults", batched), ("throughput setting", batched_tp)):
        on_rate = statistics.median(runs)
        rows.append({"check": f"(c) img/s at concurrency 32: batching on ({label}) vs off", "served": round(on_rate),
                     "anchor": round(off_rate), "ratio": round(on_rate / off_rate, 2),
                     "target": verdict("≥ 3", on_rate >= 3 * off_rate)})
    table = markdown(rows + realistic)
    print(table)
    setting = "ORT threads spinning between runs" if args.ort_spinning else "ORT spinning stopped after each run"
    heading = f"## Server ({setting})"
    write_section(Path(__file__).with_name("RESULTS.md"), heading,
                  f"{heading}: gRPC serving of {MODEL} (median of {args.repeats} runs of {args.seconds:g} s, one "
                  f"server process per configuration; server and client share the 2 cores)\n\n{command_line()}\n\n"
                  f"{table}\n\n{VIT_DIGITS_READING}\n" + ("" if args.no_realistic else f"\n{REALISTIC_READING}\n"))


if __name__ == "__main__":
    main()
