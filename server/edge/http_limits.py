"""The REST port's bounds on request heads (``serve --http-max-head-kb`` …), apart from the protocol that
applies them (:mod:`transerve.server.edge.bounded_http`) so that a server without REST never imports uvicorn."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HttpLimits:
    """``serve --http-max-head-kb`` and friends; nginx's and Envoy's defaults are 8–64 KB of head."""

    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    max_target_bytes: int = 8 * 1024  # the request target (path and query): 414 past it
    head_timeout_s: float = 10.0
