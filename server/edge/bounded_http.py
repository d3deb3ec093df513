"""Bounds on what an HTTP client can make the REST port parse, before the application sees the request.

The REST port shares the event loop with gRPC: whatever an HTTP client makes the loop do, every gRPC caller
waits for. uvicorn's httptools protocol reads a request head of any size (a 64 MB header line took 4.7 s of
the loop) and waits for it as long as the client likes. :class:`BoundedHttpProtocol` is that protocol with
limits, checked as bytes arrive, so refusing costs at most the limit plus one read:

- the request head (request line and headers) at most ``max_head_bytes`` → 431, and at most
  ``max_headers`` header fields → 431; the request target at most ``max_target_bytes`` → 414;
- the head complete within ``head_timeout_s`` of its first byte (or of the connection, for the first
  request) → 408: a client dribbling its headers holds neither the loop nor a connection for long.

Idle keep-alive connections are uvicorn's ``timeout_keep_alive``. Each refusal is KServe's
``{"error": ...}`` with an ``x-request-id``; then the server stops writing (FIN) and reads and discards what
the client is still sending — up to :data:`DISCARD_BYTES` or :data:`DISCARD_S` — before it closes: closing a
socket with unread bytes sends a reset, and a client still writing would see ``ConnectionResetError`` instead
of the answer. Nothing after a refused head is taken as a next request.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from transerve.server.edge.http_limits import HttpLimits
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DISCARD_BYTES = 8 << 20  # read and dropped after a refusal, so the client can read it; then the connection goes
DISCARD_S = 5.0
REASONS = {400: b"Bad Request", 408: b"Request Timeout", 414: b"URI Too Long",
           431: b"Request Header Fields Too Large"}


class Refused(Exception):
    """Raised in a parser callback to stop parsing; httptools hands it to uvicorn as a parser error, whose
    answer (:meth:`BoundedHttpProtocol.send_400_response`) sends the refusal recorded before."""


def bounded_protocol(limits: HttpLimits) -> type[HttpToolsProtocol]:
    """uvicorn's ``http`` protocol class with ``limits`` (uvicorn makes one instance per connection)."""
    return type("BoundedHttpProtocol", (BoundedHttpProtocol,), {"limits": limits})


class BoundedHttpProtocol(HttpToolsProtocol):
    limits = HttpLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None
        self._discard_left = -1  # ≥ 0 once refused: bytes still to read and drop before closing
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _start_head(self) -> None:
        """A request head starts: its bytes, fields and time are counted from here."""
        self._in_head, self._head_bytes, self._fields, self._target = True, 0, 0, 0
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()  # type: ignore[union-attr]
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._discard_left >= 0:
            self._discard_left -= len(data)
            if self._discard_left < 0:
                self.transport.close()
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.limits.max_head_bytes and not self.transport.is_closing():
            self._refuse(431, f"request head: more than the limit of {self.limits.max_head_bytes} bytes")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error — also to our callbacks' refusals, which come through it."""
        if self._refusal is not None:
            self._refuse(*self._refusal)
        else:
            self._refuse(400, "not a valid HTTP/1.1 request")

    def on_message_begin(self) -> None:
        if not self._in_head:  # the next request on this connection
            self._start_head()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._target += len(url)
        if self._target > self.limits.max_target_bytes:
            self._refusal = (414, f"request target: more than the limit of {self.limits.max_target_bytes} bytes")
            raise Refused(self._refusal[1])
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > self.limits.max_headers:
            self._refusal = (431, f"request head: more than the limit of {self.limits.max_headers} header fields")
            raise Refused(self._refusal[1])
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        super().on_headers_complete()

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            if self._head_bytes:
                self._refuse(408, f"request head: not received within {self.limits.head_timeout_s:g} s")
            else:
                self.transport.close()  # connected and silent: nothing to answer

    def eof_received(self) -> None:
        if self._discard_left >= 0:  # the client read the refusal and stopped
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """The error, then the writing side closes and what the client still sends is dropped (bounded)."""
        if self.transport.is_closing() or self._discard_left >= 0:
            return
        body = json.dumps({"error": message}).encode()
        head: list[Any] = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
                           b"content-type: application/json\r\n",
                           b"content-length: %d\r\n" % len(body),
                           b"x-request-id: %s\r\n" % uuid.uuid4().hex[:16].encode(),
                           b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self._in_head = False
        self._stop_head_timer()
        if not self.transport.can_write_eof():  # TLS: no half-close
            self.transport.close()
            return
        self.transport.write_eof()
        self._discard_left = DISCARD_BYTES
        self.loop.call_later(DISCARD_S, self.transport.close)

