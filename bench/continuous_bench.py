"""Continuous batching vs request-level (static) batching, and served vs offline tokens/s, on one model.

Usage: ``python bench/continuous_bench.py [--work /tmp/transerve-bench] [--seconds 20] [--rates 4,8,...]``
(builds the opus-mt-en-de-shaped random Marian and its export on first use, ~2 min; see ``opus_model.py``).

1. Open-loop Poisson load (``transerve-loadtest``'s generator) with mixed output lengths — every request's
   ``max_new_tokens`` drawn uniformly from 8..64; the random model never stops early, so that is its length —
   against the same export served three times: ``scheduler.mode: continuous`` and ``static`` (request-level
   batching) with ``max_batch_size`` 32 and 64, the same unary ``Translate`` calls for all. Per offered rate:
   throughput, p50/p99 latency. The comparison: the highest swept rate each mode sustains (≥ 90 % of the
   offered rate served — a fixed request count ends with a drain tail — no errors) with p99 under a latency
   bound, for several bounds. Time to first token: a second continuous pass with ``TranslateStream`` at a
   few rates (static batching returns nothing before the whole batch ends: its TTFT is its latency).
2. Saturation: served tokens/s (closed loop, 16 and 32 concurrent one-text requests of 20 source tokens, 32
   new tokens) vs the offline decode loop (``ct2_bench.TranserveLoop``) at batch 16 and 32, same run.
Server and load generator share the 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from tokenizers import Tokenizer
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc
from transerve_client.loadtest import StepResult, TranslateLoad, Workload, open_loop

sys.path.insert(0, str(Path(__file__).parent))
from ct2_bench import TranserveLoop
from export_bench import command_line, markdown, results_path, verdict, write_section
from opus_model import exported
from server_bench import start

MODEL = "opus-shaped"
BUDGETS = (8, 64)
BOUNDS_S = (1.0, 2.0, 4.0, 8.0)


def variant(repo: Path, out: Path, mode: str, max_batch_size: int = 32) -> Path:
    """A repository with only the model, its scheduler mode set (and the int8 files left out)."""
    if out.exists():
        shutil.rmtree(out)
    entry = out / MODEL
    shutil.copytree(repo / MODEL, entry, ignore=shutil.ignore_patterns("*.int8.onnx", "torch"))
    config = yaml.safe_load((entry / "config.yaml").read_text())
    config["scheduler"]["mode"] = mode
    config["max_batch_size"] = max_batch_size
    (entry / "config.yaml").write_text(yaml.safe_dump(config))
    return out


async def sweep(address: str, rates: list[float], seconds: float, stream: bool) -> list[StepResult]:
    results = []
    async with grpc.aio.insecure_channel(address) as channel:
        work = Workload(channel, "translate", MODEL, 1, [], None, TranslateLoad(BUDGETS, stream, seed=1))
        for _ in range(4):
            await work.send(60)
        for rate in rates:
            step = await open_loop(work, rate, seconds, None, timeout=60.0, seed=int(rate))
            print(f"  {'stream' if stream else 'unary'} {rate:g}/s: {step.throughput_rps:.1f} req/s, "
                  f"p99 {step.latency_ms['p99']:.0f} ms, errors {step.errors}", flush=True)
            results.append(step)
            if step.latency_ms["p99"] > 4 * max(BOUNDS_S) * 1e3:
                break  # far past every bound: higher rates only queue longer
    return results


def sustained(results: list[StepResult], bound_s: float) -> float:
    ok = [r.load for r in results if not r.errors and r.throughput_rps >= 0.9 * r.load
          and r.latency_ms["p99"] <= bound_s * 1e3]
    return max(ok, default=0.0)


async def closed_tokens(address: str, texts: list[str], concurrency: int, seconds: float) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tpb_grpc.TranslatorStub(channel)
        options = tpb.TranslateOptions(max_new_tokens=32)
        await stub.Translate(tpb.TranslateRequest(model=MODEL, texts=texts[:2], options=options))
        tokens, sent = 0, 0
        stop = time.perf_counter() + seconds
        start_t = time.perf_counter()

        async def client() -> None:
            nonlocal tokens, sent
            while time.perf_counter() < stop:
                text = texts[sent % len(texts)]
                sent += 1
                reply = await stub.Translate(tpb.TranslateRequest(model=MODEL, texts=[text], options=options))
                tokens += reply.translations[0].tokens

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return tokens / (time.perf_counter() - start_t)


def saturation(repo: Path, work: Path, seconds: float, repeats: int) -> list[dict[str, Any]]:
    entry = repo / MODEL
    config = yaml.safe_load((entry / "config.yaml").read_text())
    tokenizer = Tokenizer.from_file(str(entry / "tokenizer.json"))
    rng = np.random.default_rng(0)
    id_rows = [rng.integers(2, 300, 19).tolist() for _ in range(64)]
    texts = [tokenizer.decode(row) for row in id_rows]
    loop = TranserveLoop(entry / "1", config)
    eos = config["decoder"]["eos_id"]
    rows = []
    served_repo = variant(repo, work / "served-continuous", "continuous")
    process, address = start(served_repo)  # one server for every run: a restart per run costs more than a run
    try:
        for batch in (16, 32):
            sources = np.array([[*row, eos] for row in id_rows[:batch]])  # the texts' ids: 19 pieces + EOS
            offline, served = [], []
            for _ in range(repeats):  # interleaved, so drift on the machine hits both sides alike
                start_t = time.perf_counter()
                loop(sources)
                offline.append(batch * 32 / (time.perf_counter() - start_t))
                served.append(asyncio.run(closed_tokens(address, texts, batch, seconds)))
            rows.append(saturation_row(batch, offline, served))
    finally:
        process.terminate()
        process.wait(60)
    return rows


def saturation_row(batch: int, offline: list[float], served: list[float]) -> dict[str, Any]:
    off, on = statistics.median(offline), statistics.median(served)
    return {"batch / concurrency": batch, "offline loop tok/s": round(off), "served tok/s": round(on),
            "ratio": round(on / off, 2), "target": verdict("≥ 0.90", on >= 0.9 * off)}


def plot(results: dict[str, list[StepResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for mode, style in (("static", "s--"), ("static-64", "d-."), ("continuous", "o-")):
        steps = results[mode]
        ax.plot([r.load for r in steps], [r.latency_ms["p99"] / 1e3 for r in steps], style, label=f"{mode} p99")
        ax.plot([r.load for r in steps], [r.latency_ms["p50"] / 1e3 for r in steps], style, alpha=0.4,
                label=f"{mode} p50")
    cont = results["streamed"]
    ax.plot([r.load for r in cont], [r.extra["time_to_first_token_ms"]["p50"] / 1e3 for r in cont], "^:",
            label="continuous time to first token p50")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s, Poisson)")
    ax.set_ylabel("latency (s)")
    ax.set_title(f"{MODEL}: continuous vs static batching, output lengths {BUDGETS[0]}..{BUDGETS[1]}")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/transerve-bench"))
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per offered rate")
    parser.add_argument("--rates", type=lambda s: [float(v) for v in s.split(",")],
                        default=[2, 4, 6, 8, 12, 16, 20, 24, 28])
    parser.add_argument("--ttft-rates", type=lambda s: [float(v) for v in s.split(",")], default=[4, 12, 20],
                        help="rates of the streamed (time to first token) pass")
    parser.add_argument("--repeats", type=int, default=3, help="saturation repeats (median)")
    parser.add_argument("--saturation-seconds", type=float, default=15.0, help="seconds per saturation run")
    args = parser.parse_args()
    repo = exported(args.work)
    results: dict[str, list[StepResult]] = {}
    for mode in ("static", "static-64", "continuous"):
        batch = 64 if mode == "static-64" else 32
        process, address = start(variant(repo, args.work / f"served-{mode}", mode.split("-")[0], batch))
        try:
            results[mode] = asyncio.run(sweep(address, args.rates, args.seconds, stream=False))
            if mode == "continuous":
                results["streamed"] = asyncio.run(sweep(address, args.ttft_rates, args.seconds, stream=True))
        finally:
            process.terminate()
            process.wait(120)
    load_rows = []
    for mode, steps in results.items():
        for r in steps:
            ttft = r.extra.get("time_to_first_token_ms", {}).get("p50")
            load_rows.append({"mode": "continuous, streamed" if mode == "streamed" else mode,
                              "offered req/s": r.load, "served req/s": round(r.throughput_rps, 1),
                              "tokens/s": round(r.tokens_per_s or 0), "p50 s": round(r.latency_ms["p50"] / 1e3, 2),
                              "p99 s": round(r.latency_ms["p99"] / 1e3, 2),
                              "TTFT p50 ms": {"static": "= latency", "static-64": "= latency",
                                              "continuous": "(unary)"}[mode]
                              if ttft is None else round(ttft),
                              "errors": sum(r.errors.values())})
    compare = []
    for bound in BOUNDS_S:
        static = max(sustained(results["static"], bound), sustained(results["static-64"], bound))
        continuous = sustained(results["continuous"], bound)
        compare.append({"p99 bound s": bound, "static req/s (best of 32, 64)": static, "continuous req/s": continuous,
                        "ratio": round(continuous / static, 2) if static else "∞ (static sustains none swept)",
                        "target": verdict("≥ 2", continuous >= 2 * static and continuous > 0)})
    sat = saturation(repo, args.work, args.saturation_seconds, args.repeats)
    plot_path = results_path(Path(__file__).with_name("RESULTS.md")).parent / "plots" / "continuous-vs-static.png"
    plot(results, plot_path)
    text = (f"{markdown(compare)}\n\nHighest swept rate sustained (≥ 90 % served, no errors) with p99 under the "
            f"bound. Every step:\n\n{markdown(load_rows)}\n\n![latency vs load](plots/{plot_path.name})\n\n"
            f"Saturation, served vs the offline decode loop (median of {args.repeats}):\n\n{markdown(sat)}\n")
    print(text)
    heading = "## Continuous batching"
    write_section(Path(__file__).with_name("RESULTS.md"), heading,
                  f"{heading}: {MODEL} (random weights), open-loop Poisson, output lengths uniform "
                  f"{BUDGETS[0]}..{BUDGETS[1]} tokens, {args.seconds:g} s per rate; server and load generator on "
                  f"the same 2 cores\n\n{command_line()}\n\n{text}")


if __name__ == "__main__":
    main()
