"""Request ids and the access log: one structured line per RPC, correlated with errors and clients.

A request's id is the client's ``x-request-id`` metadata when it sent a
usable one (so a caller's trace id follows the request into our logs), else
one we draw — lazily, because most requests are never logged. Failed requests
always carry it back in the ``x-request-id`` trailing metadata, and every log
line about a request names it. ``transerve serve --access-log`` adds one line
per finished RPC on the ``transerve.access`` logger; ``--log-format json``
makes every line a JSON object (request fields as keys) for log shippers.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any, Literal

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID_HEADER = "x-request-id"
_USABLE_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
access_log = logging.getLogger("transerve.access")

LogFormat = Literal["text", "json"]


class RequestInfo:
    """Per-request facts filled in as the request is resolved (the model label for metrics and logs)."""

    __slots__ = ("_context", "_request_id", "model")

    def __init__(self, context: Any = None, request_id: str = "") -> None:
        self.model = "-"
        self._context = context
        self._request_id: str | None = request_id if _USABLE_ID.fullmatch(request_id) else None

    @property
    def request_id(self) -> str:
        """The client's ``x-request-id`` if usable, else drawn here — only when first needed."""
        if self._request_id is None:
            self._request_id = _client_id(self._context) or uuid.uuid4().hex[:16]
        return self._request_id


def _client_id(context: Any) -> str | None:
    if context is None:
        return None
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _USABLE_ID.fullmatch(value):
            return value
    return None


def log_access(scope: RequestInfo, rpc: str, code: str, seconds: float) -> None:
    """One line per finished RPC when ``transerve.access`` is enabled at INFO (``--access-log``)."""
    if access_log.isEnabledFor(logging.INFO):
        ms = round(seconds * 1e3, 3)
        access_log.info("request %s: %s on %s → %s in %.3f ms", scope.request_id, rpc, scope.model, code, ms,
                        extra={"request_id": scope.request_id, "rpc": rpc, "model": scope.model, "code": code,
                               "ms": ms})


def configure_logging(log_format: LogFormat, access: bool, level: str = "info") -> None:
    """Format every handler of the root logger; set transerve's own level (the root keeps its own, so
    libraries stay quiet); turn the access log on or off."""
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
        for handler in logging.getLogger().handlers:
            handler.setFormatter(formatter)
    # the root logger may stay at WARNING: records propagate to its handlers whatever its own level
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # -v (DEBUG everywhere) wins
        logging.getLogger("transerve").setLevel(level.upper())
    access_log.setLevel(logging.INFO if access else logging.WARNING)
