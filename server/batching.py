"""Dynamic batcher: merge concurrent requests into one backend call, off the event loop.

Contract: requests queue in arrival order. A batch is flushed when it holds
``max_batch_size`` items, when it reaches one of ``preferred_batch_sizes``
and nothing else is waiting, or ``max_queue_delay_ms`` after its first item
arrived — whichever comes first. With ``flush_when_idle`` a batch is also
flushed at once when no batch is computing: waiting only pays while the
backend is busy, so a lone request adds no delay, and under load the
requests that arrive during one batch's compute form the next batch. A request never splits across batches; one
that does not fit waits at the head for the next batch. ``submit`` on a full
queue raises :class:`QueueFull` at once (the servicer answers
``RESOURCE_EXHAUSTED``). A request whose deadline passed or whose caller
cancelled is dropped before compute. Every future resolves with a result or
an exception; a failing batch fails its own requests only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")


class QueueFull(RuntimeError):
    """The model's queue is at ``max_queue_size``."""


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed while it waited."""


@dataclass
class BatchStats:
    """Per-batch facts the caller turns into metrics."""

    size: int
    queue_seconds: list[float]
    compute_seconds: float


@dataclass
class _Item(Generic[P, R]):
    payload: P
    size: int
    deadline: float | None
    enqueued: float
    future: asyncio.Future[R] = field(repr=False)


class DynamicBatcher(Generic[P, R]):
    """``run_batch(payloads) -> results`` (one result per payload) runs in a worker thread."""

    def __init__(self, run_batch: Callable[[list[P]], Sequence[R]], *, max_batch_size: int,
                 max_queue_delay_ms: float, preferred_batch_sizes: Sequence[int] = (), max_queue_size: int = 256,
                 instances: int = 1, on_batch: Callable[[BatchStats], None] | None = None, name: str = "",
                 flush_when_idle: bool = False) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.delay = max_queue_delay_ms / 1000.0
        self.preferred = frozenset(preferred_batch_sizes)
        self.max_queue_size = max_queue_size
        self.instances = instances
        self.flush_when_idle = flush_when_idle
        self._on_batch = on_batch
        self.name = name
        self._queue: deque[_Item[P, R]] = deque()
        self._queued_items = 0
        self._arrived = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=f"batch-{name}")
        self._closing = False
        self.in_flight = 0
        self._idle = asyncio.Event()  # nothing queued, nothing running: what a drain waits for
        self._idle.set()

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._worker(), name=f"batcher-{self.name}-{i}")
                         for i in range(self.instances)]

    @property
    def queued(self) -> int:
        """Items waiting: queued, or in a batch still being formed (not yet computing)."""
        return self._queued_items

    async def submit(self, payload: P, size: int = 1, deadline: float | None = None) -> R:
        """Queue one request of ``size`` items; ``deadline`` is a ``time.monotonic()`` instant."""
        if self._closing:
            raise QueueFull(f"model {self.name!r} is shutting down")
        if size > self.max_batch_size:
            raise ValueError(f"batch of {size} exceeds max_batch_size {self.max_batch_size}")
        if self._queued_items + size > self.max_queue_size:
            raise QueueFull(f"model {self.name!r}: queue full ({self._queued_items} of {self.max_queue_size} "
                            "items waiting)")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(payload, size, deadline, time.monotonic(), future))
        self._queued_items += size
        self._idle.clear()
        self._arrived.set()
        return await future  # cancelling this await cancels the future: the worker then skips it

    async def _next_batch(self) -> list[_Item[P, R]]:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        batch, size = [], 0
        flush_at = self._queue[0].enqueued + self.delay
        while True:
            while self._queue and size + self._queue[0].size <= self.max_batch_size:
                item = self._queue.popleft()  # still counted as waiting until the batch is dispatched
                batch.append(item)
                size += item.size
            full = size == self.max_batch_size or bool(self._queue)  # the head does not fit: flush
            idle = self.flush_when_idle and self.in_flight == 0
            remaining = flush_at - time.monotonic()
            if full or idle or (size in self.preferred) or remaining <= 0:
                return batch
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self._queued_items -= sum(item.size for item in batch)
            now = time.monotonic()
            live = []
            for item in batch:
                if item.future.done():  # cancelled by its caller while queued
                    continue
                if item.deadline is not None and now > item.deadline:
                    item.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                    continue
                live.append(item)
            if not live:
                self._maybe_idle()
                continue
            self.in_flight += 1
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [i.payload for i in live])
                if len(results) != len(live):
                    raise RuntimeError(f"backend returned {len(results)} results for {len(live)} requests")
            except Exception as e:  # the batch fails its own requests, never the worker
                log.exception("batch of %d failed on %s", len(live), self.name)
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            finally:
                self.in_flight -= 1
                self._maybe_idle()
            compute = time.perf_counter() - start
            for item, result in zip(live, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
            if self._on_batch is not None:
                self._on_batch(BatchStats(sum(i.size for i in live), [now - i.enqueued for i in live], compute))

    def _maybe_idle(self) -> None:
        if not self._queue and self.in_flight == 0:
            self._idle.set()

    async def aclose(self, grace: float = 30.0) -> None:
        """Stop taking requests, finish what is queued and running (up to ``grace`` s), then stop."""
        self._closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("%s: %d requests still queued after %.0f s grace", self.name, len(self._queue), grace)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(QueueFull(f"model {self.name!r} shut down"))
        self._executor.shutdown(wait=True)

