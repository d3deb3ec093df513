"""What the translation scheduler works with: a request's sequences and their state, the caps, the events a
request's consumer reads, one iteration's plan, and the runner interface (the only object that touches the
graphs). The scheduler itself is :mod:`transerve.server.engine.scheduler`."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from transerve.constrained import Constraints
from transerve.search import SourceBeams
from transerve.server.backends.runner import GraphRunner, run_into


@dataclass(frozen=True)
class SchedulerCaps:
    max_active_sequences: int = 64
    max_cached_tokens: int = 16_384
    max_queue_size: int = 256
    max_encode_batch: int = 32
    max_queue_time: float | None = None  # seconds; refuse at admission a request expected to wait longer


@dataclass
class SequenceEvent:
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
    events: asyncio.Queue[SequenceEvent]
    stream: bool = True  # False: only the final event is posted (one wake-up per request, not per token)
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    constraints: Constraints | None = None  # glossary terms: a constrained beam search (transerve.constrained)
    # scheduler-thread state
    row_ids: list[int] = field(default_factory=list)  # this request's rows in the batch (beam order)
    tokens: list[int] = field(default_factory=list)
    beams: SourceBeams | None = None
    first_token_at: float | None = None
    joined_at: float | None = None

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


Outbox = list[tuple["SequenceRequest", "SequenceEvent"]]  # events to hand to the event loop after an iteration


@dataclass
class StepPlan:
    """What one iteration decided before any compute."""

    joins: list[SequenceRequest] = field(default_factory=list)  # admitted, live: encoded, then added as rows
    expired: list[SequenceRequest] = field(default_factory=list)  # admitted, but their deadline passed queued
    leaves: list[SequenceRequest] = field(default_factory=list)  # active, cancelled or past their deadline


@dataclass(frozen=True)
class RowsOutcome:
    """What a step means for one request: finished, or the rows its beams continue and the tokens fed next."""

    done: bool
    picks: list[int]
    tokens: list[int]


class SequenceRunner(Protocol):
    """The only object that touches the graphs (a scripted fake in the policy tests)."""

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        """Source ids ``[N, S]`` and mask → the cross-attention K/V of every decoder layer."""

    def step(self, feeds: dict[str, np.ndarray], bound: dict[str, np.ndarray]) -> np.ndarray:
        """One ragged decoder step: logits ``[N, V]``; the grown cache is written into ``bound``."""


class GraphSequenceRunner:
    """A :class:`SequenceRunner` over an entry's ``encoder`` and ``decoder_step_ragged`` graph runners."""

    def __init__(self, encoder: GraphRunner, step: GraphRunner) -> None:
        self.encoder, self.step_graph = encoder, step

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        return list(self.encoder.run(None, {"input_ids": ids, "attention_mask": mask}))

    def step(self, feeds: dict[str, np.ndarray], bound: dict[str, np.ndarray]) -> np.ndarray:
        return run_into(self.step_graph, feeds, bound)["logits"]
