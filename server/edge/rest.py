"""KServe v2 / Open Inference Protocol over HTTP/REST, beside gRPC in the same process and event loop.

FastAPI on uvicorn (httptools, uvloop): the routes are declared once and the OpenAPI document at
``/v2/openapi.json`` is generated from them. Every route calls what the gRPC servicer calls — the same
models, batchers, limits, metrics (``rpc`` labels ``REST/ModelInfer`` …), access log, bearer tokens and
TLS — so the two protocols cannot drift. Errors are ``{"error": "..."}`` with the status KServe specifies:
400 bad input (the message names the field and the limit), 404 unknown model, 429 when a queue is full,
503 past the concurrency limit (uvicorn's), 401 without a valid token, 403 for repository control without
an admin token or with control disabled.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, cast

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from transerve import __version__
from transerve.server.edge.auth import matches
from transerve.server.edge.bounded_http import DISCARD_BYTES, bounded_protocol
from transerve.server.edge.http_limits import HttpLimits
from transerve.server.edge.kserve_service import InferenceService, model_metadata, repository_index
from transerve.server.edge.request_log import REQUEST_ID_HEADER, RequestInfo
from transerve.server.edge.rest_codec import (
    HEADER_LENGTH,
    NESTED_TOO_DEEP,
    infer_response,
    parameter_values,
    parse_infer,
)
from transerve.server.edge.rest_errors import BodyTooLarge, add_error_handlers, drain, error
from transerve.server.edge.rpc import RpcCall
from transerve.server.exceptions import RequestError, Unauthenticated

HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
               grpc.StatusCode.UNIMPLEMENTED: 403, grpc.StatusCode.UNAVAILABLE: 503}


# The documented shapes (OpenAPI); bodies are parsed by rest_codec, which also reads the binary extension.
class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(default_factory=dict, description="runtime, precision, precision_reason")


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str = Field(description="BOOL, UINT8…UINT64, INT8…INT64, FP16, FP32, FP64 or BYTES")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: the tensor's bytes follow the "
                                                                "JSON header (Triton's binary-data extension)")
    data: list[Any] | None = Field(None, description="row-major, flat or nested; BYTES as strings")


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data: answer this output as binary")


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="timeout (µs), beam_size, max_new_tokens, "
                                                                "length_penalty, segmentation, cache, "
                                                                "scores, alignments, glossary (a list of "
                                                                "{source, target}), format (text | html), "
                                                                "binary_data_output")
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[ResponseOutput]


class ErrorBody(BaseModel):
    error: str


class LanguagePairEntry(BaseModel):
    source: str
    target: str
    via: str = Field("", description="the pivot language; empty when one entry translates the pair")
    models: list[str]
    loaded: bool


class LanguagesBody(BaseModel):
    pairs: list[LanguagePairEntry]
    pivot_language: str
    detectable: list[str] = Field(description='what source_language "auto" chooses among')


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: str
    reason: str


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 429, 503)}


class RestApi:
    """The REST routes' behaviour, over the gRPC servicer's (one per process)."""

    def __init__(self, service: InferenceService, tokens: Sequence[str], admin_tokens: Sequence[str],
                 max_body_bytes: int) -> None:
        self.service, self.metrics = service, service.metrics
        self._user = [f"Bearer {t}".encode() for t in tokens]
        self._admin = [f"Bearer {t}".encode() for t in admin_tokens]
        self.max_body_bytes = max_body_bytes

    def authorize(self, request: Request, admin: bool = False) -> None:
        """The gRPC interceptor's rules (server/edge/auth.py): user or admin tokens open everything but repository
        control, which only admin tokens open."""
        accepted = self._admin if admin else [*self._user, *self._admin]
        if not accepted or (not admin and not self._user):
            return
        given = request.headers.get("authorization", "").encode()
        if matches(given, accepted):
            return
        if admin and given and matches(given, self._user):
            raise Unauthenticated("repository control needs an admin token", 403)
        raise Unauthenticated("missing bearer token" if not given else "invalid bearer token", 401)

    async def answer(self, rpc: str, request: Request, handler: Callable[[RequestInfo], Awaitable[Response]],
                     admin: bool = False) -> Response:
        """Run ``handler`` on the one RPC path, with errors as KServe's JSON error bodies."""
        scope = RequestInfo(request_id=request.headers.get(REQUEST_ID_HEADER, ""))
        with RpcCall(self.metrics, f"REST/{rpc}", scope) as call:
            try:
                self.authorize(request, admin)
                return await handler(scope)
            except Unauthenticated as e:
                call.refused("UNAUTHENTICATED" if e.status == 401 else "PERMISSION_DENIED")
                return error(e.status, str(e), scope)
            except BodyTooLarge as e:
                status, message = call.failed(e)
                return error(413, message, scope, {"connection": "close"})
            except Exception as e:
                status, message = call.failed(e)
                return error(HTTP_STATUS.get(status, 500), message, scope)

    async def body(self, request: Request) -> bytes:
        """The request body, refused (413) once it passes the message limit (gRPC's --max-message-mb). What the
        client still sends is read and dropped first, up to :data:`DISCARD_BYTES` past the limit: answered
        while it still writes, a client sees a reset, not the 413."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            if int(declared) <= self.max_body_bytes + DISCARD_BYTES:
                await drain(request, self.max_body_bytes + DISCARD_BYTES)
            raise BodyTooLarge(f"body: {declared} bytes exceed the limit of {self.max_body_bytes} (--max-message-mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                await drain(request, self.max_body_bytes + DISCARD_BYTES - size)
                raise BodyTooLarge(f"body: more than the limit of {self.max_body_bytes} bytes (--max-message-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def infer(self, request: Request, name: str, version: str) -> Response:
        async def inferred(scope: RequestInfo) -> Response:
            scope.model = self.service.known_model(name, version)  # an unknown model is 404 before the body
            header = request.headers.get(HEADER_LENGTH)
            if header is not None and not header.isdigit():
                raise RequestError(f"header {HEADER_LENGTH}: {header!r} is not a byte count")
            parsed = parse_infer(await self.body(request), None if header is None else int(header), name, version,
                                 self.service.manager.limits.max_elements)
            reply = await self.service.infer(parsed.request, scope, None)
            body, header_length = infer_response(reply, parsed)
            if header_length is None:
                return Response(body, media_type="application/json")
            return Response(body, media_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(header_length)})

        return await self.answer("ModelInfer", request, inferred)

    async def languages(self, request: Request) -> Response:
        async def listed(scope: RequestInfo) -> Response:
            router, loaded = self.service.routed.router, self.service.manager.models
            return JSONResponse({"pivot_language": router.pivot, "detectable": router.sources(), "pairs": [
                {"source": r.source, "target": r.target, "via": r.via, "models": r.models,
                 "loaded": all(m in loaded for m in r.models)} for r in router.routes()]})

        return await self.answer("ListLanguages", request, listed)

    async def metadata(self, request: Request, name: str, version: str) -> Response:
        async def metadata(scope: RequestInfo) -> Response:
            model = self.service.manager.get(name, version)
            scope.model = model.name
            m = model_metadata(model, self.service.manager)
            return JSONResponse({
                "name": m.name, "versions": list(m.versions), "platform": m.platform,
                "inputs": [tensor_json(t) for t in m.inputs], "outputs": [tensor_json(t) for t in m.outputs],
                "parameters": parameter_values(m.parameters)})

        return await self.answer("ModelMetadata", request, metadata)

    async def model_ready(self, request: Request, name: str, version: str) -> Response:
        async def readiness(scope: RequestInfo) -> Response:
            self.service.manager.get(name, version)  # 404 when unknown
            ready = bool(self.service.is_ready())
            return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 400)

        return await self.answer("ModelReady", request, readiness)

    async def repository(self, request: Request, action: str, name: str = "") -> Response:
        async def repository_reply(scope: RequestInfo) -> Response:
            scope.model = name or "-"
            if action == "index":
                ready = bool(await self._json_field(request, "ready", False))
                return JSONResponse([{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                                     for m in repository_index(self.service.manager, ready).models])
            await (self.service.load(name) if action == "load" else self.service.unload(name))
            return JSONResponse({})

        rpc = {"index": "RepositoryIndex", "load": "RepositoryModelLoad", "unload": "RepositoryModelUnload"}[action]
        return await self.answer(rpc, request, repository_reply, admin=action != "index")

    async def _json_field(self, request: Request, key: str, default: Any) -> Any:
        raw = await self.body(request)
        if not raw.strip():
            return default
        try:
            doc = json.loads(raw)
        except ValueError:
            raise RequestError("body: not JSON") from None
        except RecursionError:
            raise RequestError(NESTED_TOO_DEEP) from None
        return doc.get(key, default) if isinstance(doc, dict) else default


def tensor_json(t: Any) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]}


def build_app(api: RestApi) -> FastAPI:
    """The FastAPI application: KServe v2's REST routes (with and without ``/versions/{version}``)."""
    app = FastAPI(title="transerve — KServe v2 inference protocol (REST)", version=__version__,
                  openapi_url="/v2/openapi.json", docs_url=None, redoc_url=None)
    add_error_handlers(app)

    @app.get("/v2/health/live", tags=["health"], summary="The server is live (200) — no token needed")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"], summary="Every model is loaded and warm (200), else 400",
             responses={400: {"description": "not ready (loading, or draining)"}})
    async def ready() -> Response:
        ok = bool(api.service.is_ready())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 400)

    @app.get("/v2", tags=["server"], response_model=ServerMetadata, responses=ERRORS)
    async def server_metadata(request: Request) -> Response:
        async def server_metadata(scope: RequestInfo) -> Response:
            return JSONResponse({"name": "transerve", "version": __version__,
                                 "extensions": ["model_repository", "statistics", "binary_tensor_data"]})

        return await api.answer("ServerMetadata", request, server_metadata)

    @app.get("/v2/languages", tags=["server"], response_model=LanguagesBody, responses=ERRORS,
             summary='The language pairs served (direct and through the pivot): send them to the model "translate" '
             "with parameters source_language and target_language")
    async def languages(request: Request) -> Response:
        return await api.languages(request)

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        add_model_routes(app, api, prefix)

    @app.post("/v2/repository/index", tags=["repository"], response_model=list[RepositoryEntry], responses=ERRORS,
              summary='Every entry and its state; body {"ready": true} lists only the loaded ones')
    async def index(request: Request) -> Response:
        return await api.repository(request, "index")

    @app.post("/v2/repository/models/{name}/load", tags=["repository"], responses=ERRORS,
              summary="Load or reload an entry (admin token; needs --admin-token-file)")
    async def load(request: Request, name: str) -> Response:
        return await api.repository(request, "load", name)

    @app.post("/v2/repository/models/{name}/unload", tags=["repository"], responses=ERRORS,
              summary="Unload an entry (admin token; needs --admin-token-file)")
    async def unload(request: Request, name: str) -> Response:
        return await api.repository(request, "unload", name)

    generated = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document of these routes, plus the request schemas the raw-body route refers to."""
        if app.openapi_schema is None:
            app.openapi_schema = with_request_schemas(generated())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def add_model_routes(app: FastAPI, api: RestApi, prefix: str) -> None:
    @app.get(prefix, tags=["models"], response_model=ModelMetadata, responses=ERRORS)
    async def metadata(request: Request, name: str, version: str = "") -> Response:
        return await api.metadata(request, name, version)

    @app.get(f"{prefix}/ready", tags=["models"], responses=ERRORS, summary="200 when ready, else 400")
    async def model_ready(request: Request, name: str, version: str = "") -> Response:
        return await api.model_ready(request, name, version)

    @app.post(f"{prefix}/infer", tags=["models"], response_model=InferenceResponse, responses=ERRORS,
              summary="Inference: JSON tensors, or a JSON header and binary tensors (Inference-Header-Content-Length)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def infer(request: Request, name: str, version: str = "") -> Response:
        return await api.infer(request, name, version)


def openapi_json() -> str:
    """The document ``make openapi`` writes to protos/openapi.json. Only the routes are read, so no server (and
    no RestApi) is needed to produce it."""
    return json.dumps(build_app(cast(RestApi, None)).openapi(), indent=1, sort_keys=True) + "\n"


def with_request_schemas(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in (InferenceRequest, RequestInput, RequestOutput):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas[model.__name__] = schema
    return document



class EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside the gRPC server's event loop: the process's signal handlers stay ours (SIGTERM drains
    both protocols, server/app.py), and ``should_exit`` stops it."""

    def __init__(self, app: FastAPI, limits: HttpLimits | None = None, **options: Any) -> None:
        super().__init__(uvicorn.Config(app, http=bounded_protocol(limits or HttpLimits()), log_level="warning",
                                        access_log=False,
                                        lifespan="off", server_header=False, **options))

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
