"""REST vs gRPC on one server: per-request cost at concurrency 1 and throughput at concurrency 32, vit-digits.

Usage: ``python bench/rest_bench.py [--repo repo] [--repeats 5] [--seconds 3]``

One ``transerve serve`` process (fp32, REST on) per repeat; the load comes from one client process on uvloop
sharing the 2 cores: gRPC through grpc.aio with the request serialized once (as server_bench), REST through
aiohttp with keep-alive connections and the body built once — as JSON (``data`` lists) and with Triton's
binary-data extension (raw little-endian floats after a JSON header). One-image requests. Figures are medians
over ``--repeats`` (min–max beside); the ratios are against gRPC in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import uvloop
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import command_line, markdown, write_section
from server_bench import MODEL, request, start_with_rest

CONCURRENCY = 32


async def drive(call: Callable[[], Awaitable[object]], seconds: float) -> dict[str, float]:
    """Median round trip made back to back, then requests/s with CONCURRENCY in flight."""
    for _ in range(50):
        await call()
    latencies = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - t)
    stop = time.perf_counter() + seconds

    async def worker() -> int:
        done = 0
        while time.perf_counter() < stop:
            await call()
            done += 1
        return done

    began = time.perf_counter()
    total = sum(await asyncio.gather(*(worker() for _ in range(CONCURRENCY))))
    return {"c1_ms": statistics.median(latencies) * 1e3, "cN": total / (time.perf_counter() - began)}


def rest_bodies(images: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    tensor = {"name": "images", "shape": list(images.shape), "datatype": "FP32"}
    as_json = json.dumps({"inputs": [{**tensor, "data": images.reshape(-1).tolist()}]}).encode()
    raw = images.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return {"REST JSON": (as_json, {"Content-Type": "application/json"}),
            "REST binary": (header + raw, {"Content-Type": "application/octet-stream",
                                           "Inference-Header-Content-Length": str(len(header))})}


async def measure_all(grpc_address: str, http_address: str, images: np.ndarray, seconds: float
                      ) -> dict[str, dict[str, float]]:
    results = {}
    async with grpc.aio.insecure_channel(grpc_address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        payload = request(images).SerializeToString()
        results["gRPC"] = await drive(lambda: infer(payload), seconds)
    url = f"http://{http_address}/v2/models/{MODEL}/infer"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:
        for label, (body, headers) in rest_bodies(images).items():
            async def call(body: bytes = body, headers: dict[str, str] = headers) -> bytes:
                async with session.post(url, data=body, headers=headers) as response:
                    assert response.status == 200, await response.text()
                    return await response.read()

            results[label] = await drive(call, seconds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("repo"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    shape = yaml.safe_load((args.repo / MODEL / "config.yaml").read_text())["inputs"][0]["dims"][1:]
    images = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    runs: dict[str, list[dict[str, float]]] = {}
    process, grpc_address, http_address = start_with_rest(args.repo)  # one server: a restart per repeat costs more
    assert http_address is not None
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            for _ in range(args.repeats):
                for label, figures in runner.run(measure_all(grpc_address, http_address, images,
                                                             args.seconds)).items():
                    runs.setdefault(label, []).append(figures)
    finally:
        process.terminate()
        process.wait(60)
    grpc_c1 = statistics.median(r["c1_ms"] for r in runs["gRPC"])
    grpc_cn = statistics.median(r["cN"] for r in runs["gRPC"])
    rows = []
    for label, figures in runs.items():
        c1, cn = [r["c1_ms"] for r in figures], [r["cN"] for r in figures]
        rows.append({"protocol": label,
                     "round trip ms, concurrency 1": f"{statistics.median(c1):.3f} ({min(c1):.3f}–{max(c1):.3f})",
                     "vs gRPC": f"{statistics.median(c1) / grpc_c1:.2f}",
                     f"requests/s, concurrency {CONCURRENCY}": f"{statistics.median(cn):.0f} ({min(cn):.0f}–"
                                                                f"{max(cn):.0f})",
                     "vs gRPC ": f"{statistics.median(cn) / grpc_cn:.2f}"})
    table = markdown(rows)
    print(table)
    heading = "## REST vs gRPC"
    write_section(Path(__file__).with_name("RESULTS.md"), heading,
                  f"{heading}: {MODEL}, one-image requests to one server (median of {args.repeats} runs of "
                  f"{args.seconds:g} s; server and client share the 2 cores)\n\n{command_line()}\n\n{table}\n")


if __name__ == "__main__":
    main()
