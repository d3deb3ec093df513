"""Requests whose bytes are not the method's protobuf message → ``INVALID_ARGUMENT``, for every service.

grpcio parses a request before any servicer code runs, and answers a parse failure with ``UNKNOWN`` and
protobuf's exception text. That is the client's error, so this interceptor swaps each method's deserializer
for one that hands a :class:`Malformed` marker on instead of raising, and wraps the method so the marker is
answered ``INVALID_ARGUMENT`` naming the message type — for unary and streamed requests alike (a stream is
answered when its bad message arrives). The wrapped handlers are built once per method and cached. Being the
one wrapper every handler runs in, it also counts the handlers running (:class:`ActiveCalls`), for the drain.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from transerve.server.edge.active_calls import ActiveCalls


class Malformed:
    """What the safe deserializer returns for bytes that do not parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    owner = getattr(deserializer, "__self__", None)
    kind = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, or anything a parser raises on hostile bytes
            return Malformed(f"request: {len(data)} bytes are not a valid {kind} message ({type(e).__name__})")

    return parse


async def _refuse(context: Any, request: Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async def messages() -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Malformed):
                await _refuse(context, request)
            yield request

    return messages()


def _wrap_unary_request(inner: Callable[..., Any], calls: ActiveCalls) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(inner):
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            calls.enter()
            try:
                if isinstance(request, Malformed):
                    await _refuse(context, request)
                async for response in inner(request, context):
                    yield response
            finally:
                calls.leave()

        return stream

    async def unary(request: Any, context: Any) -> Any:
        calls.enter()
        try:
            if isinstance(request, Malformed):
                await _refuse(context, request)
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result
        finally:
            calls.leave()

    return unary


def _wrap_streamed_request(inner: Callable[..., Any], calls: ActiveCalls) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(inner):
        async def stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            calls.enter()
            try:
                async for response in inner(_checked(requests, context), context):
                    yield response
            finally:
                calls.leave()

        return stream

    async def unary(requests: AsyncIterator[Any], context: Any) -> Any:
        calls.enter()
        try:
            result = inner(_checked(requests, context), context)
            return await result if inspect.isawaitable(result) else result
        finally:
            calls.leave()

    return unary


def safe_handler(handler: grpc.RpcMethodHandler, calls: ActiveCalls) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that never raises, a behaviour that refuses what did not parse, and its
    runs counted in ``calls``."""
    if handler.request_deserializer is None:
        return handler
    parse, serialize = _safe(handler.request_deserializer), handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_wrap_unary_request(handler.unary_unary, calls), parse,
                                                   serialize)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_wrap_unary_request(handler.unary_stream, calls), parse,
                                                    serialize)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_wrap_streamed_request(handler.stream_unary, calls), parse,
                                                    serialize)
    return grpc.stream_stream_rpc_method_handler(_wrap_streamed_request(handler.stream_stream, calls), parse,
                                                 serialize)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Installs :func:`safe_handler` on every method. Put it last among the interceptors: its continuation then
    returns the registered handlers themselves (one per method, so the cache stays as small as the API), and
    the interceptors before it (auth) wrap the safe handler."""

    def __init__(self, calls: ActiveCalls | None = None) -> None:
        self.calls = calls if calls is not None else ActiveCalls()
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: Any) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        cached = self._cache.get(handler_call_details.method)
        if cached is None or cached[0] is not handler:
            cached = self._cache[handler_call_details.method] = (handler, safe_handler(handler, self.calls))
        return cached[1]
