"""Bearer-token authentication and TLS credentials.

Every RPC except the standard health check needs ``authorization: Bearer
<token>`` when tokens are configured (probes from Kubernetes carry no
token). A token file may hold several tokens, one per line, so a token can be
rotated without a window where clients are refused. Repository control
(``RepositoryModelLoad`` / ``Unload``) takes only an *admin* token; without
admin tokens those RPCs are disabled (the servicer answers UNIMPLEMENTED), as
Triton restricts them. Every comparison is constant-time, against every
configured token, so timing reveals neither a token nor which one matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
ADMIN_METHODS = frozenset({"/inference.GRPCInferenceService/RepositoryModelLoad",
                           "/inference.GRPCInferenceService/RepositoryModelUnload"})


def read_tokens(path: Path) -> list[str]:
    """The tokens in a file: one per line; blank lines and ``#`` comments are skipped."""
    tokens = [line.strip() for line in path.read_text().splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise ValueError(f"{path}: the token file holds no token")
    if any(any(c.isspace() or not c.isprintable() for c in t) for t in tokens):
        raise ValueError(f"{path}: a token holds whitespace or control characters")
    return tokens


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """User tokens open every RPC but health (none configured: no check); admin tokens open everything,
    and are the only ones that open repository control."""

    def __init__(self, tokens: Sequence[str], admin_tokens: Sequence[str] = ()) -> None:
        self._user = [f"Bearer {t}".encode() for t in tokens]
        self._admin = [f"Bearer {t}".encode() for t in admin_tokens]

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        admin = method in ADMIN_METHODS
        accepted = self._admin if admin else [*self._user, *self._admin]
        if not accepted or (not admin and not self._user):
            return handler  # no token asked for (admin RPCs without admin tokens: the servicer refuses them)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if matches(given, accepted):
            return handler
        if not given:
            return _denying(handler, "missing bearer token")
        return _denying(handler, "repository control needs an admin token" if admin else "invalid bearer token")


def matches(given: bytes, accepted: Sequence[bytes]) -> bool:
    """Constant-time against every accepted value (no early exit)."""
    found = False
    for expected in accepted:
        found |= hmac.compare_digest(given, expected)
    return found


def _denying(handler: Any, message: str) -> Any:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""

    async def unary(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # makes this an async generator; abort raises first

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS; with ``client_ca`` every client must present a certificate it signed (mTLS)."""
    root = client_ca.read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())], root_certificates=root,
                                       require_client_auth=client_ca is not None)
