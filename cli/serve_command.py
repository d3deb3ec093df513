"""``transerve serve``: the gRPC inference server over a model repository."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from transerve.cli.common import fail, require_export_stack


class EventLoopChoice(StrEnum):
    uvloop = "uvloop"
    asyncio = "asyncio"


class LogLevelChoice(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormatChoice(StrEnum):
    text = "text"
    json = "json"


class BackendChoice(StrEnum):
    auto = "auto"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    torch = "torch"


class EvictionChoice(StrEnum):
    lru = "lru"
    frequency = "frequency"


class PrecisionChoice(StrEnum):
    auto = "auto"
    fp32 = "fp32"
    int8 = "int8"
    bf16 = "bf16"


def serve_command(
    repo: Annotated[Path, typer.Option(help="Model repository (REPO/NAME/config.yaml + version folders).")]
    = Path("repo"),
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, envvar="TRANSERVE_PORT",
                                      help="gRPC port (0 = any free port).")] = 8001,
    http_port: Annotated[int, typer.Option(min=0, max=65535, envvar="TRANSERVE_HTTP_PORT",
                                           help="KServe v2 REST port, beside gRPC (0 = any free port; Triton's "
                                           "default is 8000).")] = 8000,
    no_http: Annotated[bool, typer.Option("--no-http", help="Serve gRPC only (no REST port).")] = False,
    metrics_port: Annotated[int, typer.Option(min=-1, max=65535, envvar="TRANSERVE_METRICS_PORT",
                                              help="Prometheus /metrics port (0 = any free, -1 = off).")] = 8002,
    backend: Annotated[BackendChoice, typer.Option(help="auto picks TensorRT engines when present and usable, "
                                                   "else ONNX Runtime (GPU providers first).")] = BackendChoice.auto,
    precision: Annotated[PrecisionChoice | None, typer.Option(
        envvar="TRANSERVE_PRECISION",
        help="Serve every entry at this precision, overriding each config.yaml's `precision` (default there: "
        "auto). auto: among the variants whose accuracy gate passed at export and that this machine runs, the "
        "fastest the export timed on this CPU (≥ 5 % over fp32), else bf16 (OpenVINO) where the CPU has "
        "AVX512-BF16/AMX, int8 where it has VNNI, fp32 otherwise; the log and ModelMetadata say which and why. "
        "An explicit precision that cannot serve an entry leaves that entry unavailable, with the reason.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain (enables TLS).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key for --tls-cert.")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(help="CA that client certificates must be signed by "
                                                       "(enables mutual TLS).")] = None,
    health_port: Annotated[int | None, typer.Option(
        min=0, max=65535, envvar="TRANSERVE_HEALTH_PORT",
        help="Also serve grpc.health.v1 alone on this port, plaintext and without a token, for Kubernetes gRPC "
        "probes when the serving port uses TLS or auth (0 = any free port).")] = None,
    auth_token_file: Annotated[Path | None, typer.Option(
        envvar="TRANSERVE_AUTH_TOKEN_FILE",
        help="File of bearer tokens, one per line (several: rotation), one of which every RPC but the health check "
        "must carry. Without it, the environment variable TRANSERVE_AUTH_TOKEN may hold them, comma-separated. "
        "Tokens are never logged.")] = None,
    admin_token_file: Annotated[Path | None, typer.Option(
        envvar="TRANSERVE_ADMIN_TOKEN_FILE",
        help="File of admin tokens (or TRANSERVE_ADMIN_TOKEN): the only tokens that allow RepositoryModelLoad/"
        "Unload. Without admin tokens those RPCs are disabled (UNIMPLEMENTED).")] = None,
    max_message_mb: Annotated[int, typer.Option(min=1, max=2047, help="Largest gRPC message, MiB (and REST "
                                                "body).")] = 64,
    http_max_head_kb: Annotated[int, typer.Option(min=1, max=1024, help="REST: largest request head (request "
                                                  "line and headers), KiB; more is 431.")] = 64,
    http_max_headers: Annotated[int, typer.Option(min=1, max=10000, help="REST: most header fields in a request; "
                                                  "more is 431.")] = 100,
    http_head_timeout: Annotated[float, typer.Option(min=0.1, help="REST: seconds a client may take to send a "
                                                     "request head; slower is 408 (idle keep-alive "
                                                     "connections close after 5 s).")] = 10.0,
    max_concurrent_rpcs: Annotated[int, typer.Option(
        min=1, help="RPCs in progress at once, streams included; beyond it new RPCs are refused at once with "
        "RESOURCE_EXHAUSTED. The last bound on memory under overload (each model's queue sheds first).")] = 4096,
    grace: Annotated[float, typer.Option(min=0, help="Seconds accepted work may take to finish on SIGTERM.")] = 30.0,
    drain_delay: Annotated[float, typer.Option(
        min=0, envvar="TRANSERVE_DRAIN_DELAY",
        help="On SIGTERM, seconds to keep serving with health already NOT_SERVING before refusing new RPCs, so "
        "Kubernetes endpoints and load balancers stop sending first (Ctrl-C skips it).")] = 5.0,
    max_connection_age: Annotated[float | None, typer.Option(
        min=1, help="Close each client connection after this many seconds (GOAWAY; calls in flight get --grace "
        "to finish), so clients behind a connection-level load balancer reconnect and spread out.")] = None,
    threads: Annotated[int, typer.Option(min=1, envvar="TRANSERVE_THREADS",
                                         help="ONNX Runtime intra-op threads per model (containers: set "
                                         "TRANSERVE_THREADS from the CPU limit).")] = 2,
    ort_spinning: Annotated[bool, typer.Option(help="Keep ONNX Runtime's threads spinning between runs: ~0.3 ms "
                                               "less latency when idle, but their CPU is lost to gRPC under load "
                                               "(see bench/RESULTS.md).")] = False,
    event_loop: Annotated[EventLoopChoice, typer.Option(help="uvloop spends ~20 % less CPU per RPC than the "
                                                        "standard asyncio loop (see bench/RESULTS.md).")]
    = EventLoopChoice.uvloop,
    log_format: Annotated[LogFormatChoice, typer.Option(help="json: one JSON object per log line (time, level, "
                                                        "logger, message, and request_id/rpc/model/code/ms "
                                                        "on request lines).")] = LogFormatChoice.text,
    access_log: Annotated[bool, typer.Option(help="Log one line per finished RPC with its request id (the "
                                             "client's x-request-id metadata when sent), model, status and "
                                             "time.")] = False,
    log_level: Annotated[LogLevelChoice, typer.Option(help="transerve's log level: info shows model loading, "
                                                      "the backend chosen and why, failed requests.")]
    = LogLevelChoice.info,
    memory_budget: Annotated[str | None, typer.Option(
        help="What the process may hold (e.g. 4GB, 1.5GiB, 800MB): entries with `load: lazy` load on their "
        "first request and an idle one is unloaded (--eviction) when a load would not fit. Cost = the resident "
        "memory a load added, measured; the process's RSS is checked too. Default: no budget.")] = None,
    eviction: Annotated[EvictionChoice, typer.Option(
        help="Which idle lazy entry is unloaded for a load: lru — the least recently used; frequency — the one "
        "asked for least often lately (30 s half-life; ties: least recently used). bench/RESULTS.md compares "
        "them.")] = EvictionChoice.lru,
    pivot_language: Annotated[str, typer.Option(
        help="Requests naming languages A→B with no entry for the pair go A→PIVOT→B when both legs exist.")]
    = "en",
    prepared_graphs: Annotated[str, typer.Option(
        help="Where ONNX Runtime's optimised copies of graphs, weights prepacked for this CPU, are kept for "
        "the graphs that load a second time (an evicted lazy entry): such reloads map them instead of packing "
        "the weights again (an opus-mt entry: 0.7 s → 0.35 s of session making). 'temp': a temporary folder "
        "removed at exit; 'off'; or a folder, kept across restarts (not on tmpfs: that is memory).")] = "temp",
) -> None:
    """Serve every model of REPO over gRPC: KServe v2 (Triton-compatible), transerve.v1 Translator and
    Classifier, grpc.health.v1 and reflection; Prometheus metrics on --metrics-port. SIGTERM drains."""
    from transerve.server.app import ServeOptions, serve
    from transerve.server.edge.http_limits import HttpLimits
    from transerve.server.edge.request_log import configure_logging

    if (tls_cert is None) != (tls_key is None):
        raise fail("--tls-cert and --tls-key go together")
    if tls_client_ca is not None and tls_cert is None:
        raise fail("--tls-client-ca needs --tls-cert and --tls-key")
    for path in (p for p in (tls_cert, tls_key, tls_client_ca, auth_token_file, admin_token_file) if p is not None):
        if not path.is_file():
            raise fail(f"{path}: no such file")
    if backend is BackendChoice.torch:
        require_export_stack("serve --backend torch", ("torch", "safetensors"))
    budget = parse_size(memory_budget, "--memory-budget") if memory_budget is not None else None
    pivot = language_option(pivot_language, "--pivot-language")
    if not repo.is_dir():
        raise fail(f"{repo}: no such model repository (build one with `transerve zoo build --repo {repo}`)")
    options = ServeOptions(repo=repo, host=host, port=port, http_port=None if no_http else http_port,
                           metrics_port=None if metrics_port < 0 else metrics_port,
                           backend=backend.value, tls_cert=tls_cert, tls_key=tls_key,  # type: ignore[arg-type]
                           tls_client_ca=tls_client_ca,
                           auth_tokens=tokens_from(auth_token_file, "TRANSERVE_AUTH_TOKEN"),
                           admin_tokens=tokens_from(admin_token_file, "TRANSERVE_ADMIN_TOKEN"),
                           max_message_mb=max_message_mb, max_connection_age=max_connection_age,
                           http_limits=HttpLimits(http_max_head_kb << 10, http_max_headers,
                                                  head_timeout_s=http_head_timeout),
                           max_concurrent_rpcs=max_concurrent_rpcs,
                           health_port=health_port, memory_budget=budget, pivot_language=pivot,
                           prepared_graphs=prepared_graphs, eviction=eviction.value,  # type: ignore[arg-type]
                           grace_seconds=grace, drain_delay=drain_delay, threads=threads,
                           ort_spinning=ort_spinning, precision=precision.value if precision else None)
    configure_logging(log_format.value, access_log, log_level.value)  # type: ignore[arg-type]
    try:
        with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
            runner.run(serve(options))
    except (OSError, ValueError, RuntimeError) as e:
        raise fail(str(e)) from None


def parse_size(text: str, option: str) -> int:
    from transerve.server.engine.residency import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise fail(f"{option}: {e}") from None


def language_option(code: str, option: str) -> str:
    from transerve.languages import LanguageCodeError, normalize

    try:
        return normalize(code)
    except LanguageCodeError as e:
        raise fail(f"{option}: {e}") from None


def tokens_from(path: Path | None, variable: str) -> tuple[str, ...]:
    """Tokens from a file (one per line) or else from an environment variable (comma-separated)."""
    from transerve.server.edge.auth import read_tokens

    try:
        if path is not None:
            return tuple(read_tokens(path))
        value = os.environ.get(variable, "")
        tokens = tuple(t.strip() for t in value.split(",") if t.strip())
        if value and not tokens:
            raise ValueError(f"{variable}: set but holds no token")
        return tokens
    except (OSError, ValueError) as e:
        raise fail(str(e)) from None


def loop_factory(choice: EventLoopChoice) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop: grpc.aio's completion-queue wake-ups and every task switch cost less than on asyncio's."""
    if choice is EventLoopChoice.asyncio:
        return None
    import uvloop

    return uvloop.new_event_loop
