"""The one RPC path: every call, whatever carries it, is counted, timed, mapped and logged here.

An :class:`RpcCall` spans one RPC — a gRPC unary call or stream, one message inside ``ModelStreamInfer``, a REST
request, a call through the Ray deployment. It counts the call in flight, times it, settles its status once
and, when it ends, counts it by status and writes its access-log line. Errors are mapped to statuses in one
table (:data:`CODES`): known errors leave as themselves with their message, anything else as ``INTERNAL``
naming only the request id, after logging it. Each protocol then answers the failure its own way (abort, an
error message in the stream, a JSON error body); :func:`unary_call` is that for unary gRPC handlers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import grpc
from transerve.server.edge.request_log import REQUEST_ID_HEADER, RequestInfo, log_access
from transerve.server.edge.tensors import TensorError
from transerve.server.engine.loaded_model import deadline_from
from transerve.server.engine.metrics import Metrics
from transerve.server.exceptions import (
    ControlDisabled,
    DeadlineExceeded,
    ModelLoading,
    ModelNotFound,
    QueueFull,
    RequestError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (TensorError, grpc.StatusCode.INVALID_ARGUMENT),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelLoading, grpc.StatusCode.UNAVAILABLE),  # before its base class: a loading model is retried
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ControlDisabled, grpc.StatusCode.UNIMPLEMENTED),
]
GONE = (asyncio.CancelledError, GeneratorExit)  # the client went away (gRPC cancels a handler, closes a stream)


def status_of(error: BaseException) -> grpc.StatusCode | None:
    return next((code for kind, code in CODES if isinstance(error, kind)), None)


class RpcCall:
    """One RPC from start to end (a context manager)::

        with RpcCall(metrics, "Translate", RequestInfo(context)) as call:
            try:
                ...                                   # call.scope.model = ... once the model is known
            except Exception as e:
                status, message = call.failed(e)     # mapped and logged; answer it the protocol's way

    Its status is settled once: by :meth:`failed` or :meth:`refused`, else on leaving — ``OK``, or
    ``CANCELLED`` when the client went away, or an error that escaped unanswered, mapped as :meth:`failed`.
    """

    def __init__(self, metrics: Metrics, rpc: str, scope: RequestInfo) -> None:
        self.metrics, self.rpc, self.scope = metrics, rpc, scope
        self.code: str | None = None
        self._start = 0.0

    def __enter__(self) -> RpcCall:
        self.metrics.begin(self.rpc)
        self._start = time.perf_counter()
        return self

    def failed(self, error: Exception) -> tuple[grpc.StatusCode, str]:
        """Settle the call as failed with ``error``: its status and the message to send."""
        status, message = describe(self.scope, self.rpc, error)
        self.code = status.name
        return status, message

    def refused(self, code: str) -> None:
        """Settle the call with a status decided outside :data:`CODES` (REST's 401/403)."""
        self.code = code

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.code is None:
            if kind is None:
                self.code = "OK"
            elif isinstance(error, Exception) and not isinstance(error, GONE):
                self.failed(error)
            else:
                self.code = "CANCELLED"
        code, seconds = self.code or "UNKNOWN", time.perf_counter() - self._start
        self.metrics.on_request(self.scope.model, self.rpc, code, seconds)
        log_access(self.scope, self.rpc, code, seconds)


async def abort(call: RpcCall, context: Any, error: Exception) -> None:
    """End a failed gRPC call: its status and message, and the request id in the trailing metadata."""
    status, message = call.failed(error)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, call.scope.request_id),))
    await context.abort(status, message)


async def unary_call(metrics: Metrics, rpc: str, context: grpc.aio.ServicerContext,
                  handler: Callable[[RequestInfo], Awaitable[T]]) -> T:
    """A unary gRPC handler on the one path: ``handler``'s reply, or the call aborted with its error's status."""
    with RpcCall(metrics, rpc, RequestInfo(context)) as call:
        try:
            return await handler(call.scope)
        except Exception as e:
            await abort(call, context, e)
            raise  # abort raises; this keeps type checkers aware


def failure(context: Any, scope: RequestInfo, rpc: str, error: Exception) -> tuple[grpc.StatusCode, str]:
    """:func:`describe`, and the request id in the trailing metadata: how an error that escaped a servicer ends
    (the Ray deployment's last resort; the call was counted by the servicer's own :class:`RpcCall`)."""
    status, message = describe(scope, rpc, error)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, scope.request_id),))
    return status, message


def describe(scope: RequestInfo, rpc: str, error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message for a failed request — known errors as themselves, anything else as INTERNAL
    naming only the request id — after logging it."""
    status = status_of(error)
    fields = {"request_id": scope.request_id, "rpc": rpc, "model": scope.model}
    if status is None:
        log.exception("request %s (%s on %s) failed", scope.request_id, rpc, scope.model, extra=fields)
        return grpc.StatusCode.INTERNAL, f"internal error (request id {scope.request_id})"
    log.info("request %s (%s on %s): %s %s", scope.request_id, rpc, scope.model, status.name, error,
             extra={**fields, "code": status.name})
    return status, str(error)


def remaining(context: grpc.aio.ServicerContext) -> float | None:
    left: Any = context.time_remaining()
    return None if left is None else float(left)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's gRPC deadline as a monotonic time for the engine (None: no deadline)."""
    return deadline_from(remaining(context))
