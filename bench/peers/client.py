"""The one client every server in ``bench/peers_bench.py`` is driven by: NVIDIA's ``tritonclient`` over KServe v2
gRPC (transerve, MLServer and PyTriton all speak it). Runs in its own venv and prints one JSON line.

Concurrency 1: the median round trip of one-image requests made back to back (the synchronous client).
Concurrency N: images/s with N one-image requests always in flight (``tritonclient.grpc.aio``), and their
median and p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient


def one_image(shape: list[int], name: str) -> list[grpcclient.InferInput]:
    x = np.random.default_rng(0).standard_normal([1, *shape]).astype(np.float32)
    item = grpcclient.InferInput(name, x.shape, "FP32")
    item.set_data_from_numpy(x)
    return [item]


def wait_ready(url: str, model: str, timeout: float) -> None:
    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.is_model_ready(model):
                return
        except Exception:  # not listening yet
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{model} at {url} not ready after {timeout:g} s")
        time.sleep(0.2)


def sequential(url: str, model: str, inputs: list[grpcclient.InferInput], seconds: float) -> list[float]:
    client = grpcclient.InferenceServerClient(url)
    for _ in range(50):
        client.infer(model, inputs)
    latencies = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        start = time.perf_counter()
        client.infer(model, inputs)
        latencies.append(time.perf_counter() - start)
    return latencies


async def concurrent(url: str, model: str, inputs: list[grpcclient.InferInput], concurrency: int,
                     seconds: float) -> tuple[float, list[float]]:
    client = aioclient.InferenceServerClient(url)
    for _ in range(20):
        await client.infer(model, inputs)
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker() -> int:
        done = 0
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await client.infer(model, inputs)
            latencies.append(time.perf_counter() - start)
            done += 1
        return done

    start = time.perf_counter()
    total = sum(await asyncio.gather(*(worker() for _ in range(concurrency))))
    rate = total / (time.perf_counter() - start)
    await client.close()
    return rate, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="vit-digits")
    parser.add_argument("--input", default="images")
    parser.add_argument("--shape", required=True, help="one image's shape, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    args = parser.parse_args()
    inputs = one_image([int(d) for d in args.shape.split(",")], args.input)
    wait_ready(args.url, args.model, args.ready_timeout)
    round_trips = sequential(args.url, args.model, inputs, args.seconds)
    rate, latencies = asyncio.run(concurrent(args.url, args.model, inputs, args.concurrency, args.seconds))
    latencies.sort()
    print(json.dumps({"c1_ms": statistics.median(round_trips) * 1e3, "c1_requests": len(round_trips),
                      "cN_per_s": rate, "cN_p50_ms": statistics.median(latencies) * 1e3,
                      "cN_p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3}))


if __name__ == "__main__":
    main()
