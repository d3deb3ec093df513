"""``transerve-loadtest``: closed-loop concurrency sweeps and open-loop Poisson load against a transerve server.

Closed loop (``--concurrency 1,2,4,8``): that many requests always in flight, one step per value.
Open loop (``--rate R``): requests start at Poisson arrival times at R/s whatever the latency, so queueing
shows up as latency (a closed loop would hide it). Every step: warm-up, then a ``--duration`` or
``--requests`` bound; throughput, p50/p90/p99/max latency, errors by status code and, for translation,
generated tokens/s (``--max-new-tokens LO:HI`` mixes output lengths; ``--stream`` uses TranslateStream and
adds time-to-first-token percentiles). Results: a live progress line, ``--json``, ``--csv`` and a ``--plot``
PNG of latency against throughput. Only loopback targets unless ``--allow-remote``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import ipaddress
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from transerve_client import _requests as rq
from transerve_client._proto import inference_pb2 as ipb
from transerve_client._proto import inference_pb2_grpc as ipb_grpc
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc
from transerve_client.targets import ROUND_ROBIN, channel_target, target_hosts

# Built-in payloads, so a load test needs nothing but the server: English number words (the zoo translator's
# language) and an 8×8 digit-like image (the zoo classifier's) — a Hann window, np.outer(np.hanning(8),
# np.hanning(8)) × 255 — encoded as PNG once, here, so the client package needs no Pillow to send it.
TEXTS = ["three hundred and forty-two", "nineteen eighty-four", "seven thousand, two hundred and five",
         "forty-second", "one hundred and one", "ninety-nine thousand, nine hundred and ninety-nine"]
DIGIT_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAAN0lEQVR42mNggAJGBk4RAYYPb74zM0g6+Zmwv/zEwiBgGsTAcO4xE0wNC8OH0wwMpz"
    "8gFMNkGAD1wQ6NCscgCQAAAABJRU5ErkJggg==")


@dataclass
class StepResult:
    mode: str
    load: float  # concurrency, or offered rate in requests/s
    requests: int
    seconds: float
    throughput_rps: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    tokens_per_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_target(url: str, allow_remote: bool) -> None:
    """Every server the target names must be on this machine unless ``--allow-remote``."""
    try:
        hosts = target_hosts(url)
    except ValueError as e:
        raise SystemExit(f"error: --url: {e}") from None
    for host in hosts:
        if allow_remote or host == "localhost":
            continue
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise SystemExit(f"error: {host} in {url} is not a loopback address; pass --allow-remote to load-test it")


@dataclass(frozen=True)
class TranslateLoad:
    """What a translation request asks for: output budgets drawn uniformly from ``budget`` (mixed output
    lengths), streamed or not (streaming measures time to first token)."""

    budget: tuple[int, int] | None = None
    stream: bool = False
    seed: int = 0


class Workload:
    """One request kind: builds the message once, sends it, counts what it produced."""

    def __init__(self, channel: grpc.aio.Channel, task: str, model: str | None, batch: int,
                 metadata: list[tuple[str, str]], infer_inputs: dict[str, np.ndarray] | None = None,
                 translate: TranslateLoad = TranslateLoad()) -> None:
        self.metadata = metadata
        self.tokens = 0
        self.first_token: list[float] = []  # streamed translation: seconds to the first message of each stream
        self.translate, self.rng, self.sent = translate, random.Random(translate.seed), 0
        if task == "translate":
            self.stub = tpb_grpc.TranslatorStub(channel)
            self.message = rq.translate_request([TEXTS[i % len(TEXTS)] for i in range(batch)], model,
                                                  rq.translate_options())
            self.method: Callable[..., Awaitable[Any]] = self.stub.Translate
            self.count = lambda r: sum(t.tokens for t in r.translations)
            self.model = model
        elif task == "classify":
            self.message = rq.classify_request([DIGIT_PNG] * batch, model, 1)
            self.method = tpb_grpc.ClassifierStub(channel).Classify
        elif task == "infer":
            assert model and infer_inputs is not None  # run() checked and built them from the metadata
            self.message = rq.infer_request(model, infer_inputs)
            self.method = ipb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        elif task == "live":  # the lightest RPC there is: measures the load generator and gRPC themselves
            self.message = ipb.ServerLiveRequest()
            self.method = ipb_grpc.GRPCInferenceServiceStub(channel).ServerLive
        else:
            raise SystemExit(f"error: unknown task {task!r}")
        self.task = task

    def _budget(self) -> int | None:
        return None if self.translate.budget is None else self.rng.randint(*self.translate.budget)

    async def send(self, timeout: float) -> tuple[float, str]:
        start = time.perf_counter()
        try:
            if self.task == "translate" and (self.translate.stream or self.translate.budget):
                await self._send_translation(start, timeout)
            else:
                response = await self.method(self.message, timeout=timeout, metadata=self.metadata)
                if self.task == "translate":
                    self.tokens += self.count(response)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        return time.perf_counter() - start, code

    async def _send_translation(self, start: float, timeout: float) -> None:
        text, budget = TEXTS[self.sent % len(TEXTS)], self._budget()
        self.sent += 1
        if not self.translate.stream:
            request = rq.translate_request([text], self.model, rq.translate_options(max_new_tokens=budget))
            response = await self.stub.Translate(request, timeout=timeout, metadata=self.metadata)
            self.tokens += self.count(response)  # not `+= f(await …)`: that reads the total before awaiting
            return
        request = rq.stream_request(text, self.model)
        request.options.max_new_tokens = budget or 0
        first = True
        async for message in self.stub.TranslateStream(request, timeout=timeout, metadata=self.metadata):
            if first:  # the first message, a piece or (when no token made text) the end: one sample per stream
                self.first_token.append(time.perf_counter() - start)
                first = False
            if message.done:
                self.tokens += message.tokens


def summarise(mode: str, load: float, samples: list[tuple[float, str]], seconds: float,
              tokens: int | None, first_token: Sequence[float] = ()) -> StepResult:
    ok = np.array([lat for lat, code in samples if code == "OK"]) * 1e3
    pct = {f"p{q}": float(np.percentile(ok, q)) if len(ok) else float("nan") for q in (50, 90, 99)}
    pct["max"] = float(ok.max()) if len(ok) else float("nan")
    errors = dict(Counter(code for _, code in samples if code != "OK"))
    extra: dict[str, Any] = {}
    if len(first_token):
        ttft = np.array(first_token) * 1e3
        extra["time_to_first_token_ms"] = {f"p{q}": float(np.percentile(ttft, q)) for q in (50, 90, 99)}
    return StepResult(mode, load, len(samples), seconds, len(ok) / seconds, pct, errors,
                      None if tokens is None else tokens / seconds, extra)


class Progress:
    """One live line on stderr (a terminal) — never in the JSON/CSV output."""

    def __init__(self, label: str) -> None:
        self.label, self.last = label, 0.0

    def update(self, done: int, elapsed: float) -> None:
        now = time.monotonic()
        if now - self.last >= 0.5 and sys.stderr.isatty():
            self.last = now
            sys.stderr.write(f"\r{self.label}: {done} requests, {done / max(elapsed, 1e-9):.0f}/s   ")
            sys.stderr.flush()

    def close(self) -> None:
        if sys.stderr.isatty():
            sys.stderr.write("\n")


async def closed_loop(work: Workload, concurrency: int, duration: float | None, requests: int | None,
                      timeout: float) -> StepResult:
    samples: list[tuple[float, str]] = []
    stop_at = time.perf_counter() + (duration or 1e9)
    budget = requests or 10**12
    progress = Progress(f"concurrency {concurrency}")
    work.tokens, work.first_token = 0, []
    start = time.perf_counter()

    issued = 0

    async def worker() -> None:
        nonlocal issued
        while time.perf_counter() < stop_at and issued < budget:
            issued += 1  # reserve before awaiting, so concurrent workers never overshoot the budget
            samples.append(await work.send(timeout))
            progress.update(len(samples), time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    progress.close()
    return summarise("closed", concurrency, samples, time.perf_counter() - start,
                     work.tokens if work.task == "translate" else None, work.first_token)


async def open_loop(work: Workload, rate: float, duration: float | None, requests: int | None, timeout: float,
                    seed: int = 0) -> StepResult:
    rng = random.Random(seed)
    count = requests or int(rate * (duration or 10))
    samples: list[tuple[float, str]] = []
    progress = Progress(f"rate {rate:g}/s")
    work.tokens, work.first_token = 0, []
    start = time.perf_counter()
    pending: list[asyncio.Task[None]] = []

    async def one() -> None:
        samples.append(await work.send(timeout))
        progress.update(len(samples), time.perf_counter() - start)

    at = start
    for _ in range(count):
        at += rng.expovariate(rate)  # Poisson arrivals: exponential gaps
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the arrival schedule, not waiting for a condition
        pending.append(asyncio.create_task(one()))
    await asyncio.gather(*pending)
    progress.close()
    return summarise("open", rate, samples, time.perf_counter() - start,
                     work.tokens if work.task == "translate" else None, work.first_token)


async def infer_inputs(channel: grpc.aio.Channel, model: str | None, batch: int,
                       metadata: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Zero-filled inputs shaped as the model's metadata says (-1 → ``batch``); numeric inputs only."""
    if not model:
        raise SystemExit("error: --task infer needs --model")
    meta = await ipb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(ipb.ModelMetadataRequest(name=model),
                                                                          metadata=metadata)
    dtypes = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
    inputs = {}
    for t in meta.inputs:
        if t.datatype not in dtypes:
            raise SystemExit(f"error: --task infer makes numeric payloads; input {t.name!r} is {t.datatype}")
        inputs[t.name] = np.zeros([batch if d < 0 else d for d in t.shape], dtypes[t.datatype])
    return inputs


