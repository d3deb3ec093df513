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

Design note — caches and padding
--------------------------------
The self-attention cache is one array per layer and K/V, ``[N, H, P, D]``,
*right-aligned*: each step appends one slot to every row. The arrays live in
a pool of two preallocated buffers per tensor (:class:`_CachePool`): a step
reads ``past`` from one and ONNX Runtime writes ``present`` straight into the
other through IOBinding, so steps allocate no cache memory; the buffers grow
geometrically when the batch needs more and are kept for reuse. A row that
joins later starts with the older slots masked off (``past_mask``) and counts
its own ``positions`` from 0, so late joiners carry padding on the *left*:
that costs attention over masked slots and memory, Σ(P − len) slots. When
every row has left the oldest slots behind and the dead prefix is at least
half of P, one copy trims it (amortised: P stays below twice the longest live
row plus one). The cross-attention K/V ``[N, H, S, D]`` is padded to the
longest active source and masked. Joining appends rows in place (no copy of
the others); a row leaving is replaced by the last row (only moved rows are
copied); a beam reorder copies that request's rows only. (The first version
re-concatenated the whole cache on every join and leave: under Poisson load
with mixed lengths that copy cost as much as the step itself.)

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transerve.server.batching import DeadlineExceeded, QueueFull
from transerve.server.runtime import GraphRunner, run_into
from transerve.server.seq2seq import DecoderLayout

from transerve.search import SourceBeams, log_softmax, strip_special

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerCaps:
    max_active_sequences: int = 64
    max_cached_tokens: int = 16_384
    max_queue_size: int = 256
    max_encode_batch: int = 32


@dataclass
class Event:
    """What a request's consumer sees: new tokens (greedy), or the end (``final`` ids) or an error."""

    tokens: list[int] = field(default_factory=list)
    final: list[int] | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class SequenceRequest:
    source: list[int]
    max_new_tokens: int
    beam_size: int
    length_penalty: float
    deadline: float | None
    events: asyncio.Queue[Event]
    stream: bool = True  # False: only the final event is posted (one wake-up per request, not per token)
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # scheduler-thread state
    row_ids: list[int] = field(default_factory=list)  # this request's rows in the batch (beam order)
    tokens: list[int] = field(default_factory=list)
    beams: SourceBeams | None = None
    first_token_at: float | None = None

    @property
    def rows(self) -> int:
        return self.beam_size


@dataclass
class SchedulerStats:
    """Gauges the metrics read (written by the scheduler thread, read anywhere)."""

    active_sequences: int = 0
    queued: int = 0
    cached_tokens: int = 0
    cache_slots: int = 0
    tokens_per_second: float = 0.0


