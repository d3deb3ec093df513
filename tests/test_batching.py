"""The dynamic batcher's contract, with a recording fake backend (every wait is on a condition, bounded)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest
from helpers import until
from transerve.server.engine import batching
from transerve.server.engine.batching import INLINE_PROBE, DynamicBatcher
from transerve.server.exceptions import DeadlineExceeded, QueueFull


class Recorder:
    """Doubles its inputs; records each batch; can be held closed to pile requests up."""

    async def wait_entered(self) -> None:
        """Until a batch is inside the backend (a condition, not a guess at timing)."""
        assert await asyncio.to_thread(self.entered.wait, 10)
        self.entered.clear()

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()  # set when a batch reaches the backend
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False
        self.threads: list[str] = []  # where each batch ran: a batcher thread, or the caller's (inline)

    def __call__(self, payloads: list[int]) -> Sequence[int]:
        self.entered.set()
        self.threads.append(threading.current_thread().name)
        self.gate.wait(10)
        self.batches.append(list(payloads))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("backend exploded")
        return [2 * p for p in payloads]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 20))


async def started(backend: Recorder, **kwargs) -> DynamicBatcher[int, int]:  # type: ignore[no-untyped-def]
    options = {"max_batch_size": 8, "max_queue_delay_ms": 50.0, **kwargs}
    batcher: DynamicBatcher[int, int] = DynamicBatcher(backend, **options)  # type: ignore[arg-type]
    batcher.start()
    return batcher


def test_concurrent_requests_share_one_call() -> None:
    async def main() -> None:
        backend = Recorder()
        batcher = await started(backend, max_queue_delay_ms=1000.0)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(8)))
        assert results == [2 * i for i in range(8)]
        assert backend.batches == [list(range(8))]  # flushed on reaching max_batch_size, not after 1 s
        await batcher.aclose()

    run(main())


def test_a_lone_request_is_flushed_after_the_delay() -> None:
    async def main() -> None:
        backend = Recorder()
        batcher = await started(backend, max_queue_delay_ms=30.0)
        start = time.monotonic()
        assert await batcher.submit(21) == 42
        assert time.monotonic() - start >= 0.025
        await batcher.aclose()

    run(main())


def test_preferred_size_flushes_early_and_max_is_respected() -> None:
    async def main() -> None:
        backend = Recorder()
        batcher = await started(backend, max_batch_size=4, max_queue_delay_ms=5000.0, preferred_batch_sizes=[2])
        assert await asyncio.gather(batcher.submit(1), batcher.submit(2)) == [2, 4]
        backend.entered.clear()
        backend.gate.clear()  # hold the backend: the next requests pile up behind a running batch
        blocker = asyncio.ensure_future(batcher.submit(9, size=4))  # a full batch is flushed at once
        await backend.wait_entered()
        first = asyncio.ensure_future(batcher.submit(0))
        rest = [asyncio.ensure_future(batcher.submit(i, size=2)) for i in range(3)]
        await until(lambda: batcher.queued == 7, "1 + 3 × 2 items queued behind the running batch")
        backend.gate.set()
        await asyncio.gather(blocker, first, *rest)
        # queued 1 + 2 + 2 + 2 items: [0, 0'] (the next does not fit in 4), then [1', 2']
        assert backend.batches[1:] == [[9], [0, 0], [1, 2]]
        await batcher.aclose()

    run(main())


def test_full_queue_is_refused_at_once() -> None:
    async def main() -> None:
        backend = Recorder()
        backend.gate.clear()
        batcher = await started(backend, max_batch_size=2, max_queue_size=4, max_queue_delay_ms=0.0)
        running = asyncio.ensure_future(batcher.submit(0, size=2))
        await backend.wait_entered()  # taken by the worker, blocked in the backend
        queued = [asyncio.ensure_future(batcher.submit(i, size=2)) for i in range(2)]
        await until(lambda: batcher.queued == 4, "the queue full: 2 requests of 2 items")
        with pytest.raises(QueueFull, match="queue full"):
            await batcher.submit(99)
        backend.gate.set()
        await asyncio.gather(running, *queued)
        await batcher.aclose()

    run(main())


def test_expired_and_cancelled_requests_are_not_computed() -> None:
    async def main() -> None:
        backend = Recorder()
        backend.gate.clear()
        batcher = await started(backend, max_batch_size=1, max_queue_delay_ms=0.0)
        blocker = asyncio.ensure_future(batcher.submit(0))
        await backend.wait_entered()
        deadline = time.monotonic() + 0.001
        expired = asyncio.ensure_future(batcher.submit(1, deadline=deadline))
        cancelled = asyncio.ensure_future(batcher.submit(2))
        kept = asyncio.ensure_future(batcher.submit(3))
        # the three wait in the queue, and the 1 ms deadline passes while they do
        await until(lambda: batcher.queued == 3 and time.monotonic() > deadline, "queued past the deadline")
        cancelled.cancel()
        backend.gate.set()
        assert await blocker == 0 and await kept == 6
        with pytest.raises(DeadlineExceeded):
            await expired
        assert backend.batches == [[0], [3]]
        await batcher.aclose()

    run(main())


def test_a_failing_batch_fails_only_its_requests() -> None:
    async def main() -> None:
        backend = Recorder()
        batcher = await started(backend, max_queue_delay_ms=0.0)
        backend.fail_next = True
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit(1)
        assert await batcher.submit(2) == 4  # the worker survived
        await batcher.aclose()

    run(main())


def test_backend_must_answer_every_request() -> None:
    async def main() -> None:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(lambda p: [], max_batch_size=4, max_queue_delay_ms=0.0)
        batcher.start()
        with pytest.raises(RuntimeError, match="0 results for 1"):
            await batcher.submit(1)
        await batcher.aclose()

    run(main())


def test_flush_when_idle_does_not_wait_for_the_delay() -> None:
    async def main() -> None:
        backend = Recorder()
        batcher = await started(backend, max_queue_delay_ms=5000.0, flush_when_idle=True)
        assert await asyncio.wait_for(batcher.submit(4), 2) == 8  # idle backend: no 5 s wait
        backend.entered.clear()
        backend.gate.clear()
        running = asyncio.ensure_future(batcher.submit(1))
        await backend.wait_entered()  # busy now: the next ones gather into one batch
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3, 4)]
        await until(lambda: batcher.queued == 3, "three requests queued behind the busy backend")
        backend.gate.set()
        await asyncio.gather(running, *waiting)
        assert backend.batches[-2:] == [[1], [2, 3, 4]]
        await batcher.aclose()

    run(main())


def test_close_finishes_accepted_work() -> None:
    async def main() -> None:
        backend = Recorder()
        batcher = await started(backend, max_batch_size=2, max_queue_delay_ms=20.0)
        backend.gate.clear()  # the first batch holds in the backend until all five are accepted
        pending = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
        await backend.wait_entered()
        await until(lambda: batcher.queued == 3, "the other three accepted into the queue")
        backend.gate.set()
        await batcher.aclose(grace=10)
        assert [p.result() for p in pending] == [0, 2, 4, 6, 8]
        with pytest.raises(QueueFull, match="shutting down"):
            await batcher.submit(1)

    run(main())


def test_lone_cheap_requests_run_inline_with_a_thread_probe() -> None:
    """Measured cheap and alone: computed on the caller's (event loop) thread, but every INLINE_PROBE + 1-th
    request takes a batcher thread; the first one does too, since nothing has been measured yet."""
    async def main() -> None:
        backend = Recorder()
        batcher = await started(backend, flush_when_idle=True, inline_below_ms=1000.0)
        results = [await batcher.submit(i) for i in range(2 * INLINE_PROBE + 2)]
        assert results == [2 * i for i in range(2 * INLINE_PROBE + 2)]
        main_thread = threading.current_thread().name
        on_caller = [name == main_thread for name in backend.threads]
        assert on_caller == [False] + [True] * INLINE_PROBE + [False] + [True] * INLINE_PROBE
        assert batcher.in_flight == 0 and batcher.queued == 0
        await batcher.aclose()

    run(main())


def test_overlapping_requests_batch_on_the_thread_and_hold_inline_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests that meet in submit batch as before, and a lone request soon after does not run inline."""
    monkeypatch.setattr(batching, "OVERLAP_HOLD", 3600.0)  # "soon" may be slow on a loaded CI machine

    async def main() -> None:
        backend = Recorder()
        batcher = await started(backend, flush_when_idle=True, inline_below_ms=1000.0)
        await batcher.submit(0)  # measured: cheap from now on
        assert await asyncio.gather(*(batcher.submit(i) for i in range(1, 7))) == [2 * i for i in range(1, 7)]
        assert await batcher.submit(7) == 14
        main_thread = threading.current_thread().name
        assert main_thread not in backend.threads
        assert sorted(p for batch in backend.batches[1:-1] for p in batch) == list(range(1, 7))
        assert len(backend.batches) < 8  # the six overlapping requests shared batches
        await batcher.aclose()

    run(main())


@pytest.mark.parametrize("options", [{"inline_below_ms": 0.0}, {"inline_below_ms": 1e-9},
                                     {"inline_below_ms": 1000.0, "flush_when_idle": False}],
                         ids=["off", "costlier-than-the-bound", "waiting-batcher"])
def test_no_inline_when_off_or_too_costly(options: dict[str, object]) -> None:
    async def main() -> None:
        backend = Recorder()
        batcher = await started(backend, **{"flush_when_idle": True, "max_queue_delay_ms": 1.0, **options})
        for i in range(4):
            assert await batcher.submit(i) == 2 * i
        assert threading.current_thread().name not in backend.threads
        await batcher.aclose()

    run(main())


def test_an_inline_failure_fails_only_its_request() -> None:
    async def main() -> None:
        backend = Recorder()
        batcher = await started(backend, flush_when_idle=True, inline_below_ms=1000.0)
        await batcher.submit(0)
        backend.fail_next = True
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit(1)
        assert backend.threads[-1] == threading.current_thread().name  # it did run inline
        assert await batcher.submit(2) == 4
        assert batcher.in_flight == 0
        await batcher.aclose()

    run(main())