async def run(args: argparse.Namespace) -> list[StepResult]:
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    async with grpc.aio.insecure_channel(channel_target(args.url), [ROUND_ROBIN]) as channel:
        inputs = await infer_inputs(channel, args.model, args.batch, metadata) if args.task == "infer" else None
        work = Workload(channel, args.task, args.model, args.batch, metadata, inputs,
                        TranslateLoad(args.max_new_tokens, args.stream))
        for _ in range(args.warmup):
            _, code = await work.send(args.timeout)
            if code != "OK":
                raise SystemExit(f"error: warm-up request failed with {code} (is {args.url} serving {args.task}?)")
        results = []
        if args.rate:
            for rate in args.rate:
                results.append(await open_loop(work, rate, args.duration, args.requests, args.timeout))
        else:
            for concurrency in args.concurrency:
                results.append(await closed_loop(work, concurrency, args.duration, args.requests, args.timeout))
        return results


def write_csv(path: Path, results: Sequence[StepResult]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode", "load", "requests", "seconds", "throughput_rps", "p50_ms", "p90_ms", "p99_ms",
                         "max_ms", "errors", "tokens_per_s"])
        for r in results:
            writer.writerow([r.mode, r.load, r.requests, round(r.seconds, 3), round(r.throughput_rps, 2),
                             *(round(r.latency_ms[k], 3) for k in ("p50", "p90", "p99", "max")),
                             sum(r.errors.values()), "" if r.tokens_per_s is None else round(r.tokens_per_s, 1)])


