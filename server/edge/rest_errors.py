"""The REST port's error answers: KServe's ``{"error": ...}`` with an ``x-request-id``, for what the routes
refuse and for what FastAPI refuses before them (unknown routes, wrong methods, bad parameters); and the
413 for a body past ``--max-message-mb``, answered after draining so that a client still writing reads it."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from transerve.server.edge.request_log import REQUEST_ID_HEADER, RequestInfo
from transerve.server.exceptions import RequestError


class BodyTooLarge(RequestError):
    """A body past ``--max-message-mb``: 413 over REST (INVALID_ARGUMENT in the metrics, as over gRPC)."""


async def drain(request: Request, bound: int) -> None:
    """Read and drop what is left of the body, at most ``bound`` bytes."""
    async for chunk in request.stream():
        bound -= len(chunk)
        if bound < 0:
            return


def error(status: int, message: str, scope: RequestInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status,
                        headers={**(headers or {}), REQUEST_ID_HEADER: scope.request_id})


def add_error_handlers(app: FastAPI) -> None:
    """What the routes do not answer themselves — an unknown route (404), a method a route does not take
    (405, with ``Allow``), parameters FastAPI refuses (400) — in the same ``{"error": ...}`` body and with the
    same ``x-request-id`` as every other error, not FastAPI's ``{"detail": ...}``."""
    def scope_of(request: Request) -> RequestInfo:
        return RequestInfo(request_id=request.headers.get(REQUEST_ID_HEADER, ""))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        what = {404: "no such route", 405: "method not allowed here"}.get(e.status_code, str(e.detail))
        return error(e.status_code, f"{request.method} {request.url.path}: {what}", scope_of(request),
                     dict(e.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(p) for p in x.get('loc', ()))}: {x.get('msg', '')}"
                             for x in e.errors()[:5])
        return error(400, problems or "invalid request", scope_of(request))
