"""What every loaded model shares — identity, config, its dynamic batcher's lifecycle — and the request limits.

A model turns validated request data into backend feeds, runs them through its batcher (so concurrent requests
share one backend call), and splits the results back. The tasks are :mod:`.classifier`, :mod:`.translator` and
:mod:`.tensor_model`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from transerve.server.backends.runner import GraphRunner
from transerve.server.engine.batching import DynamicBatcher
from transerve.server.engine.metrics import Metrics
from transerve.server.engine.model_config import ModelConfig


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 16 << 20
    max_image_pixels: int = 25_000_000
    max_text_chars: int = 4096
    max_elements: int = 1 << 26


class LoadedModel(ABC):
    """What every task shares: identity, config, batcher lifecycle."""

    #: ``_run_batch`` is plain compute that may run on the event loop (the batcher's inline fast path)
    computes_inline = False

    def __init__(self, config: ModelConfig, version: str, backend: str, runners: dict[str, GraphRunner],
                 on_batch: Any) -> None:
        self.config, self.version, self.backend, self.runners = config, version, backend, runners
        self.name = config.name
        self.precision, self.precision_reason = "fp32", ""  # what transerve.server.backends.precision chose, and why
        b = config.batching
        self.batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
            self._run_batch, max_batch_size=config.max_batch_size, max_queue_delay_ms=b.max_queue_delay_ms,
            preferred_batch_sizes=b.preferred_batch_sizes, max_queue_size=b.max_queue_size, instances=b.instances,
            on_batch=lambda stats: on_batch(self.name, stats), name=config.name, flush_when_idle=b.flush_when_idle,
            max_queue_time_ms=b.max_queue_time_ms, inline_below_ms=b.inline_below_ms if self.computes_inline else 0)

    def observe(self, metrics: Metrics) -> None:
        """Let the metrics read this model's queue length when scraped, and count the requests it drops."""
        metrics.queue_length.labels(self.name).set_function(lambda: self.batcher.queued)
        self.batcher.on_drop = lambda reason, count: metrics.on_drop(self.name, reason, count)
        metrics.track_drops(self.name)

    @abstractmethod
    def _run_batch(self, payloads: list[Any]) -> list[Any]:
        """One backend call for a batch of payloads; one result per payload (runs in a worker thread)."""

    async def start(self, warm: bool = True) -> None:
        """``warm=False`` (a lazy load on a request's behalf): that request is the warm-up, and it should not
        wait for another."""
        self.batcher.start()
        if warm:
            await self.warm_up()

    @abstractmethod
    async def warm_up(self) -> None:
        """One real request through the whole path before health says SERVING."""

    async def aclose(self, grace: float) -> None:
        await self.batcher.aclose(grace)

    def release(self) -> None:
        """After :meth:`aclose`, on unload: drop the graphs' sessions at once. A model's objects refer to each
        other, so without this its weights would stay until the collector's next full pass."""
        for runner in self.runners.values():
            close = getattr(runner, "close", None)
            if close is not None:
                close()


def deadline_from(time_remaining: float | None) -> float | None:
    """gRPC's remaining time → a monotonic deadline for the batcher."""
    return None if time_remaining is None else time.monotonic() + time_remaining