def write_plot(path: Path, results: Sequence[StepResult], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install 'transerve-client[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [r.throughput_rps for r in results]
    for key, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax.plot(x, [r.latency_ms[key] for r in results], style, label=key)
    for r in results:
        ax.annotate(f"{r.load:g}", (r.throughput_rps, r.latency_ms["p50"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def budget_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or LO:HI") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= LO <= HI")
    return bounds


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="transerve-loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="127.0.0.1:8001", help="server host:port, several as a,b (IP literals), or "
                   "dns:///name:port; several are balanced per call (round_robin) (default %(default)s)")
    p.add_argument("--task", default="classify", choices=["classify", "translate", "infer", "live"],
                   help="request kind; 'live' is ServerLive, the trivial request (default %(default)s)")
    p.add_argument("--model", help="model name (default: the server's default for the task)")
    p.add_argument("--batch", type=int, default=1, help="images or texts per request (default %(default)s)")
    p.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8],
                   help="closed-loop sweep, comma-separated (default 1,2,4,8)")
    p.add_argument("--rate", type=lambda s: [float(v) for v in s.split(",")],
                   help="open loop instead: Poisson arrival rates in requests/s, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per step (default %(default)s)")
    p.add_argument("--requests", type=int, help="requests per step (instead of --duration)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up requests before measuring")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per request, seconds")
    p.add_argument("--max-new-tokens", type=budget_range, metavar="N|LO:HI",
                   help="translate: output budget per request, or drawn uniformly from LO..HI (mixed lengths)")
    p.add_argument("--stream", action="store_true",
                   help="translate: use TranslateStream and report time to first token")
    p.add_argument("--token", help="bearer token")
    p.add_argument("--json", type=Path, help="write results as JSON here")
    p.add_argument("--csv", type=Path, help="write results as CSV here")
    p.add_argument("--plot", type=Path, help="write a latency-vs-throughput PNG here")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    args = p.parse_args(argv)
    if args.requests is not None:
        args.duration = None
    return args


def fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (it is with the server package): less CPU per request, so one load-test
    process drives more load; asyncio's own loop otherwise (``pip install ./clients`` alone)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_target(args.url, args.allow_remote)
    with asyncio.Runner(loop_factory=fast_loop_factory()) as runner:
        results = runner.run(run(args))
    for r in results:
        print(f"{r.mode} {r.load:g}: {r.throughput_rps:.1f} req/s, p50 {r.latency_ms['p50']:.2f} ms, "
              f"p90 {r.latency_ms['p90']:.2f}, p99 {r.latency_ms['p99']:.2f}, max {r.latency_ms['max']:.2f}, "
              f"errors {r.errors or 0}" + (f", {r.tokens_per_s:.0f} tokens/s" if r.tokens_per_s else "")
              + (f", first token p50 {r.extra['time_to_first_token_ms']['p50']:.1f} ms"
                 if "time_to_first_token_ms" in r.extra else ""))
    if args.json:
        steps = [asdict(r) for r in results]
        best = max(results, key=lambda r: r.throughput_rps)
        summary = {"throughput_rps": best.throughput_rps, "latency_ms": best.latency_ms,
                   "errors": dict(sum((Counter(r.errors) for r in results), Counter())),
                   "tokens_per_s": best.tokens_per_s, "steps": steps}
        args.json.write_text(json.dumps(summary, indent=2))
    if args.csv:
        write_csv(args.csv, results)
    if args.plot:
        write_plot(args.plot, results, f"transerve {args.task} ({'open' if args.rate else 'closed'} loop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
