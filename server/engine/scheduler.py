"""Continuous batching for translation: an iteration-level scheduler.

Every step runs *one* ragged decoder step (``decoder_step_ragged``) for all
active sequences at once; a request joins at the next step after it is
admitted and leaves the moment it finishes, is cancelled, or its deadline
passes — nobody waits for the longest sequence of a batch. Admitted requests
are encoded together, grouped by source length so padding stays small. A
greedy request is one row of the batch, a beam request ``beam_size`` rows
advanced by :class:`~transerve.search.SourceBeams` — the numpy search the
static path and export verification run too; tests hold it to the offline
PyTorch search token for token.

Each iteration is decide → run → apply (as vLLM's scheduler): ``_schedule``
makes a :class:`StepPlan` — admissions, expiries in the queue, and the
active requests that leave because they were cancelled or their deadline
passed — without computing anything; ``runner`` (a :class:`SequenceRunner`,
the only object that touches the graphs) encodes the joins and runs the
step; ``_update`` applies the logits: tokens, beam reorders, finished
requests, metrics. The batch's memory is :mod:`transerve.server.engine.kv_cache`.
The policy is unit-tested with a scripted runner (tests/test_scheduler_policy.py).

Caps: ``max_active_sequences`` rows; ``max_cached_tokens`` bounds the tokens
the admitted rows may cache (each row reserves its ``max_new_tokens`` on
admission, so the cache can never outgrow the cap mid-decode); beyond that,
requests wait in a queue of ``max_queue_size`` (full → ``QueueFull``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np
from transerve.constrained import Constraints, new_beams
from transerve.search import DEFAULT_RULES, GenerationRules, log_softmax, strip_special
from transerve.server.backends.runner import GraphRunner
from transerve.server.engine.kv_cache import BatchRows, TokenBudget
from transerve.server.engine.seq2seq import DecoderLayout
from transerve.server.engine.sequences import (
    GraphSequenceRunner,
    Outbox,
    RowsOutcome,
    SchedulerCaps,
    SchedulerStats,
    SequenceEvent,
    SequenceRequest,
    SequenceRunner,
    StepPlan,
)
from transerve.server.exceptions import DeadlineExceeded, QueueFull

log = logging.getLogger(__name__)


class ContinuousScheduler:
    """Owns one thread that plans, runs and applies steps; requests talk to it through ``generate``."""

    def __init__(self, runner: SequenceRunner, layout: DecoderLayout, caps: SchedulerCaps, name: str = "",
                 on_step: Callable[[int, float], None] | None = None,
                 on_finish: Callable[[SequenceRequest], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, rules: GenerationRules = DEFAULT_RULES) -> None:
        self.runner, self.layout, self.caps, self.name, self.rules = runner, layout, caps, name, rules
        self._on_step, self._on_finish, self._clock = on_step, on_finish, clock
        self._waiting: deque[SequenceRequest] = deque()
        self._cond = threading.Condition()
        self._batch: BatchRows[SequenceRequest] = BatchRows(layout)
        self._budget = TokenBudget(caps.max_cached_tokens)  # tokens the admitted rows may still cache
        self._stopping = False
        self._closing = False
        self._idle = asyncio.Event()  # set on the loop whenever a step ends with nothing active or queued
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = SchedulerStats()
        self.on_drop: Callable[[str, int], None] | None = None  # (reason, count): queued or decoding, dropped
        self.decode_seconds = 0.0  # moving average, join to finish, of requests that finished (queue-time estimate)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) for tokens/s over a short window

    @classmethod
    def over_graphs(cls, encoder: GraphRunner, step: GraphRunner, layout: DecoderLayout, caps: SchedulerCaps,
                    **kwargs: Any) -> ContinuousScheduler:
        return cls(GraphSequenceRunner(encoder, step), layout, caps, **kwargs)

    # ---- event-loop side ----

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._thread_main, name=f"scheduler-{self.name}", daemon=True)
        self._thread.start()

    async def generate(self, source: list[int], max_new_tokens: int, beam_size: int = 1,
                       length_penalty: float = 1.0, deadline: float | None = None, stream: bool = True,
                       constraints: Constraints | None = None) -> AsyncIterator[SequenceEvent]:
        """Events for one source until the final one. Leaving the iteration early cancels the request:
        its rows leave the batch at the next step and their cache is freed then. ``constraints``: glossary
        terms the result must contain (a constrained beam search of ``beam_size`` rows)."""
        rows = beam_size
        if self._closing:
            raise QueueFull(f"model {self.name!r} is shutting down")
        if rows * (max_new_tokens + 1) > self.caps.max_cached_tokens or rows > self.caps.max_active_sequences:
            raise QueueFull(f"model {self.name!r}: a request of {rows} rows × {max_new_tokens} tokens exceeds the "
                            f"scheduler's caps ({self.caps.max_active_sequences} sequences, "
                            f"{self.caps.max_cached_tokens} cached tokens)")
        request = SequenceRequest(source, max_new_tokens, beam_size, length_penalty, deadline, asyncio.Queue(),
                                  stream, enqueued=self._clock(), constraints=constraints)
        with self._cond:
            if len(self._waiting) >= self.caps.max_queue_size:
                raise QueueFull(f"model {self.name!r}: queue full ({len(self._waiting)} of "
                                f"{self.caps.max_queue_size} requests waiting)")
            bound = self.caps.max_queue_time
            if bound is not None and (wait := self.expected_wait(rows)) > bound:
                raise QueueFull(f"model {self.name!r}: the expected queue wait of {wait * 1000:.0f} ms exceeds "
                                f"max_queue_time_ms {bound * 1000:.0f}")
            self._waiting.append(request)
            self.stats.queued = len(self._waiting)
            self._cond.notify()
        finished = False
        try:
            while True:
                event = await request.events.get()
                if event.error is not None:
                    finished = True
                    raise event.error
                finished = event.final is not None
                yield event
                if finished:
                    return
        finally:
            if not finished:
                request.cancelled = True
                with self._cond:
                    self._cond.notify()

    def expected_wait(self, rows: int) -> float:
        """Seconds a request of ``rows`` would wait for a place (under the lock): nothing while the queue is empty
        and its rows fit; else the rows ahead of it and its own, at the rate rows leave a full batch — sequences
        finish at staggered times, so a full batch frees ``max_active_sequences`` rows per average decode."""
        if not self._waiting and len(self._batch) + rows <= self.caps.max_active_sequences:
            return 0.0
        ahead = sum(r.rows for r in self._waiting) + rows
        return ahead * self.decode_seconds / self.caps.max_active_sequences

    async def run(self, source: list[int], max_new_tokens: int, beam_size: int = 1, length_penalty: float = 1.0,
                  deadline: float | None = None, constraints: Constraints | None = None) -> list[int]:
        async for event in self.generate(source, max_new_tokens, beam_size, length_penalty, deadline,
                                         stream=False, constraints=constraints):
            if event.final is not None:
                return event.final
        raise RuntimeError("the scheduler ended a request without a result")

    async def aclose(self, grace: float = 30.0) -> None:
        """Refuse new requests, let admitted and queued ones finish (up to ``grace`` s), then stop."""
        self._closing = True  # from here no request is added, so an idle signal stays true
        if self._waiting or len(self._batch):
            self._idle.clear()
            with self._cond:
                self._cond.notify()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                log.warning("%s: %d sequences still decoding after %.0f s grace", self.name, len(self._batch), grace)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # ---- scheduler thread ----

    def _thread_main(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not len(self._batch) and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                plan = self._schedule()
            outbox: Outbox = []
            try:
                self._apply(plan, outbox)
                if len(self._batch):
                    feeds, bound = self._batch.step_io()
                    logits = self.runner.step(feeds, bound)  # the only compute of the iteration, with the encode
                    self._batch.advance()
                    self._update(logits, outbox)
            except Exception as e:  # a failing step fails the requests in it, never the thread
                log.exception("%s: decoder step failed", self.name)
                outbox += [(r, SequenceEvent(error=e)) for r in self._batch.requests]
                self._batch = BatchRows(self.layout, self._batch.pool)
                self._budget.clear()
            self._publish(outbox)
        failed = [(r, SequenceEvent(error=QueueFull(f"model {self.name!r} shut down")))
                  for r in [*self._batch.requests, *self._waiting]]
        self._publish(failed)

    def _schedule(self) -> StepPlan:
        """Under the lock, no compute: who leaves (cancelled or expired while active), who joins (queued requests
        that fit the caps, in arrival order — the head blocks the rest), who failed in the queue (expired)."""
        plan, now = StepPlan(), self._clock()
        self._sweep_queue(plan, now)
        plan.leaves = [r for r in self._batch.requests if r.cancelled or _expired(r, now)]
        self._dropped("cancelled_decoding", sum(1 for r in plan.leaves if r.cancelled))
        self._dropped("expired_decoding", sum(1 for r in plan.leaves if not r.cancelled))
        active = len(self._batch) - sum(r.rows for r in plan.leaves)
        reserved = self._budget.after(plan.leaves)
        while self._waiting:
            head = self._waiting[0]
            gone = head.cancelled or _expired(head, now)
            if not gone and (active + head.rows > self.caps.max_active_sequences
                             or not self._budget.admits(reserved, head)):
                break
            self._waiting.popleft()
            if gone:  # only when it left between the sweep and here
                self._drop_queued(head, plan)
                continue
            plan.joins.append(head)
            active += head.rows
            reserved += self._budget.need(head)
        self.stats.queued = len(self._waiting)
        return plan

    def _sweep_queue(self, plan: StepPlan, now: float) -> None:
        """Take every cancelled or expired request out of the queue, wherever it waits — not only at the head: a
        timed-out request must not hold its place (and count as queued) until the requests ahead of it leave."""
        if any(r.cancelled or _expired(r, now) for r in self._waiting):
            kept: deque[SequenceRequest] = deque()
            for request in self._waiting:
                if request.cancelled or _expired(request, now):
                    self._drop_queued(request, plan)
                else:
                    kept.append(request)
            self._waiting = kept

    def _drop_queued(self, request: SequenceRequest, plan: StepPlan) -> None:
        if request.cancelled:
            self._dropped("cancelled_queued", 1)
        else:
            plan.expired.append(request)
            self._dropped("expired_queued", 1)

    def _apply(self, plan: StepPlan, outbox: Outbox) -> None:
        """Carry out the plan: fail the expired, take the leavers' rows out, encode and add the joins."""
        outbox += [(r, SequenceEvent(error=DeadlineExceeded("deadline passed while queued"))) for r in plan.expired]
        for request in plan.leaves:
            if not request.cancelled:
                outbox.append((request, SequenceEvent(error=DeadlineExceeded("deadline passed while decoding"))))
            self._release(request)
        self._batch.remove(plan.leaves)
        self._budget.reserve(plan.joins)
        for request in plan.joins:
            request.joined_at = self._clock()
        joins = sorted(plan.joins, key=lambda r: len(r.source))  # similar lengths together: little padding
        for start in range(0, len(joins), self.caps.max_encode_batch):
            group = joins[start:start + self.caps.max_encode_batch]
            width = len(group[-1].source)
            ids = np.full((len(group), width), self.layout.pad_id, np.int64)
            for i, r in enumerate(group):
                ids[i, :len(r.source)] = r.source
            mask = (np.arange(width)[None, :] < np.array([len(r.source) for r in group])[:, None]).astype(np.int64)
            cross = self.runner.encode(ids, mask)
            rows = np.repeat(np.arange(len(group)), [r.rows for r in group])
            for r in group:
                if r.beam_size > 1 or r.constraints:
                    r.beams = new_beams(r.beam_size, self.layout.bos_id, self.layout.eos_id, r.max_new_tokens,
                                        r.length_penalty, self.rules, r.constraints)
            self._batch.join(group, [c[rows] for c in cross], mask[rows])

    def _update(self, logits: np.ndarray, outbox: Outbox) -> None:
        """Apply one step's logits: next tokens, beam reorders, finished requests leave, metrics."""
        batch, now = self._batch, self._clock()
        best = self._greedy_picks(logits)
        finished: list[SequenceRequest] = []
        for request in batch.requests:
            if request.first_token_at is None:
                request.first_token_at = now
            outcome = self._next(request, logits, best)
            if outcome.done:
                finished.append(request)
                outbox.append((request, SequenceEvent(final=request.tokens)))
                continue
            batch.reorder(request.row_ids, outcome.picks)
            batch.last[request.row_ids] = outcome.tokens
            if request.beams is None and request.stream:
                outbox.append((request, SequenceEvent(tokens=outcome.tokens)))
        made = len(batch)
        for request in finished:
            self._release(request)
            if request.joined_at is not None:
                took, average = now - request.joined_at, self.decode_seconds
                self.decode_seconds = took if average == 0 else 0.8 * average + 0.2 * took
        batch.remove(finished)
        self._account(made)

    def _greedy_picks(self, logits: np.ndarray) -> np.ndarray:
        """Every greedy row's next token at once, under the model's rules (a beam row's pick is not read)."""
        rules, requests = self.rules, self._batch.requests
        forced, histories = None, None
        if rules.forced_eos:
            forced = np.zeros(len(logits), bool)
            for r in requests:
                forced[r.row_ids[0]] = r.beams is None and len(r.tokens) + 1 >= r.max_new_tokens
        if rules.needs_history:
            histories = [[self.layout.bos_id]] * len(logits)
            for r in requests:
                histories[r.row_ids[0]] = [self.layout.bos_id, *r.tokens]
        return rules.greedy_pick(logits, histories, forced, self.layout.eos_id)

    def _next(self, request: SequenceRequest, logits: np.ndarray, best: np.ndarray) -> RowsOutcome:
        eos = self.layout.eos_id
        if request.beams is None:
            token = int(best[request.row_ids[0]])
            if token != eos:
                request.tokens.append(token)
            return RowsOutcome(token == eos or len(request.tokens) >= request.max_new_tokens, [0], [token])
        beams = request.beams
        rows = beams.advance(log_softmax(logits[request.row_ids]))
        if beams.done:
            request.tokens = strip_special(beams.best().tokens, eos)
            return RowsOutcome(True, [], [])
        return RowsOutcome(False, rows, beams.last_tokens())

    def _dropped(self, reason: str, count: int) -> None:
        if count and self.on_drop is not None:
            self.on_drop(reason, count)

    def _release(self, request: SequenceRequest) -> None:
        self._budget.release(request)
        if self._on_finish is not None:
            self._on_finish(request)

    def _account(self, tokens: int) -> None:
        now = self._clock()
        self._recent.append((now, tokens))
        while self._recent and now - self._recent[0][0] > 2.0:
            self._recent.popleft()
        span = max(now - self._recent[0][0], 1e-3) if len(self._recent) > 1 else 1.0
        batch = self._batch
        self.stats.active_sequences = len(batch)
        self.stats.cached_tokens = batch.cached_tokens
        self.stats.cache_slots = batch.past_mask.size if len(batch) else 0
        self.stats.tokens_per_second = sum(t for _, t in self._recent) / span
        if self._on_step is not None:
            self._on_step(tokens, now)

    def _publish(self, outbox: Outbox) -> None:
        """One hop to the event loop per step, whatever the number of requests."""
        idle = not len(self._batch) and not self._waiting
        if not len(self._batch):
            self.stats.active_sequences = self.stats.cached_tokens = self.stats.cache_slots = 0
        if (outbox or idle) and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver, outbox, self._idle if idle else None)

    @property
    def cached_tokens(self) -> int:
        return self.stats.cached_tokens


def _deliver(outbox: Sequence[tuple[SequenceRequest, SequenceEvent]], idle: asyncio.Event | None) -> None:
    for request, event in outbox:
        request.events.put_nowait(event)
    if idle is not None:
        idle.set()


def _expired(request: SequenceRequest, now: float) -> bool:
    return request.deadline is not None and now > request.deadline
