"""The continuous-batching policy against a scripted runner: no ONNX, no model, exact expectations.

The fake runner's "model" is a formula: a source ``[L, uid, EOS]`` translates to ``L`` tokens ``4, 5, 6, …``
(position ``p`` emits ``4 + p % 10``, position ``L`` emits EOS). It logs which sources every step decoded and
which the encoder saw, so join order, caps, expiry, cancellation and drain are checked step by step. A fake
clock drives deadlines; a semaphore lets a test run the scheduler one step at a time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from helpers import until
from transerve.server.engine.scheduler import ContinuousScheduler, SchedulerCaps
from transerve.server.engine.seq2seq import DecoderLayout
from transerve.server.exceptions import DeadlineExceeded, QueueFull

LAYOUT = DecoderLayout(num_layers=1, num_heads=1, head_dim=1, bos_id=1, eos_id=2, pad_id=0)
VOCAB = 16


def expected(length: int, budget: int) -> list[int]:
    return [4 + p % 10 for p in range(min(length, budget))]


class ScriptedRunner:
    """Encoder: cross K carries the source's length, cross V its uid. Step: the formula above."""

    def __init__(self, gated: bool = False) -> None:
        self.encoded: list[int] = []  # uids, in the order the encoder saw them
        self.steps: list[list[int]] = []  # uids decoded by each step (one entry per row)
        self.gate = threading.Semaphore(0) if gated else None
        self.on_step: Callable[[int], None] = lambda step: None

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        self.encoded += ids[:, 1].tolist()
        shape = (len(ids), 1, ids.shape[1], 1)
        length, uid = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        length[:, 0, 0, 0], uid[:, 0, 0, 0] = ids[:, 0], ids[:, 1]
        return [length, uid]

    def step(self, feeds: dict[str, np.ndarray], bound: dict[str, np.ndarray]) -> np.ndarray:
        if self.gate is not None:
            assert self.gate.acquire(timeout=30), "the test never allowed this step"
        self.on_step(len(self.steps))
        self.steps.append(feeds["cross_v_0"][:, 0, 0, 0].astype(int).tolist())
        lengths, positions = feeds["cross_k_0"][:, 0, 0, 0].astype(int), feeds["positions"]
        tokens = np.where(positions >= lengths, LAYOUT.eos_id, 4 + positions % 10)
        logits = np.zeros((len(tokens), VOCAB), np.float32)
        logits[np.arange(len(tokens)), tokens] = 5.0
        for array in bound.values():
            array[...] = 0.0
        return logits

    def allow(self, steps: int) -> None:
        assert self.gate is not None
        for _ in range(steps):
            self.gate.release()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(runner: ScriptedRunner, clock: Callable[[], float] | None = None, **caps: Any) -> ContinuousScheduler:
    return ContinuousScheduler(runner, LAYOUT, SchedulerCaps(**caps), name="policy",
                               **({"clock": clock} if clock else {}))


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def source(length: int, uid: int) -> list[int]:
    return [length, uid, LAYOUT.eos_id]


def test_joins_in_arrival_order_within_the_sequence_cap() -> None:
    runner = ScriptedRunner()

    async def main() -> list[list[int]]:
        s = make(runner, max_active_sequences=2)
        s.start()
        try:
            return list(await asyncio.gather(*(s.run(source(3 + uid, uid), 20) for uid in range(10, 15))))
        finally:
            await s.aclose()

    assert run(main()) == [expected(3 + uid, 20) for uid in range(10, 15)]
    assert runner.encoded == [10, 11, 12, 13, 14]  # arrival order
    assert max(len(step) for step in runner.steps) == 2  # never more rows than the cap


def test_cached_token_cap_makes_the_head_wait_and_the_queue_stays_fifo() -> None:
    runner = ScriptedRunner(gated=True)

    async def main() -> list[list[int]]:
        s = make(runner, max_cached_tokens=20)
        s.start()
        try:
            a = asyncio.ensure_future(s.run(source(5, 1), 10))  # reserves 11 of 20 cached tokens
            await until(lambda: runner.encoded == [1], "the scheduler thread's post", timeout=30)
            b = asyncio.ensure_future(s.run(source(5, 2), 10))  # 11 more do not fit: waits for a
            c = asyncio.ensure_future(s.run(source(2, 3), 3))  # 4 would fit, but b is ahead of it
            await until(lambda: s.stats.queued == 2, "the scheduler thread's post", timeout=30)
            runner.allow(1000)
            return list(await asyncio.gather(a, b, c))
        finally:
            await s.aclose()

    assert run(main()) == [expected(5, 10), expected(5, 10), expected(2, 3)]
    first_b = next(i for i, step in enumerate(runner.steps) if 2 in step)
    assert all(step == [1] for step in runner.steps[:first_b])  # a alone until it finished
    assert 3 in runner.steps[first_b]  # c joined with b, not before it
    assert runner.encoded == [1, 2, 3]


