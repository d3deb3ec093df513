"""The server process: load and warm the repository, serve gRPC + metrics, drain on SIGTERM.

Lifecycle: health is ``NOT_SERVING`` while models load and warm up,
``SERVING`` once every loadable model has answered a real request — never
when the repository loaded no model at all; an entry that failed to load is
``NOT_SERVING`` under its own name — and ``NOT_SERVING`` again the moment a
drain begins. On SIGTERM the server first keeps serving for ``drain_delay``
seconds with health already ``NOT_SERVING``, as Kubernetes needs: endpoints
and load balancers take a few seconds to stop sending to a terminating pod.
Then it refuses new RPCs (``UNAVAILABLE``), lets accepted ones finish
(``grace`` seconds), drains the batchers, and the process exits 0. SIGINT
(Ctrl-C) skips the delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from transerve.server.backends.precision import PrecisionName
from transerve.server.backends.prepared_graphs import PreparedGraphs
from transerve.server.backends.runtime import BackendName
from transerve.server.edge.active_calls import ActiveCalls
from transerve.server.edge.auth import BearerTokenInterceptor, server_credentials
from transerve.server.edge.http_limits import HttpLimits
from transerve.server.edge.kserve_service import InferenceService
from transerve.server.edge.malformed import MalformedRequestInterceptor
from transerve.server.edge.task_service import ClassifierService, TranslatorService
from transerve.server.engine.loaded_model import Limits
from transerve.server.engine.manager import ModelManager
from transerve.server.engine.metrics import Metrics
from transerve.server.engine.pools import default_workers, started_pool
from transerve.server.engine.residency import EvictionPolicy
from transerve.server.engine.routed_translation import RoutedTranslator
from transerve_client._proto import inference_pb2, inference_pb2_grpc, transerve_pb2, transerve_pb2_grpc

log = logging.getLogger(__name__)
ORPHAN_QUIET = 0.25  # s with no handler running, once stopping, before calls no handler took are cancelled

SERVICE_NAMES = [inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                 transerve_pb2.DESCRIPTOR.services_by_name["Translator"].full_name,
                 transerve_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name]


@dataclass
class ServeOptions:
    repo: Path
    host: str = "127.0.0.1"
    port: int = 8001
    metrics_port: int | None = 8002
    http_port: int | None = None  # KServe v2 REST (server/edge/rest.py); `transerve serve` opens 8000 unless --no-http
    backend: BackendName = "auto"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens: tuple[str, ...] = ()  # bearer tokens for every RPC but health (empty: no auth)
    admin_tokens: tuple[str, ...] = ()  # for repository load/unload (empty: those RPCs are disabled)
    max_message_mb: int = 64
    http_limits: HttpLimits = field(default_factory=HttpLimits)  # the REST port's request heads: size, fields, time
    max_connection_age: float | None = None  # seconds; then GOAWAY, so clients reconnect (and rebalance)
    max_concurrent_rpcs: int = 4096  # beyond it gRPC refuses new RPCs with RESOURCE_EXHAUSTED (memory bound)
    health_port: int | None = None  # also grpc.health.v1 alone, plaintext and without auth (Kubernetes probes)
    grace_seconds: float = 30.0
    drain_delay: float = 5.0  # on SIGTERM: seconds of NOT_SERVING while still serving, before refusing new RPCs
    threads: int = 2
    ort_spinning: bool = False  # keep ORT threads spinning between runs: lower latency, less CPU for gRPC
    precision: PrecisionName | None = None  # overrides every entry's config.yaml `precision`
    limits: Limits = field(default_factory=Limits)
    memory_budget: int | None = None  # bytes the loaded models may cost together; lazy entries make room
    eviction: EvictionPolicy = "lru"  # which idle lazy entry makes room: least recently used, or least asked for
    pivot_language: str = "en"  # A→B with no direct entry goes A→pivot→B
    prepared_graphs: str = "temp"  # optimised, prepacked graph copies for reloads: temp, off, or a folder


def pending_call_options(max_concurrent_rpcs: int) -> list[tuple[str, int]]:
    """gRPC core holds calls that arrived before the event loop asked for them; past 1 000 of those it drops
    them at random (past 3 000 always) with a bare RST_STREAM that clients see as CANCELLED. Under overload the
    event loop falls that far behind, so let the backlog be as deep as the concurrency limit: the calls then
    reach admission control and get RESOURCE_EXHAUSTED with a reason. Memory stays bounded by the same limit."""
    return [("grpc.server.max_pending_requests", max_concurrent_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", 2 * max_concurrent_rpcs)]


class TranserveServer:
    """The process's one server object: gRPC server, models, metrics, health."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.metrics = Metrics()
        self.manager = ModelManager(options.repo, options.backend, self.metrics, options.limits, options.threads,
                                    options.ort_spinning, options.precision, options.memory_budget,
                                    prepared=PreparedGraphs.from_setting(options.prepared_graphs),
                                    eviction=options.eviction)
        self.routed = RoutedTranslator.serving(self.manager, options.pivot_language)
        self.health = health.aio.HealthServicer()
        self.ready = False
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self.active_calls = ActiveCalls()  # handlers running on the serving port: when the drain may end
        self._health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self._metrics_http: Any = None
        self.service = InferenceService(self.manager, self.metrics, lambda: self.ready, bool(options.admin_tokens))
        self.http_port: int | None = None
        self._http: Any = None  # uvicorn.Server
        self._http_task: asyncio.Task[None] | None = None

    def _grpc_server(self) -> grpc.aio.Server:
        o = self.options
        limit = o.max_message_mb << 20
        auth = [BearerTokenInterceptor(o.auth_tokens, o.admin_tokens)] if o.auth_tokens or o.admin_tokens else []
        # the malformed-request wrapper goes last: it must see the registered handlers
        interceptors = [*auth, MalformedRequestInterceptor(self.active_calls)]
        options: list[tuple[str, int]] = [("grpc.max_receive_message_length", limit),
                                          ("grpc.max_send_message_length", limit),
                                          *pending_call_options(o.max_concurrent_rpcs)]
        if o.max_connection_age:  # behind a connection-level balancer, aged connections spread out on reconnect
            options += [("grpc.max_connection_age_ms", int(o.max_connection_age * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(o.grace_seconds * 1000))]
        server = grpc.aio.server(interceptors=interceptors, options=options,
                                 maximum_concurrent_rpcs=o.max_concurrent_rpcs)
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.service, server)
        transerve_pb2_grpc.add_TranslatorServicer_to_server(TranslatorService(self.manager, self.metrics, self.routed),
                                                            server)
        transerve_pb2_grpc.add_ClassifierServicer_to_server(ClassifierService(self.manager, self.metrics), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection([*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        address = f"{o.host}:{o.port}"
        try:
            if o.tls_cert and o.tls_key:
                creds = server_credentials(o.tls_cert, o.tls_key, o.tls_client_ca)
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpc's own message points at GRPC_VERBOSITY; say what the user can act on
            raise OSError(f"cannot listen on {address}: the port is in use or the address is not this "
                          "machine's (choose another --port / --host)") from None
        return server

    async def _stop_grpc(self) -> None:
        """Stop accepting, let every running handler finish within the grace period — and end the grace as
        soon as none has run for a moment, cancelling calls gRPC accepted but handed to no handler
        (:mod:`transerve.server.edge.active_calls`), instead of holding their clients for the whole grace."""
        assert self._server is not None
        stopping = asyncio.ensure_future(self._server.stop(self.options.grace_seconds))
        idle = asyncio.ensure_future(self.active_calls.wait_idle(quiet=ORPHAN_QUIET))
        try:
            await asyncio.wait({stopping, idle}, return_when=asyncio.FIRST_COMPLETED)
            if not stopping.done():
                log.info("every handler has answered; cancelling calls gRPC accepted but handed to none")
                await self._server.stop(0)
            await stopping
        finally:
            idle.cancel()

    def _plaintext_health_server(self, port: int) -> grpc.aio.Server:
        """grpc.health.v1 only, plaintext, no token: what Kubernetes' gRPC probes can reach when the serving
        port wants TLS or a token. It shares the health servicer, so it says what the serving port says."""
        server = grpc.aio.server(interceptors=[MalformedRequestInterceptor()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.health_port = server.add_insecure_port(f"{self.options.host}:{port}")
        return server

    async def _set_health(self, status: int) -> None:
        for name in ["", *SERVICE_NAMES, *self.manager.servable()]:
            await self.health.set(name, status)
        for name, state in self.manager.states.items():  # failed entries: known to health, never SERVING
            if state.state not in ("READY", "AVAILABLE"):
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server = self._grpc_server()
        await self._server.start()  # listening, but health says NOT_SERVING until models are warm
        if self.options.health_port is not None:
            self._health_server = self._plaintext_health_server(self.options.health_port)
            await self._health_server.start()
        if self.options.http_port is not None:
            self._http, sock = http_server(self.service, self.options)
            self.http_port = sock.getsockname()[1]
            self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        if self.options.metrics_port is not None:
            self._metrics_http, _ = start_http_server(self.options.metrics_port, addr=self.options.host,
                                                      registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        await self.manager.load_all()
        self.manager.freeze_startup_objects()
        if not self.manager.servable():
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            log.error("no model of %s loaded: health stays NOT_SERVING (%s)", self.options.repo,
                      "; ".join(f"{s.name}: {s.reason}" for s in self.manager.states.values()) or "no entries")
            print(f"transerve: NOT_SERVING, no model loaded from {self.options.repo}; listening on "
                  f"{self.options.host}:{self.port} (metrics on {self.options.host}:{self.metrics_port})", flush=True)
            return
        self.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        print(f"transerve: serving {self.manager.servable()} on {self.options.host}:{self.port}"
              f" (metrics on {self.options.host}:{self.metrics_port})"
              + (f" (REST on {self.options.host}:{self.http_port})" if self.http_port is not None else "")
              + (f" (health on {self.options.host}:{self.health_port})" if self.health_port is not None else ""),
              flush=True)

    async def announce_drain(self) -> None:
        """NOT_SERVING at once (probes and balancers stop sending), while RPCs are still accepted."""
        self.ready = False
        await self.health.enter_graceful_shutdown()

    async def stop(self) -> None:
        """Drain: NOT_SERVING, stop accepting, finish accepted RPCs and batches."""
        await self.announce_drain()
        if self._http is not None:  # stops accepting at once; uvicorn lets requests in flight finish
            self._http.should_exit = True
        if self._server is not None:
            await self._stop_grpc()
        if self._http_task is not None:
            await self._http_task
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self.manager.aclose(self.options.grace_seconds)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        log.info("transerve stopped")


def http_server(service: InferenceService, o: ServeOptions) -> tuple[Any, socket.socket]:
    """The REST front end (uvicorn) on a socket bound here, so the port is known (and taken) at once."""
    from transerve.server.edge.rest import EmbeddedUvicorn, RestApi, build_app  # FastAPI: imported only when REST is on

    api = RestApi(service, o.auth_tokens, o.admin_tokens, o.max_message_mb << 20)
    tls: dict[str, Any] = {}
    if o.tls_cert and o.tls_key:
        tls = {"ssl_certfile": str(o.tls_cert), "ssl_keyfile": str(o.tls_key)}
        if o.tls_client_ca:
            tls.update(ssl_ca_certs=str(o.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    server = EmbeddedUvicorn(build_app(api), o.http_limits, limit_concurrency=o.max_concurrent_rpcs,
                             timeout_graceful_shutdown=o.grace_seconds, **tls)
    family = socket.AF_INET6 if ":" in o.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((o.host, o.http_port or 0))
    except OSError:
        sock.close()
        raise OSError(f"cannot listen on {o.host}:{o.http_port} for REST: the port is in use or the address is not "
                      "this machine's (choose another --http-port, or --no-http)") from None
    sock.listen(1024)
    sock.setblocking(False)
    return server, sock


async def serve(options: ServeOptions) -> None:
    server = TranserveServer(options)
    stop = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    loop.set_default_executor(started_pool(default_workers(), "worker"))  # the thread count is fixed from here on
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.start()
        await stop.wait()
        if received[0] == signal.SIGTERM and options.drain_delay > 0:
            await server.announce_drain()
            print(f"transerve: NOT_SERVING; still accepting for {options.drain_delay:g} s", flush=True)
            stop.clear()
            with contextlib.suppress(TimeoutError):  # a second signal ends the delay early
                await asyncio.wait_for(stop.wait(), options.drain_delay)
        print("transerve: draining", flush=True)
    finally:
        await server.stop()
