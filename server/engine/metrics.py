"""Prometheus metrics and the KServe ``ModelStatistics`` counters, fed from the same events.

The registry belongs to the server object (no process-global collectors), so
tests can run several servers in one process.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from transerve.server.engine.batching import BatchStats

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


# why requests leave before or during compute (server/engine/batching.py, server/engine/scheduler.py)
DROP_REASONS = ("cancelled_queued", "expired_queued", "cancelled_decoding", "expired_decoding")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)


@dataclass
class ModelCounters:
    """Exactly the numbers ModelStatistics reports."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}  # see _series
        r = self.registry
        self.requests = Counter("transerve_requests", "Requests by model, RPC and status code",
                                ["model", "rpc", "code"], registry=r)
        self.request_seconds = Histogram("transerve_request_seconds", "Request latency in the server",
                                         ["model", "rpc"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("transerve_queue_seconds", "Time a request waited in the batcher",
                                       ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("transerve_compute_seconds", "Backend time per batch", ["model"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("transerve_batch_size", "Items per backend call", ["model"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.generated_tokens = Counter("transerve_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.in_flight = Gauge("transerve_inflight_requests", "RPCs in progress (each message of ModelStreamInfer "
                               "counts while it is answered)", ["rpc"], registry=r)
        self.dropped = Counter("transerve_dropped_requests", "Requests dropped before compute (queued) or taken out "
                               "of a decode batch, by reason", ["model", "reason"], registry=r)
        self.queue_length = Gauge("transerve_queue_length", "Items waiting in the batcher", ["model"], registry=r)
        self.counters: dict[str, ModelCounters] = defaultdict(ModelCounters)
        # continuous batching (translation): gauges read the scheduler when scraped
        self.active_sequences = Gauge("transerve_active_sequences", "Rows in the decoding batch (beams count each)",
                                      ["model"], registry=r)
        self.cached_tokens = Gauge("transerve_cached_tokens", "Tokens held in the self-attention cache",
                                   ["model"], registry=r)
        self.cache_slots = Gauge("transerve_cache_slots", "Cache slots allocated, padding included", ["model"],
                                 registry=r)
        self.tokens_per_second = Gauge("transerve_tokens_per_second", "Tokens generated per second (last 2 s)",
                                       ["model"], registry=r)
        self.time_to_first_token = Histogram("transerve_time_to_first_token_seconds",
                                             "Arrival to first generated token", ["model"],
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.translation_cache = Counter("transerve_translation_cache", "Sentence cache look-ups (hit, miss) and "
                                         "evictions", ["model", "event"], registry=r)
        self.translation_cache_bytes = Gauge("transerve_translation_cache_bytes", "Bytes held by the sentence cache",
                                             ["model"], registry=r)
        # lazy loading under a memory budget (server/engine/residency.py)
        self.model_loads = Counter("transerve_model_loads", "Model loads by result (ok, failed)", ["model", "result"],
                                   registry=r)
        self.model_load_seconds = Histogram("transerve_model_load_seconds", "Time to load a model", ["model"],
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.model_evictions = Counter("transerve_model_evictions", "Models unloaded to make room under the "
                                       "memory budget", ["model"], registry=r)
        self.resident_models = Gauge("transerve_resident_models", "Models loaded now", registry=r)
        self.resident_bytes = Gauge("transerve_resident_bytes", "Memory the loaded models cost (measured RSS each "
                                    "load added)", registry=r)
        self.memory_budget_bytes = Gauge("transerve_memory_budget_bytes", "serve --memory-budget (0: none)",
                                         registry=r)
        self.request_tokens = Histogram("transerve_request_tokens", "Tokens generated per request", ["model"],
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)

    def on_batch(self, model: str, stats: BatchStats) -> None:
        c = self.counters[model]
        c.execution_count += 1
        c.inference_count += stats.size
        c.compute.add(stats.compute_seconds)
        c.batches[stats.size].add(stats.compute_seconds)
        c.last_inference_ms = int(time.time() * 1000)
        self._series(self.compute_seconds, model).observe(stats.compute_seconds)
        self._series(self.batch_size, model).observe(stats.size)
        for waited in stats.queue_seconds:
            c.queue.add(waited)
            self._series(self.queue_seconds, model).observe(waited)

    def track_drops(self, model: str, reasons: tuple[str, ...] = DROP_REASONS) -> None:
        """Every drop series of ``model`` at 0 from the start: a dashboard then shows 0, not "no data"."""
        for reason in reasons:
            self.dropped.labels(model, reason)

    def on_drop(self, model: str, reason: str, count: int) -> None:
        self.dropped.labels(model, reason).inc(count)

    def _series(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus_client locks and validates on every ``labels``
        call (a few µs), and the request path makes seven of them per request on the event loop."""
        key = (metric, labels)
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = metric.labels(*labels)
        return series

    def begin(self, rpc: str) -> None:
        """An RPC started: in flight until :meth:`on_request` counts its end."""
        self._series(self.in_flight, rpc).inc()

    def on_request(self, model: str, rpc: str, code: str, seconds: float) -> None:
        self._series(self.in_flight, rpc).dec()
        self._series(self.requests, model, rpc, code).inc()
        self._series(self.request_seconds, model, rpc).observe(seconds)
        c = self.counters[model]
        (c.success if code == "OK" else c.fail).add(seconds)
