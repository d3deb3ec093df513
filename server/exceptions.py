"""Every exception type the server raises on purpose, in one leaf module that every wing may import.

The edge maps them to gRPC and HTTP statuses (:mod:`transerve.server.edge.rpc`); the engine and the backends
raise them. Keeping them here is what lets the edge know the engine's failures without importing upward
chains, and lets a backend fail without knowing who called it.
"""

from __future__ import annotations


class RequestError(ValueError):
    """Bad request content (→ INVALID_ARGUMENT); the message names the field and the limit."""


class ModelNotFound(LookupError):
    """Unknown model or version (→ NOT_FOUND)."""


class ModelLoading(ModelNotFound):
    """A model the repository holds but that is still loading (→ UNAVAILABLE, which clients retry): the gRPC
    port listens before the first load ends, so that health can say NOT_SERVING meanwhile."""


class ControlDisabled(RuntimeError):
    """Repository control asked of a server that does not allow it (→ UNIMPLEMENTED)."""


class QueueFull(RuntimeError):
    """The model's queue is at ``max_queue_size`` (→ RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed while it waited (→ DEADLINE_EXCEEDED)."""


class ConfigError(ValueError):
    """A repository entry whose config.yaml is missing or invalid."""


class BackendError(RuntimeError):
    """The requested backend cannot run this entry here; the message says why."""


class PrecisionError(ValueError):
    """The asked-for precision cannot serve this entry here; the message says why."""


class Unauthenticated(Exception):
    """No valid bearer token (401), or a user token where an admin one is needed (403)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RpcAborted(Exception):
    """Raised by the Ray deployment's ``ProxiedContext.abort``: the status and message are already set."""