def test_requests_beyond_the_caps_or_the_queue_are_refused() -> None:
    runner = ScriptedRunner(gated=True)

    async def main() -> None:
        s = make(runner, max_cached_tokens=20, max_queue_size=1, max_active_sequences=4)
        s.start()
        try:
            with pytest.raises(QueueFull, match="exceeds the scheduler's caps"):
                await s.run(source(3, 1), 20)  # 21 tokens can never fit 20
            with pytest.raises(QueueFull, match="exceeds the scheduler's caps"):
                await s.run(source(3, 1), 2, beam_size=5)  # 5 rows > 4 sequences
            first = asyncio.ensure_future(s.run(source(3, 1), 15))  # admitted (16 of 20)
            await until(lambda: runner.encoded == [1], "the scheduler thread's post", timeout=30)
            second = asyncio.ensure_future(s.run(source(3, 2), 15))  # queued: 32 > 20
            await until(lambda: s.stats.queued == 1, "the scheduler thread's post", timeout=30)
            with pytest.raises(QueueFull, match="queue full"):
                await s.run(source(3, 3), 1)
            runner.allow(1000)
            assert await first == expected(3, 15) and await second == expected(3, 15)
        finally:
            await s.aclose()

    run(main())


def test_a_deadline_passing_mid_decode_takes_only_that_request_out() -> None:
    runner, clock = ScriptedRunner(), FakeClock()
    runner.on_step = lambda step: setattr(clock, "now", 2000.0) if step == 3 else None  # time jumps at step 3

    async def main() -> tuple[BaseException | None, list[int], Any]:
        s = make(runner, clock, max_active_sequences=2)
        s.start()
        try:
            late = asyncio.ensure_future(s.run(source(9, 1), 9, deadline=1500.0))
            keep = asyncio.ensure_future(s.run(source(9, 2), 9))
            queued = asyncio.ensure_future(s.run(source(9, 3), 9, deadline=1500.0))  # behind the cap
            results = await asyncio.gather(late, keep, queued, return_exceptions=True)
            return results[0], results[1], results[2]
        finally:
            await s.aclose()

    late, kept, queued = run(main())
    assert isinstance(late, DeadlineExceeded) and "while decoding" in str(late)
    assert isinstance(queued, DeadlineExceeded) and "while queued" in str(queued)
    assert kept == expected(9, 9)
    assert runner.encoded == [1, 2]  # the expired queued request was never encoded
    assert all(step == [2] for step in runner.steps[4:])  # gone from the step after the clock jumped


def test_a_cancelled_stream_leaves_at_the_next_step() -> None:
    runner = ScriptedRunner(gated=True)

    async def main() -> tuple[list[int], ContinuousScheduler]:
        s = make(runner)
        s.start()
        try:
            other = asyncio.ensure_future(s.run(source(30, 2), 30))
            # step 0 (only uid 2) waits at the gate
            await until(lambda: runner.encoded == [2], "the scheduler thread's post", timeout=30)
            stream = s.generate(source(30, 1), 30)
            first = asyncio.ensure_future(anext(stream))
            await until(lambda: s.stats.queued == 1, "the scheduler thread's post", timeout=30)
            runner.allow(2)  # step 0: [2]; uid 1 joins; step 1: [2, 1]; step 2 is planned, waits at the gate
            assert (await first).tokens == [4]
            await stream.aclose()  # the client went away
            runner.allow(1000)
            return await other, s
        finally:
            await s.aclose()

    out, s = run(main())
    assert out == expected(30, 30)
    assert runner.steps[0] == [2] and sorted(runner.steps[1]) == [1, 2]
    assert all(1 not in step for step in runner.steps[3:])  # out at the first plan after the cancellation
    assert s.stats.active_sequences == 0 and s.stats.cached_tokens == 0 and s._budget.reserved == 0


def test_drain_finishes_accepted_and_queued_work_then_refuses() -> None:
    runner = ScriptedRunner(gated=True)

    async def main() -> list[list[int]]:
        s = make(runner, max_active_sequences=1)
        s.start()
        jobs = [asyncio.ensure_future(s.run(source(4, uid), 8)) for uid in (1, 2, 3)]
        await until(lambda: runner.encoded == [1] and s.stats.queued == 2, "the scheduler thread's post", timeout=30)
        closing = asyncio.ensure_future(s.aclose(grace=30))
        await until(lambda: s._closing, "the scheduler thread's post", timeout=30)
        with pytest.raises(QueueFull, match="shutting down"):
            await s.run(source(4, 9), 8)
        runner.allow(1000)
        await closing
        return list(await asyncio.gather(*jobs))

    assert run(main()) == [expected(4, 8)] * 3
    assert runner.encoded == [1, 2, 3]