class _CachePool:
    """Two buffers per cache tensor, used in turn: a step reads ``past`` from one and ONNX Runtime writes
    ``present`` straight into the other (IOBinding). They grow geometrically when a step needs more and are
    never given back, so in steady state no step allocates cache memory."""

    def __init__(self, count: int) -> None:
        self.sides = [[np.zeros(0, np.float32) for _ in range(count)] for _ in range(2)]
        self.current = 0

    def ensure(self, elements: int, used: int) -> None:
        """Room for ``elements`` per tensor on both sides, keeping the ``used`` head of the current side."""
        capacity = len(self.sides[0][0])
        if elements <= capacity:
            return
        size = max(elements, capacity + capacity // 2, 1 << 16)
        for side in range(2):
            for i, old in enumerate(self.sides[side]):
                new = np.empty(size, np.float32)
                if side == self.current:
                    new[:used] = old[:used]
                self.sides[side][i] = new

    def views(self, side: int, shape: tuple[int, ...]) -> list[np.ndarray]:
        n = int(np.prod(shape))
        return [flat[:n].reshape(shape) for flat in self.sides[side]]


class _Batch:
    """The active rows and their arrays (scheduler thread only).

    Rows are ``[N, …]`` on the leading axis of every array; a request owns the rows in ``request.row_ids``
    (any positions — rows move when others leave). Joining appends rows in place; leaving fills the holes with
    the last rows (only the moved rows are copied); a beam reorder copies only that request's rows.
    """

    def __init__(self, layout: DecoderLayout) -> None:
        self.layout = layout
        self.requests: list[SequenceRequest] = []
        self.owners: list[SequenceRequest] = []  # per row
        self.last = np.zeros(0, np.int64)
        self.positions = np.zeros(0, np.int64)
        self.src_mask = np.zeros((0, 1), np.int64)
        self.past_mask = np.zeros((0, 1), np.int64)
        self.heads = (layout.num_heads, layout.head_dim)
        self.pool = _CachePool(2 * layout.num_layers)
        self.past = self.pool.views(self.pool.current, (0, layout.num_heads, 1, layout.head_dim))
        self.cross = [np.zeros((0, layout.num_heads, 1, layout.head_dim), np.float32)
                      for _ in range(2 * layout.num_layers)]

    def __len__(self) -> int:
        return len(self.owners)

    def _shape(self, rows: int, slots: int) -> tuple[int, int, int, int]:
        return (rows, self.heads[0], slots, self.heads[1])

    def join(self, requests: list[SequenceRequest], cross: list[np.ndarray], src_mask: np.ndarray) -> None:
        """New rows start at position 0 with BOS, every existing cache slot masked off for them."""
        n, old, p = len(src_mask), len(self), self.past_mask.shape[1]
        self.pool.ensure(int(np.prod(self._shape(old + n, p + 1))), int(np.prod(self._shape(old, p))))
        self.past = self.pool.views(self.pool.current, self._shape(old + n, p))
        for a in self.past:
            a[old:] = 0.0
        s = max(self.src_mask.shape[1], src_mask.shape[1])
        self.cross = [np.concatenate([_pad_axis(a, 2, s), _pad_axis(b, 2, s)])
                      for a, b in zip(self.cross, cross, strict=True)]
        self.src_mask = np.concatenate([_pad_axis(self.src_mask, 1, s), _pad_axis(src_mask, 1, s)])
        self.past_mask = np.concatenate([self.past_mask, np.zeros((n, p), np.int64)])
        self.last = np.concatenate([self.last, np.full(n, self.layout.bos_id, np.int64)])
        self.positions = np.concatenate([self.positions, np.zeros(n, np.int64)])
        row = old
        for request in requests:
            request.row_ids = list(range(row, row + request.rows))
            row += request.rows
            self.owners += [request] * request.rows
        self.requests += requests

    def step(self, runner: Any) -> np.ndarray:
        """One decoder step for every row: logits ``[N, V]``; the grown cache lands in the other buffer."""
        n, p = len(self), self.past_mask.shape[1]
        feeds: dict[str, np.ndarray] = {"input_ids": self.last, "positions": self.positions,
                                        "attention_mask": self.src_mask, "past_mask": self.past_mask}
        present = self.pool.views(1 - self.pool.current, self._shape(n, p + 1))
        bound: dict[str, np.ndarray] = {}
        for i in range(self.layout.num_layers):
            for j, kind in enumerate(("k", "v")):
                feeds[f"past_{kind}_{i}"] = self.past[2 * i + j]
                feeds[f"cross_{kind}_{i}"] = self.cross[2 * i + j]
                bound[f"present_{kind}_{i}"] = present[2 * i + j]
        logits = run_into(runner, feeds, bound)["logits"]
        self.pool.current = 1 - self.pool.current
        self.past = present
        self.past_mask = np.concatenate([self.past_mask, np.ones((n, 1), np.int64)], axis=1)
        self.positions += 1
        self.pool.ensure(int(np.prod(self._shape(n, p + 2))), int(np.prod(self._shape(n, p + 1))))
        self.past = self.pool.views(self.pool.current, self._shape(n, p + 1))  # ensure may have moved it
        return logits

    def reorder(self, rows: list[int], picks: list[int]) -> None:
        """Beam search: row ``rows[j]`` becomes a copy of row ``rows[picks[j]]`` (k rows copied)."""
        if picks == list(range(len(rows))):
            return
        source = [rows[k] for k in picks]
        for a in (*self.past, self.past_mask):
            a[rows] = a[source]

    def remove(self, leaving: list[SequenceRequest]) -> None:
        """Drop the leaving requests' rows: the last rows move into the holes, then dead slots are trimmed."""
        if not leaving:
            return
        gone = {r for request in leaving for r in request.row_ids}
        keep = len(self) - len(gone)
        holes = sorted(r for r in gone if r < keep)
        movers = [r for r in range(keep, len(self)) if r not in gone]
        for hole, mover in zip(holes, movers, strict=True):
            owner = self.owners[mover]
            owner.row_ids[owner.row_ids.index(mover)] = hole
            self.owners[hole] = owner
            for a in (*self.past, *self.cross, self.past_mask, self.src_mask, self.last, self.positions):
                a[hole] = a[mover]
        leaving_ids = {id(r) for r in leaving}
        self.requests = [r for r in self.requests if id(r) not in leaving_ids]
        self.owners = self.owners[:keep]
        p = self.past_mask.shape[1]
        self.past = self.pool.views(self.pool.current, self._shape(keep, p))
        self.cross = [a[:keep] for a in self.cross]
        self.past_mask, self.src_mask = self.past_mask[:keep], self.src_mask[:keep]
        self.last, self.positions = self.last[:keep], self.positions[:keep]
        self._trim()

    def _trim(self) -> None:
        if not len(self):
            pool = self.pool
            self.__init__(self.layout)  # type: ignore[misc]  # back to the empty layout, keeping the pool
            self.pool = pool
            self.past = pool.views(pool.current, self._shape(0, 1))
            return
        p = self.past_mask.shape[1]
        live = self.past_mask.any(axis=0)
        dead = int(np.argmax(live)) if live.any() else p - 1
        if dead >= max(1, p // 2):  # re-lay the cache without the dead prefix, into the other buffer
            shape = self._shape(len(self), p - dead)
            target = self.pool.views(1 - self.pool.current, shape)
            for new, old in zip(target, self.past, strict=True):
                new[...] = old[:, :, dead:]
            self.pool.current = 1 - self.pool.current
            self.past = target
            self.past_mask = np.ascontiguousarray(self.past_mask[:, dead:])
        s = int(np.flatnonzero(self.src_mask.any(axis=0)).max()) + 1
        if s < self.src_mask.shape[1]:
            self.cross = [np.ascontiguousarray(a[:, :, :s]) for a in self.cross]
            self.src_mask = np.ascontiguousarray(self.src_mask[:, :s])


def _pad_axis(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    if a.shape[axis] == size:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return np.pad(a, widths)


class ContinuousScheduler:
    """Owns one thread that admits, encodes and steps; requests talk to it through ``generate``."""

    def __init__(self, encoder: GraphRunner, step: GraphRunner, layout: DecoderLayout, caps: SchedulerCaps,
                 name: str = "", on_step: Callable[[int, float], None] | None = None,
                 on_finish: Callable[[SequenceRequest], None] | None = None) -> None:
        self.encoder, self.step_runner, self.layout, self.caps, self.name = encoder, step, layout, caps, name
        self._on_step, self._on_finish = on_step, on_finish
        self._waiting: deque[SequenceRequest] = deque()
        self._cond = threading.Condition()
        self._batch = _Batch(layout)
        self._reserved = 0  # tokens the active rows may still cache, summed over rows (admission cap)
        self._stopping = False
        self._closing = False
        self._idle = asyncio.Event()  # set on the loop whenever a step ends with nothing active or queued
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = SchedulerStats()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) for tokens/s over a short window

    # ---- event-loop side ----

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._thread_main, name=f"scheduler-{self.name}", daemon=True)
        self._thread.start()

    async def generate(self, source: list[int], max_new_tokens: int, beam_size: int = 1,
                       length_penalty: float = 1.0, deadline: float | None = None, stream: bool = True
                       ) -> AsyncIterator[Event]:
        """Events for one source until the final one. Leaving the iteration early cancels the request:
        its rows leave the batch at the next step and their cache is freed then."""
        rows = beam_size
        if self._closing:
            raise QueueFull(f"model {self.name!r} is shutting down")
        if rows * (max_new_tokens + 1) > self.caps.max_cached_tokens or rows > self.caps.max_active_sequences:
            raise QueueFull(f"model {self.name!r}: a request of {rows} rows × {max_new_tokens} tokens exceeds the "
                            f"scheduler's caps ({self.caps.max_active_sequences} sequences, "
                            f"{self.caps.max_cached_tokens} cached tokens)")
        request = SequenceRequest(source, max_new_tokens, beam_size, length_penalty, deadline, asyncio.Queue(),
                                  stream)
        with self._cond:
            if len(self._waiting) >= self.caps.max_queue_size:
                raise QueueFull(f"model {self.name!r}: queue full ({len(self._waiting)} of "
                                f"{self.caps.max_queue_size} requests waiting)")
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

    async def run(self, source: list[int], max_new_tokens: int, beam_size: int = 1, length_penalty: float = 1.0,
                  deadline: float | None = None) -> list[int]:
        async for event in self.generate(source, max_new_tokens, beam_size, length_penalty, deadline,
                                         stream=False):
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
                admitted = self._admit()
            outbox: list[tuple[SequenceRequest, Event]] = []
            try:
                if admitted:
                    self._encode_and_join(admitted, outbox)
                if len(self._batch):
                    self._step(outbox)
            except Exception as e:  # a failing step fails the requests in it, never the thread
                log.exception("%s: decoder step failed", self.name)
                outbox += [(r, Event(error=e)) for r in self._batch.requests]
                self._batch = _Batch(self.layout)
                self._reserved = 0
            self._publish(outbox)
        failed = [(r, Event(error=QueueFull(f"model {self.name!r} shut down")))
                  for r in [*self._batch.requests, *self._waiting]]
        self._publish(failed)

    def _admit(self) -> list[SequenceRequest]:
        """Under the lock: queued requests that fit the caps, in arrival order (the head blocks the rest).
        Cancelled heads are dropped; expired ones are returned too, to be failed outside the lock."""
        admitted: list[SequenceRequest] = []
        active, now = len(self._batch), time.monotonic()
        while self._waiting:
            head = self._waiting[0]
            need = head.rows * (head.max_new_tokens + 1)
            gone = head.cancelled or (head.deadline is not None and now > head.deadline)
            if not gone and (active + head.rows > self.caps.max_active_sequences
                             or self._reserved + need > self.caps.max_cached_tokens):
                break
            self._waiting.popleft()
            if head.cancelled:
                continue
            admitted.append(head)
            active += 0 if gone else head.rows
            self._reserved += need
        self.stats.queued = len(self._waiting)
        return admitted

    def _encode_and_join(self, admitted: list[SequenceRequest], outbox: list[tuple[SequenceRequest, Event]]) -> None:
        now = time.monotonic()
        live = []
        for r in admitted:
            if r.deadline is not None and now > r.deadline:
                outbox.append((r, Event(error=DeadlineExceeded("deadline passed while queued"))))
                self._reserved -= r.rows * (r.max_new_tokens + 1)
            else:
                live.append(r)
        live.sort(key=lambda r: len(r.source))  # groups of similar length: little padding in the encoder
        for start in range(0, len(live), self.caps.max_encode_batch):
            group = live[start:start + self.caps.max_encode_batch]
            width = len(group[-1].source)
            ids = np.full((len(group), width), self.layout.pad_id, np.int64)
            for i, r in enumerate(group):
                ids[i, :len(r.source)] = r.source
            mask = (np.arange(width)[None, :] < np.array([len(r.source) for r in group])[:, None]).astype(np.int64)
            cross = self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})
            rows = np.repeat(np.arange(len(group)), [r.rows for r in group])
            for r in group:
                if r.beam_size > 1:
                    r.beams = SourceBeams(r.beam_size, self.layout.bos_id, self.layout.eos_id, r.max_new_tokens,
                                          r.length_penalty)
            self._batch.join(group, [c[rows] for c in cross], mask[rows])

    def _step(self, outbox: list[tuple[SequenceRequest, Event]]) -> None:
        batch = self._batch
        logits = batch.step(self.step_runner)
        best = logits.argmax(axis=1)  # every greedy row at once
        now = time.monotonic()
        leaving: list[SequenceRequest] = []
        made = 0
        for request in batch.requests:
            expired = request.deadline is not None and now > request.deadline
            if request.cancelled or expired:
                if expired and not request.cancelled:
                    outbox.append((request, Event(error=DeadlineExceeded("deadline passed while decoding"))))
                leaving.append(request)
                continue
            if request.first_token_at is None:
                request.first_token_at = now
            done, picks, tokens = self._next(request, logits, best)
            made += request.rows
            if done:
                leaving.append(request)
                outbox.append((request, Event(final=request.tokens)))
                continue
            batch.reorder(request.row_ids, picks)
            batch.last[request.row_ids] = tokens
            if request.beams is None and request.stream:
                outbox.append((request, Event(tokens=tokens)))
        for request in leaving:
            self._release(request)
        batch.remove(leaving)
        self._account(made)

    def _next(self, request: SequenceRequest, logits: np.ndarray, best: np.ndarray
              ) -> tuple[bool, list[int], list[int]]:
        """(done, for each of its rows the row (relative) it continues, tokens to feed next)."""
        eos = self.layout.eos_id
        if request.beams is None:
            token = int(best[request.row_ids[0]])
            if token != eos:
                request.tokens.append(token)
            done = token == eos or len(request.tokens) >= request.max_new_tokens
            return done, [0], [token]
        beams = request.beams
        rows = beams.advance(log_softmax(logits[request.row_ids]))
        if beams.done:
            request.tokens = strip_special(beams.best().tokens, eos)
            return True, [], []
        return False, rows, beams.last_tokens()

    def _release(self, request: SequenceRequest) -> None:
        self._reserved -= request.rows * (request.max_new_tokens + 1)
        if self._on_finish is not None:
            self._on_finish(request)

    def _account(self, tokens: int) -> None:
        now = time.monotonic()
        self._recent.append((now, tokens))
        while self._recent and now - self._recent[0][0] > 2.0:
            self._recent.popleft()
        span = max(now - self._recent[0][0], 1e-3) if len(self._recent) > 1 else 1.0
        batch = self._batch
        self.stats.active_sequences = len(batch)
        self.stats.cached_tokens = int(batch.past_mask.sum())
        self.stats.cache_slots = batch.past_mask.size if len(batch) else 0
        self.stats.tokens_per_second = sum(t for _, t in self._recent) / span
        if self._on_step is not None:
            self._on_step(tokens, now)

    def _publish(self, outbox: list[tuple[SequenceRequest, Event]]) -> None:
        """One hop to the event loop per step, whatever the number of requests."""
        idle = not len(self._batch) and not self._waiting
        if not len(self._batch):
            self.stats.active_sequences = self.stats.cached_tokens = self.stats.cache_slots = 0
        if (outbox or idle) and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver, outbox, self._idle if idle else None)

    @property
    def cached_tokens(self) -> int:
        return self.stats.cached_tokens


def _deliver(outbox: Sequence[tuple[SequenceRequest, Event]], idle: asyncio.Event | None) -> None:
    for request, event in outbox:
        request.events.put_nowait(event)
    if idle is not None:
        idle.set()
