"""One intra-op thread for the small batches of a small model, where that measures faster.

ONNX Runtime's intra-op pool splits each node's work across its threads and joins them after it. For a model
that computes a request in tens of microseconds the fork–join costs more than it saves: vit-digits at batch 1
on 2 cores ran in 71–74 µs on one thread and 86–148 µs on two (offline, several runs), while at batch 64 two
threads win (1.8 vs 2.8 ms). So a model
whose graph is small (a second session holds a second copy of its weights) gets a one-thread session beside
its pool session, and batches up to the crossover measured at load — on this CPU, with zeros of the graph's
own input types — run on it. At concurrency 1 that shortens the round trip's ORT time; at concurrency 32
(batches of a few images) the CPU the pool's second thread spent spinning and joining goes to gRPC instead.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_GRAPH_BYTES = 64 << 20  # the one-thread session doubles the weights in memory: small graphs only
SIZES = (1, 2, 4, 8, 16)  # batch sizes measured, in order, up to the model's max_batch_size (above 16 the pool wins)
MARGIN = 0.9  # one thread takes a size only when it runs in ≤ 90 % of the pool's time (noise is ± a few %)
REPEATS = 15
WARMUP = 5

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
           "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def example_feeds(session: Any, batch: int) -> dict[str, np.ndarray] | None:
    """Zeros of each input's type with ``batch`` on the first axis (other free axes 1); None when an input has
    no free first axis or a type this cannot make."""
    feeds: dict[str, np.ndarray] = {}
    for spec in session.get_inputs():
        if not spec.shape or isinstance(spec.shape[0], int) or spec.type not in _DTYPES:
            return None
        shape = [batch] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
        feeds[spec.name] = np.zeros(shape, _DTYPES[spec.type])
    return feeds


def paired_seconds(first: Any, second: Any, feeds: dict[str, np.ndarray]) -> tuple[float, float]:
    """Median run time of each session on ``feeds``, their runs alternated so that drift on a shared machine
    hits both alike."""
    for _ in range(WARMUP):
        first.run(None, feeds)
        second.run(None, feeds)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(REPEATS):
        for session, spent in zip((first, second), times, strict=True):
            start = time.perf_counter()
            session.run(None, feeds)
            spent.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def crossover(seconds: Callable[[int], tuple[float, float]], sizes: list[int]) -> tuple[int, list[str]]:
    """The largest size up to which, size after size, one thread (the pair's second) is faster than the pool
    (its first) by the margin — 0: not even at the first size — and what was measured, for the log."""
    up_to, measured = 0, []
    for size in sizes:
        pool, single = seconds(size)
        measured.append(f"{size}: {single * 1e6:.0f} vs {pool * 1e6:.0f} µs")
        if single > MARGIN * pool:
            break
        up_to = size
    return up_to, measured


def single_thread_session(path: Path, pool: Any, make_session: Callable[[int], Any], max_batch: int
                          ) -> tuple[Any | None, int]:
    """A one-thread session over ``path`` and the batch size up to which it runs, or ``(None, 0)`` when the
    graph is too big, its inputs cannot be made up, or one thread is not faster even at the smallest batch."""
    weights = sum(p.stat().st_size for p in path.parent.glob(f"{path.stem}*") if p.is_file())
    sizes = [s for s in SIZES if s <= max_batch]
    if weights > MAX_GRAPH_BYTES or not sizes or example_feeds(pool, 1) is None:
        return None, 0
    single = make_session(1)
    up_to, measured = crossover(lambda n: paired_seconds(pool, single, example_feeds(pool, n)),  # type: ignore[arg-type]
                                sizes)
    log.info("%s: batches up to %d on one intra-op thread (one vs the pool, by batch size: %s)", path.name,
             up_to, "; ".join(measured))
    return (single, up_to) if up_to else (None, 0)
