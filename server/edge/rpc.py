"""One place that turns exceptions into gRPC status codes, and counts every request once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from transerve.server.edge.request_log import REQUEST_ID_HEADER, Scope, log_access
from transerve.server.edge.tensors import TensorError
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


def status_of(error: BaseException) -> grpc.StatusCode | None:
    return next((code for kind, code in CODES if isinstance(error, kind)), None)


async def guarded(metrics: Metrics, rpc: str, context: grpc.aio.ServicerContext,
                  handler: Callable[[Scope], Awaitable[T]]) -> T:
    """Run ``handler``; known errors leave as their status with the message, others as INTERNAL."""
    scope, start = Scope(context), time.perf_counter()
    metrics.begin(rpc)
    code = "OK"
    try:
        return await handler(scope)
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except Exception as e:
        status, message = failure(context, scope, rpc, e)
        code = status.name
        await context.abort(status, message)
        raise  # abort raises; this keeps type checkers aware
    finally:
        finish(metrics, scope, rpc, code, time.perf_counter() - start)


def failure(context: Any, scope: Scope, rpc: str, error: Exception) -> tuple[grpc.StatusCode, str]:
    """:func:`describe`, and the request id in the trailing metadata: how a failed RPC ends."""
    status, message = describe(scope, rpc, error)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, scope.request_id),))
    return status, message


def describe(scope: Scope, rpc: str, error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message for a failed request — known errors as themselves, anything else as INTERNAL
    naming only the request id — after logging it. Every RPC, unary or streaming, maps its errors here
    (a failed message inside ``ModelStreamInfer`` is answered in the stream with this status and message)."""
    status = status_of(error)
    fields = {"request_id": scope.request_id, "rpc": rpc, "model": scope.model}
    if status is None:
        log.exception("request %s (%s on %s) failed", scope.request_id, rpc, scope.model, extra=fields)
        status, message = grpc.StatusCode.INTERNAL, f"internal error (request id {scope.request_id})"
    else:
        message = str(error)
        log.info("request %s (%s on %s): %s %s", scope.request_id, rpc, scope.model, status.name, message,
                 extra={**fields, "code": status.name})
    return status, message


def finish(metrics: Metrics, scope: Scope, rpc: str, code: str, seconds: float) -> None:
    """Count a finished RPC once (it was counted in flight by ``metrics.begin``), and write its access-log line."""
    metrics.on_request(scope.model, rpc, code, seconds)
    log_access(scope, rpc, code, seconds)


def remaining(context: grpc.aio.ServicerContext) -> float | None:
    left: Any = context.time_remaining()
    return None if left is None else float(left)
