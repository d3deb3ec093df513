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
cancelled is dropped before compute (``on_drop`` counts them). Every future
resolves with a result or an exception; a failing batch fails its own
requests only.

Inline fast path (``inline_below_ms``): a request that finds the batcher idle
(nothing queued, nothing computing) and whose estimated compute is under the
bound runs on the caller's thread — the event loop — instead of waking a
batcher thread and being woken back: two thread hops, about a quarter of a
millisecond of a concurrency-1 round trip on 2 shared cores. Nothing could
have joined its batch. Only while requests come one at a time: a request
that enters ``submit`` while another is still in it (awaiting its batch)
turns the fast path off for ``OVERLAP_HOLD`` seconds. Under load, computing
on the loop would serialise gRPC work and compute that the thread path
overlaps — and since an inline run answers before the loop reads the next
request, inline runs alone would never see that overlap; so after
``INLINE_PROBE`` inline runs in a row one request takes the thread path, and
the requests arriving while it computes reveal the load. Off (0) unless the
model's ``run_batch`` is plain compute that may run on the loop.

Queue-time admission (``max_queue_time_ms``): a request that would wait longer
than the bound is refused at ``submit`` with :class:`QueueFull` rather than
queued to time out later. The expected wait is the batches ahead of it (the
queued items over ``max_batch_size``, plus the one computing) times a moving
average of recent batch times — the larger of compute alone and dispatch-to-dispatch under backlog, which
also counts what surrounds compute when the event loop is saturated — shared over ``instances`` threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from transerve.server.exceptions import DeadlineExceeded, QueueFull

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")


INLINE_PROBE = 8  # inline runs in a row before one request takes the thread path (see above)
OVERLAP_HOLD = 0.1  # seconds without the fast path after two requests overlapped in submit


@dataclass
class BatchStats:
    """Per-batch facts the caller turns into metrics."""

    size: int
    queue_seconds: list[float]
    compute_seconds: float


@dataclass(eq=False)  # identity: the queue removes exactly this request (payloads are arrays)
class _Item(Generic[P, R]):
    payload: P
    size: int
    deadline: float | None
    enqueued: float
    future: asyncio.Future[R] = field(repr=False)


