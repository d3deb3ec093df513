"""What the reliability tests read off a server process from outside, and the figures they leave behind.

A server's own account comes from its Prometheus endpoint (gauges and counters by name and labels); what it
holds comes from ``/proc`` (threads, open file descriptors, resident memory), so a test sees what an operator
would. Each test records its figures (requests sent, by status, shed rate, RSS growth…) as JSON lines in
``$TRANSERVE_FIGURES`` (default ``.reliability/figures.jsonl`` under the project root, git-ignored);
``bench/reliability_report.py`` turns the last run's lines into RELIABILITY.md's table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from helpers import ServerProcess, scrape, total

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ProcessCounts:
    threads: int
    fds: int
    rss_mb: float


def thread_names(pid: int) -> dict[str, int]:
    """How many of the process's threads bear each name (what grew, when a count grows)."""
    names: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            name = (task / "comm").read_text().strip()
            names[name] = names.get(name, 0) + 1
    return names


def counts(pid: int) -> ProcessCounts:
    proc = Path(f"/proc/{pid}")
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
    return ProcessCounts(int(status["Threads"]), len(os.listdir(proc / "fd")), int(status["VmRSS"].split()[0]) / 1024)


def settled(server: ServerProcess, models: list[str]) -> bool:
    """No request in the server's queues, decode batches or caches, for every model named."""
    samples = scrape(server)
    return all(total(samples, gauge, model=model) == 0 for model in models
               for gauge in ("transerve_queue_length", "transerve_active_sequences", "transerve_cached_tokens"))


def record_figures(test: str, **figures: object) -> None:
    """Append one test's figures to the run's figures file (read by bench/reliability_report.py)."""
    path = Path(os.environ.get("TRANSERVE_FIGURES", ROOT / ".reliability" / "figures.jsonl"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps({"test": test, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}) + "\n")


@dataclass(frozen=True)
class Outcome:
    code: str  # grpc.StatusCode name
    seconds: float
    message: str = ""


async def timed(call: Callable[[], Awaitable[object]]) -> Outcome:
    """One call's status name and latency (client side)."""
    start = time.perf_counter()
    try:
        await call()
    except grpc.aio.AioRpcError as e:
        return Outcome(e.code().name, time.perf_counter() - start, e.details() or "")
    return Outcome("OK", time.perf_counter() - start)


async def closed_loop(call: Callable[[], Awaitable[object]], concurrency: int, seconds: float) -> list[Outcome]:
    """``concurrency`` callers, each calling again as soon as its last call ends, for ``seconds``."""
    end, outcomes = time.monotonic() + seconds, []

    async def caller() -> None:
        while time.monotonic() < end:
            outcomes.append(await timed(call))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return outcomes


async def open_loop(call: Callable[[], Awaitable[object]], rate: float, seconds: float
                    ) -> tuple[list[Outcome], float]:
    """Calls started at a fixed ``rate`` per second for ``seconds``, whether or not earlier ones have ended
    (open loop: arrivals do not slow down when the server does). Also returns the seconds from the last
    arrival until the last answer: how long the server took to work off what the overload left queued."""
    start, tasks = time.monotonic(), []
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(timed(call)))
    last_arrival = time.monotonic()
    outcomes = list(await asyncio.gather(*tasks))
    return outcomes, time.monotonic() - last_arrival


def ok_rate(outcomes: list[Outcome], seconds: float) -> float:
    return sum(o.code == "OK" for o in outcomes) / seconds


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0
