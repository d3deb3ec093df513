"""The REST port's bounds on request heads, against a real server over raw sockets: a head too large (431), too
many header fields (431), a request target too long (414), a head sent too slowly (408) — each answered in
KServe's {"error": ...} with an x-request-id, readable by a client that is still writing, and the next request
answered as before; a body past the limit (413) likewise. Limits: the server's defaults (64 KiB of head, 100
fields, 8 KiB of target) with ``--http-head-timeout 1`` and ``--max-message-mb 1``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ServerProcess, running_server

HEAD_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def edge(small_repo: Path) -> Iterator[ServerProcess]:
    with running_server(small_repo, "--http-head-timeout", str(HEAD_TIMEOUT_S), "--max-message-mb", "1") as proc:
        assert proc.http_port is not None, "".join(proc.output)
        yield proc


def exchange(server: ServerProcess, request: bytes, pause_after: int | None = None) -> tuple[int, dict[str, str],
                                                                                             dict[str, str]]:
    """Send ``request`` (from a thread, as a client that keeps writing would) while reading the answer: status,
    headers, JSON body. ``pause_after``: send that many bytes, then nothing more."""
    with socket.create_connection(("127.0.0.1", server.http_port or 0), timeout=30) as sock:
        def send() -> None:
            with contextlib.suppress(OSError):  # the server may close once it dropped enough; it answered before
                sock.sendall(request if pause_after is None else request[:pause_after])

        writer = threading.Thread(target=send, daemon=True)
        writer.start()
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        writer.join(30)
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def still_serves(server: ServerProcess) -> bool:
    status, _, body = exchange(server, b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    return status == 200 and body == {"live": True}


CASES = {
    "a 1 MiB header line": (b"GET /v2/health/live HTTP/1.1\r\nx-big: " + b"a" * (1 << 20) + b"\r\n\r\n", 431,
                            "request head: more than the limit of 65536 bytes"),
    "200 header fields": (b"GET /v2/health/live HTTP/1.1\r\n" + b"".join(b"x-h%d: 1\r\n" % i for i in range(200))
                          + b"\r\n", 431, "more than the limit of 100 header fields"),
    "a 20 KiB request target": (b"GET /v2/" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", 414,
                                "request target: more than the limit of 8192 bytes"),
    "not HTTP": (b"\x16\x03\x01 hello\r\n\r\n", 400, "not a valid HTTP/1.1 request"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_oversized_heads_are_refused_in_the_kserve_format(edge: ServerProcess, case: str) -> None:
    request, expected_status, expected_message = CASES[case]
    status, headers, body = exchange(edge, request)
    assert status == expected_status and list(body) == ["error"], body
    assert expected_message in body["error"] and headers.get("x-request-id"), (headers, body)
    assert still_serves(edge)


def test_a_head_sent_too_slowly_is_refused_and_the_connection_freed(edge: ServerProcess) -> None:
    start = time.monotonic()
    status, _, body = exchange(edge, b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n", pause_after=20)
    waited = time.monotonic() - start
    assert status == 408 and "not received within 1 s" in body["error"], body
    assert HEAD_TIMEOUT_S <= waited < HEAD_TIMEOUT_S + 5, waited
    assert still_serves(edge)


def test_a_connection_that_sends_nothing_is_closed(edge: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", edge.http_port or 0), timeout=30) as sock:
        start = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, nothing to answer
        assert time.monotonic() - start < HEAD_TIMEOUT_S + 5


def chunked(body: bytes, size: int = 65536) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


BODY = b"{" + b" " * (2 << 20) + b"}"  # 2 MiB: twice --max-message-mb


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_past_the_limit_is_413_and_the_client_still_writing_reads_it(edge: ServerProcess,
                                                                           framing: str) -> None:
    head = b"POST /v2/models/tiny-vit/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    if framing == "chunked":
        request, expected = head + b"transfer-encoding: chunked\r\n\r\n" + chunked(BODY), "more than the limit"
    else:
        request, expected = head + b"content-length: %d\r\n\r\n" % len(BODY) + BODY, f"{len(BODY)} bytes exceed"
    status, headers, body = exchange(edge, request)
    assert status == 413 and f"{expected}" in body["error"] and "1048576" in body["error"], body
    assert headers.get("x-request-id") and headers.get("connection") == "close"
    assert still_serves(edge)