class DynamicBatcher(Generic[P, R]):
    """``run_batch(payloads) -> results`` (one result per payload) runs in the batcher's own threads.

    Each of the ``instances`` threads forms its next batch itself and runs it, so the
    backend starts the next batch the moment the last one returns — results go back
    to the event loop with one ``call_soon_threadsafe`` per batch, off the critical
    path. (Forming batches on the event loop and handing them to an executor put two
    thread hops and the loop's other work between consecutive backend calls: ~1 ms
    per batch on 2 cores, a quarter of a 64-image ViT-digits batch.)
    """

    def __init__(self, run_batch: Callable[[list[P]], Sequence[R]], *, max_batch_size: int,
                 max_queue_delay_ms: float, preferred_batch_sizes: Sequence[int] = (), max_queue_size: int = 256,
                 instances: int = 1, on_batch: Callable[[BatchStats], None] | None = None, name: str = "",
                 flush_when_idle: bool = False, max_queue_time_ms: float | None = None,
                 inline_below_ms: float = 0.0) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.delay = max_queue_delay_ms / 1000.0
        self.preferred = frozenset(preferred_batch_sizes)
        self.max_queue_size = max_queue_size
        self.instances = instances
        self.flush_when_idle = flush_when_idle
        self._on_batch = on_batch
        self.on_drop: Callable[[str, int], None] | None = None  # (reason, count): requests dropped before compute
        self.max_queue_time = None if max_queue_time_ms is None else max_queue_time_ms / 1000.0
        self.inline_below = inline_below_ms / 1000.0
        self._submitting = 0  # submit calls in progress (queued, computing or deciding)
        self._overlap_until = 0.0  # perf_counter instant before which the fast path stays off
        self._inline_streak = 0
        self.item_seconds = 0.0  # moving average of compute time per item: the inline path's estimate
        self.batch_seconds = 0.0  # moving average of compute time per batch (0 until the first batch)
        # moving average of dispatch-to-dispatch time under backlog: compute plus what it costs around it
        # (splitting, delivery, waiting for the GIL while the event loop is busy), which compute alone misses
        self.cycle_seconds = 0.0
        self.name = name
        self._queue: deque[_Item[P, R]] = deque()
        self._queued_items = 0
        self._cond = threading.Condition()  # guards the queue, the counters and _stopping
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False  # no new requests
        self._stopping = False  # threads exit once the queue is empty
        self.in_flight = 0
        self._idle = asyncio.Event()  # nothing queued, nothing running: what a drain waits for
        self._idle.set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._threads = [threading.Thread(target=self._thread_main, name=f"batch-{self.name}-{i}", daemon=True)
                         for i in range(self.instances)]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        """Items waiting: queued, or in a batch still being formed (not yet computing)."""
        return self._queued_items

    async def submit(self, payload: P, size: int = 1, deadline: float | None = None) -> R:
        """Queue one request of ``size`` items; ``deadline`` is a ``time.monotonic()`` instant."""
        if size > self.max_batch_size:
            raise ValueError(f"batch of {size} exceeds max_batch_size {self.max_batch_size}")
        self.check_admission(size)
        self._submitting += 1
        try:
            if self._submitting > 1:
                self._overlap_until = time.perf_counter() + OVERLAP_HOLD
            elif self._may_run_inline(size):
                await asyncio.sleep(0)  # a request the loop already holds may reach submit meanwhile
                if self._may_run_inline(size):
                    return self._run_inline(payload, size)
            self._inline_streak = 0
            return await self._queued(payload, size, deadline)
        finally:
            self._submitting -= 1

    async def _queued(self, payload: P, size: int, deadline: float | None) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        item = _Item(payload, size, deadline, time.monotonic(), future)
        future.add_done_callback(lambda f: self._forget(item) if f.cancelled() else None)
        with self._cond:
            self._queue.append(item)
            self._queued_items += size
            self._idle.clear()
            self._cond.notify()
        return await future  # cancelling this await cancels the future: the thread then skips it

    def _may_run_inline(self, size: int) -> bool:
        """Idle, cheap by the moving average (0 until a batch has been measured), no recent overlap of requests
        in submit, and not the probe's turn."""
        return (self.flush_when_idle and self.in_flight == 0 and not self._queue
                and not self._closing and 0 < size * self.item_seconds <= self.inline_below
                and self._inline_streak < INLINE_PROBE and time.perf_counter() >= self._overlap_until)

    def _run_inline(self, payload: P, size: int) -> R:
        """One request computed on the caller's thread; it counts as in flight, so no thread starts another."""
        self._inline_streak += 1
        with self._cond:
            self.in_flight += 1
            self._idle.clear()
        start = time.perf_counter()
        try:
            result = self._run_batch([payload])[0]
        finally:
            with self._cond:
                self.in_flight -= 1
            self._maybe_idle()
        seconds = time.perf_counter() - start
        self._measured(size, seconds)
        if self._on_batch is not None:
            self._on_batch(BatchStats(size, [0.0], seconds))
        return result

    def _measured(self, size: int, seconds: float) -> None:
        """Fold one batch's compute time into the moving averages (admission's and the inline estimate)."""
        for name, value in (("batch_seconds", seconds), ("item_seconds", seconds / size)):
            average = getattr(self, name)
            setattr(self, name, value if average == 0 else 0.8 * average + 0.2 * value)

    def _forget(self, item: _Item[P, R]) -> None:
        """A cancelled request (client gone, or its gRPC deadline passed) leaves the queue at once, not when the
        batch it would have joined forms: it must not hold a place, nor count as queued (triton#7532)."""
        with self._cond:
            try:
                self._queue.remove(item)
            except ValueError:  # already in a forming batch: wake its thread, which takes it out
                self._cond.notify_all()
                return
            self._queued_items -= item.size
        self._dropped("cancelled_queued", 1)
        self._maybe_idle()

    def check_admission(self, size: int) -> None:
        """Raise :class:`QueueFull` if ``size`` more items would be refused now (closing, queue full, or an
        expected wait over ``max_queue_time_ms``). ``submit`` checks it; callers with work to do before
        submitting (decoding images) check it first, so a request that will be shed costs nothing."""
        if self._closing:
            raise QueueFull(f"model {self.name!r} is shutting down")
        if self._queued_items + size > self.max_queue_size:
            raise QueueFull(f"model {self.name!r}: queue full ({self._queued_items} of {self.max_queue_size} "
                            "items waiting)")
        if self.max_queue_time is not None and (wait := self.expected_wait(size)) > self.max_queue_time:
            raise QueueFull(f"model {self.name!r}: the expected queue wait of {wait * 1000:.0f} ms exceeds "
                            f"max_queue_time_ms {self.max_queue_time * 1000:.0f}")

    def expected_wait(self, size: int = 1) -> float:
        """Seconds a request of ``size`` items would wait now: the batches ahead of it times the average batch."""
        ahead = (self._queued_items + size - 1) // self.max_batch_size + (1 if self.in_flight else 0)
        return ahead * max(self.batch_seconds, self.cycle_seconds) / self.instances

    def _next_batch(self) -> list[_Item[P, R]] | None:
        """Under ``_cond``: the next batch by the flush rules, or None when stopping with nothing left. Requests
        cancelled while their batch forms leave it at once (``_forget`` wakes this thread)."""
        batch: list[_Item[P, R]] = []
        while not batch:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            size, flush_at = 0, self._queue[0].enqueued + self.delay
            while True:
                while self._queue and size + self._queue[0].size <= self.max_batch_size:
                    item = self._queue.popleft()  # still counted as waiting until the batch is dispatched
                    batch.append(item)
                    size += item.size
                batch = self._without_cancelled(batch)
                size = sum(i.size for i in batch)
                if not batch:
                    break  # every request of the forming batch was cancelled: wait for new ones
                full = size == self.max_batch_size or bool(self._queue)  # the head does not fit: flush
                idle = self.flush_when_idle and self.in_flight == 0
                remaining = flush_at - time.monotonic()
                if full or idle or size in self.preferred or remaining <= 0 or self._stopping:
                    return batch
                self._cond.wait(remaining)
        return batch

    def _without_cancelled(self, batch: list[_Item[P, R]]) -> list[_Item[P, R]]:
        """Under ``_cond``: ``batch`` less the requests cancelled meanwhile, which stop counting as queued."""
        gone = [i for i in batch if i.future.cancelled()]
        if not gone:
            return batch
        self._queued_items -= sum(i.size for i in gone)
        now = time.monotonic()  # gRPC cancels a request whose deadline passed: count that one as expired
        self._dropped("expired_queued", sum(1 for i in gone if _expired(i, now)))
        self._dropped("cancelled_queued", sum(1 for i in gone if not _expired(i, now)))
        if self._loop is not None:
            self._post(self._maybe_idle)
        return [i for i in batch if not i.future.cancelled()]

    def _thread_main(self) -> None:
        previous: float | None = None  # this thread's last dispatch, while work was waiting behind it
        while True:
            with self._cond:
                backlog = bool(self._queue)
                batch = self._next_batch()
                if batch is None:
                    return
                self._queued_items -= sum(item.size for item in batch)
                now = time.monotonic()
                if previous is not None:  # dispatch to dispatch with no idle gap: what a batch really takes
                    cycle, average = now - previous, self.cycle_seconds
                    self.cycle_seconds = cycle if average == 0 else 0.8 * average + 0.2 * cycle
                previous = now if backlog or self._queue else None
                live = [i for i in batch if not i.future.done() and not _expired(i, now)]
                expired = [i for i in batch if _expired(i, now)]
                self.in_flight += 1 if live else 0
            self._post(self._fail, expired, DeadlineExceeded("deadline passed while queued"))
            self._dropped("expired_queued", len(expired))
            # cancelled and not expired (a request whose deadline passed is cancelled by gRPC too: count it once)
            self._dropped("cancelled_queued", sum(1 for i in batch if i.future.cancelled() and not _expired(i, now)))
            if live:
                self._run(live, now)
            self._post(self._maybe_idle)

    def _run(self, live: list[_Item[P, R]], dispatched: float) -> None:
        start = time.perf_counter()
        try:
            results = self._run_batch([i.payload for i in live])
            if len(results) != len(live):
                raise RuntimeError(f"backend returned {len(results)} results for {len(live)} requests")
        except Exception as e:  # the batch fails its own requests, never the thread
            log.exception("batch of %d failed on %s", len(live), self.name)
            self._post(self._fail, live, e)
            return
        finally:
            with self._cond:
                self.in_flight -= 1
        stats = BatchStats(sum(i.size for i in live), [dispatched - i.enqueued for i in live],
                           time.perf_counter() - start)
        self._measured(stats.size, stats.compute_seconds)
        self._post(self._deliver, live, results, stats)

    def _dropped(self, reason: str, count: int) -> None:
        if count and self.on_drop is not None:
            self.on_drop(reason, count)

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        if callback is not self._fail or args[0]:
            self._loop.call_soon_threadsafe(callback, *args)

    def _deliver(self, live: list[_Item[P, R]], results: Sequence[R], stats: BatchStats) -> None:
        for item, result in zip(live, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
        if self._on_batch is not None:
            self._on_batch(stats)

    @staticmethod
    def _fail(items: list[_Item[P, R]], error: BaseException) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    def _maybe_idle(self) -> None:
        if self._queued_items == 0 and self.in_flight == 0:
            self._idle.set()

    async def aclose(self, grace: float = 30.0) -> None:
        """Stop taking requests, finish what is queued and running (up to ``grace`` s), then stop."""
        self._closing = True
        try:
            if not self._idle.is_set():  # wait_for with no time left times out even on a set event
                await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("%s: %d requests still queued after %.0f s grace", self.name, len(self._queue), grace)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
            self._stopping = True
            self._cond.notify_all()
        self._fail(left, QueueFull(f"model {self.name!r} shut down"))
        for thread in self._threads:
            await asyncio.to_thread(thread.join)


def _expired(item: _Item[Any, Any], now: float) -> bool:
    return item.deadline is not None and now > item.deadline
