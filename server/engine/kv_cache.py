"""The decode batch's memory: the rows of every active sequence and their self/cross-attention caches.

Design note — caches and padding
--------------------------------
The self-attention cache is one array per layer and K/V, ``[N, H, P, D]``,
*right-aligned*: each step appends one slot to every row. The arrays live in
a pool of two preallocated buffers per tensor (:class:`CachePool`): a step
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

Memory bound: with ``max_cached_tokens`` T admitted, the pool holds at most
``T × layers × 2 (K, V) × d_model × 4 bytes × 2 buffers`` (plus the geometric
slack of the last growth), which is what the README's formula states.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

import numpy as np
from transerve.server.engine.seq2seq import DecoderLayout


class RowOwner(Protocol):
    """What the batch needs of a request: how many rows it has, and which ones (kept up to date here)."""

    row_ids: list[int]

    @property
    def rows(self) -> int: ...


Owner = TypeVar("Owner", bound=RowOwner)


class Budgeted(Protocol):
    """What admission needs of a request: its rows and the tokens each may still make."""

    max_new_tokens: int

    @property
    def rows(self) -> int: ...


class TokenBudget:
    """Admission's side of the cache: ``max_cached_tokens`` shared by the admitted requests.

    A request reserves what its rows may fill — ``rows × (max_new_tokens + 1)`` slots, the start token
    included — when it joins and gives it back when it leaves, so the cache can never outgrow the cap
    mid-decode. The scheduler plans an iteration's joins against :meth:`after` the leavers, then
    :meth:`reserve` s what joined."""

    def __init__(self, limit: int) -> None:
        self.limit, self.reserved = limit, 0

    @staticmethod
    def need(request: Budgeted) -> int:
        return request.rows * (request.max_new_tokens + 1)

    def after(self, leaving: Iterable[Budgeted]) -> int:
        """The tokens still reserved once ``leaving`` has left (nothing changes yet)."""
        return self.reserved - sum(self.need(r) for r in leaving)

    def admits(self, reserved: int, request: Budgeted) -> bool:
        return reserved + self.need(request) <= self.limit

    def reserve(self, joining: Iterable[Budgeted]) -> None:
        self.reserved += sum(self.need(r) for r in joining)

    def release(self, request: Budgeted) -> None:
        self.reserved -= self.need(request)

    def clear(self) -> None:
        """Every request left at once (a failed step)."""
        self.reserved = 0


class CachePool:
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

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for side in self.sides for a in side)


class BatchRows(Generic[Owner]):
    """The active rows and their arrays (scheduler thread only).

    Rows are ``[N, …]`` on the leading axis of every array; a request owns the rows in ``request.row_ids``
    (any positions — rows move when others leave).
    """

    def __init__(self, layout: DecoderLayout, pool: CachePool | None = None) -> None:
        self.layout = layout
        self.heads = (layout.num_heads, layout.head_dim)
        self.pool = pool or CachePool(2 * layout.num_layers)
        self._empty()

    def _empty(self) -> None:
        """No rows: the arrays of an empty batch (the pool's buffers are kept for the next rows)."""
        layout = self.layout
        self.requests: list[Owner] = []
        self.owners: list[Owner] = []  # per row
        self.last = np.zeros(0, np.int64)
        self.positions = np.zeros(0, np.int64)
        self.src_mask = np.zeros((0, 1), np.int64)
        self.past_mask = np.zeros((0, 1), np.int64)
        self.past = self.pool.views(self.pool.current, self._shape(0, 1))
        self.cross = [np.zeros((0, layout.num_heads, 1, layout.head_dim), np.float32)
                      for _ in range(2 * layout.num_layers)]
        self._present: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.owners)

    @property
    def cached_tokens(self) -> int:
        return int(self.past_mask.sum())

    def _shape(self, rows: int, slots: int) -> tuple[int, int, int, int]:
        return (rows, self.heads[0], slots, self.heads[1])

    def join(self, requests: list[Owner], cross: list[np.ndarray], src_mask: np.ndarray) -> None:
        """New rows start at position 0 with BOS, every existing cache slot masked off for them."""
        n, old, p = len(src_mask), len(self), self.past_mask.shape[1]
        self.pool.ensure(int(np.prod(self._shape(old + n, p + 1))), int(np.prod(self._shape(old, p))))
        self.past = self.pool.views(self.pool.current, self._shape(old + n, p))
        for a in self.past:
            a[old:] = 0.0
        s = max(self.src_mask.shape[1], src_mask.shape[1])
        self.cross = [np.concatenate([pad_axis(a, 2, s), pad_axis(b, 2, s)])
                      for a, b in zip(self.cross, cross, strict=True)]
        self.src_mask = np.concatenate([pad_axis(self.src_mask, 1, s), pad_axis(src_mask, 1, s)])
        self.past_mask = np.concatenate([self.past_mask, np.zeros((n, p), np.int64)])
        self.last = np.concatenate([self.last, np.full(n, self.layout.bos_id, np.int64)])
        self.positions = np.concatenate([self.positions, np.zeros(n, np.int64)])
        row = old
        for request in requests:
            request.row_ids = list(range(row, row + request.rows))
            row += request.rows
            self.owners += [request] * request.rows
        self.requests += requests

    def step_io(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The decoder step's feeds, and the ``present`` outputs to bind: views of the pool's other buffer."""
        n, p = len(self), self.past_mask.shape[1]
        feeds: dict[str, np.ndarray] = {"input_ids": self.last, "positions": self.positions,
                                        "attention_mask": self.src_mask, "past_mask": self.past_mask}
        self._present = self.pool.views(1 - self.pool.current, self._shape(n, p + 1))
        bound: dict[str, np.ndarray] = {}
        for i in range(self.layout.num_layers):
            for j, kind in enumerate(("k", "v")):
                feeds[f"past_{kind}_{i}"] = self.past[2 * i + j]
                feeds[f"cross_{kind}_{i}"] = self.cross[2 * i + j]
                bound[f"present_{kind}_{i}"] = self._present[2 * i + j]
        return feeds, bound

    def advance(self) -> None:
        """After the step: the grown cache (written into the other buffer) becomes ``past``, one slot longer."""
        n, p = len(self), self.past_mask.shape[1]
        self.pool.current = 1 - self.pool.current
        self.past = self._present
        self.past_mask = np.concatenate([self.past_mask, np.ones((n, 1), np.int64)], axis=1)
        self.positions += 1
        self.pool.ensure(int(np.prod(self._shape(n, p + 2))), int(np.prod(self._shape(n, p + 1))))
        self.past = self.pool.views(self.pool.current, self._shape(n, p + 1))  # ensure may have moved it

    def reorder(self, rows: list[int], picks: list[int]) -> None:
        """Beam search: row ``rows[j]`` becomes a copy of row ``rows[picks[j]]`` (k rows copied)."""
        if picks == list(range(len(rows))):
            return
        source = [rows[k] for k in picks]
        for a in (*self.past, self.past_mask):
            a[rows] = a[source]

    def remove(self, leaving: list[Owner]) -> None:
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
            self._empty()
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


def pad_axis(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    if a.shape[axis] == size:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return np.pad(a, widths)


__all__ = ["BatchRows", "CachePool", "RowOwner", "pad_axis"]
