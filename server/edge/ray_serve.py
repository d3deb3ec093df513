"""transerve's runtime as a Ray Serve deployment, reached through Ray's gRPC proxy with our own protos.

Each replica runs what ``transerve serve`` runs — the model repository, the backends, the dynamic
batchers and the translation scheduler — and answers the same RPCs with the same servicers. Ray's gRPC
proxy owns the port: it accepts ``transerve.v1.Translator``, ``transerve.v1.Classifier``,
``inference.GRPCInferenceService`` and ``grpc.health.v1.Health`` (the servicer functions in
:data:`SERVICER_FUNCTIONS`), routes each call *by method name* to a replica, and answers server
reflection itself. What the proxy does not do, this module does:

- errors: an exception escaping a deployment method reaches the client as ``INTERNAL`` with a Ray
  traceback in its details, so every method here ends with our own status and message instead
  (:class:`ProxiedContext` gives the servicers the ``abort`` they call);
- health: ``grpc.health.v1`` Check is answered by a replica, which is routable only once its models have
  loaded and warmed (the constructor awaits that), so ``SERVING`` means what it means on ``transerve serve``;
- identity: every answer carries ``x-transerve-replica: <replica id>@<host>:<pid>`` in its trailing
  metadata, so a client (and the tests) can see which replica served it.

It lives in the installed package rather than in ``deploy/ray/`` because Ray imports the application in
its own worker processes, which see the installed packages but not the project's checkout. Only Ray
imports this module; the server itself never does.

Not carried through the proxy: the client's deadline (Ray does not forward ``grpc-timeout``; the
proxy's ``request_timeout_s`` bounds a request instead), and repository control (``RepositoryModelLoad``
/ ``Unload`` would change one replica of many, so they answer ``UNIMPLEMENTED``; redeploy the application).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from transerve.languages import normalize
from transerve.server.backends.prepared_graphs import PreparedGraphs
from transerve.server.edge.kserve_service import InferenceService
from transerve.server.edge.request_log import RequestInfo
from transerve.server.edge.rpc import failure
from transerve.server.edge.task_service import ClassifierService, TranslatorService
from transerve.server.engine.loaded_model import Limits
from transerve.server.engine.manager import ModelManager
from transerve.server.engine.metrics import Metrics
from transerve.server.engine.residency import parse_bytes
from transerve.server.engine.routed_translation import RoutedTranslator
from transerve.server.exceptions import RpcAborted
from transerve_client._proto import inference_pb2 as ipb
from transerve_client._proto import transerve_pb2 as tpb

log = logging.getLogger(__name__)
R = TypeVar("R")

REPO_ENV = "TRANSERVE_REPO"
THREADS_ENV = "TRANSERVE_THREADS"
PRECISION_ENV = "TRANSERVE_PRECISION"
BUDGET_ENV = "TRANSERVE_MEMORY_BUDGET"  # each replica's own: Ray multiplexes replicas, each keeps its LRU
REPLICA_HEADER = "x-transerve-replica"
SERVICER_FUNCTIONS = [
    "transerve_client._proto.transerve_pb2_grpc.add_TranslatorServicer_to_server",
    "transerve_client._proto.transerve_pb2_grpc.add_ClassifierServicer_to_server",
    "transerve_client._proto.inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
# the names health Check answers SERVING for, as on `transerve serve` (plus each model's name)
HEALTH_NAMES = ["", "inference.GRPCInferenceService", "transerve.v1.Translator", "transerve.v1.Classifier"]


class ProxiedContext:
    """The part of ``grpc.aio.ServicerContext`` our servicers use, over Ray's picklable gRPC context.

    ``abort`` records the status and message and raises :class:`RpcAborted`; trailing metadata always keeps
    the replica header beside whatever the servicer adds (the request id of a failed call)."""

    def __init__(self, ray_context: RayServegRPCContext, replica: str) -> None:
        self._ray, self._replica = ray_context, replica
        self.set_trailing_metadata(())

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._ray.invocation_metadata()

    def time_remaining(self) -> float | None:
        return None  # Ray's proxy does not forward the client's deadline

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._ray.set_trailing_metadata([(REPLICA_HEADER, self._replica), *metadata])

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        self._ray.set_code(code)
        self._ray.set_details(message)

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.fail(code, message)
        raise RpcAborted(message)


def _unary_rpc(rpc: str, servicer: str, empty: Callable[[], Any]) -> Callable[..., Awaitable[Any]]:
    """A deployment method named after a unary RPC, delegating to that servicer's method of the same name.
    Ray's proxy calls it by name, and passes ``grpc_context`` because the signature asks for it."""
    async def method(self: TranserveReplica, request: Any, grpc_context: RayServegRPCContext) -> Any:
        return await self._unary(rpc, getattr(getattr(self, servicer), rpc), request, grpc_context, empty)

    method.__name__ = method.__qualname__ = rpc
    return method


@serve.deployment(
    name="transerve",
    max_ongoing_requests=256,  # the batchers want many requests in flight per replica (Ray's default is 5)
    max_queued_requests=1024,  # beyond this the proxy sheds with RESOURCE_EXHAUSTED
    ray_actor_options={"num_cpus": 1},
    graceful_shutdown_wait_loop_s=1,
    graceful_shutdown_timeout_s=30,  # the server's drain grace
)
class TranserveReplica:
    """One transerve runtime; its methods are the RPC names Ray's proxy routes to."""

    async def __init__(self, repo: str, threads: int = 1, backend: str = "auto",  # type: ignore[misc]
                       precision: str | None = None, memory_budget: int | None = None, pivot: str = "en") -> None:
        self.metrics = Metrics()
        self.manager = ModelManager(Path(repo), backend, self.metrics, Limits(), threads,  # type: ignore[arg-type]
                                    precision=precision, memory_budget=memory_budget,  # type: ignore[arg-type]
                                    prepared=PreparedGraphs.create(None))  # removed by __del__'s aclose
        self.ready = False
        routed = RoutedTranslator.serving(self.manager, pivot)
        self.inference = InferenceService(self.manager, self.metrics, lambda: self.ready, routed=routed)
        self.translator = TranslatorService(self.manager, self.metrics, routed)
        self.classifier = ClassifierService(self.manager, self.metrics)
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.replica = f"{replica_id}@{socket.gethostname()}:{os.getpid()}"
        await self.manager.load_all()  # Ray routes to this replica only after the constructor returns
        self.manager.freeze_startup_objects()
        self.ready = True
        log.info("transerve replica %s serving %s", self.replica, sorted(self.manager.models))

    async def __del__(self) -> None:
        """Ray calls this after the replica's ongoing requests finished (or the shutdown timeout passed)."""
        self.ready = False
        await self.manager.aclose(grace=30)

    async def _unary(self, rpc: str, call: Callable[[Any, Any], Awaitable[R]], request: Any,
                     grpc_context: RayServegRPCContext, empty: Callable[[], R]) -> R:
        """Run a servicer method; a failure leaves as our status and message with an empty response."""
        context = ProxiedContext(grpc_context, self.replica)
        try:
            return await call(request, context)
        except RpcAborted:
            return empty()
        except Exception as e:  # whatever a servicer did not map: INTERNAL naming the request id, no traceback
            context.fail(*failure(context, RequestInfo(context), rpc, e))
            return empty()

    async def _stream(self, rpc: str, pieces: Callable[[ProxiedContext], AsyncIterator[R]],
                      grpc_context: RayServegRPCContext) -> AsyncIterator[R]:
        """Yield a servicer stream. A failure must raise: Ray sends a stream's status only with its messages,
        so the code and message set here reach the client through Ray's error path (our text, not a trace)."""
        context = ProxiedContext(grpc_context, self.replica)
        try:
            async for piece in pieces(context):
                yield piece
        except RpcAborted:
            raise
        except Exception as e:
            status, message = failure(context, RequestInfo(context), rpc, e)
            context.fail(status, message)
            raise RpcAborted(message) from None

    # transerve.v1.Translator / transerve.v1.Classifier
    Translate = _unary_rpc("Translate", "translator", tpb.TranslateResponse)
    ListLanguages = _unary_rpc("ListLanguages", "translator", tpb.ListLanguagesResponse)
    Classify = _unary_rpc("Classify", "classifier", tpb.ClassifyResponse)

    async def TranslateStream(self, request: tpb.TranslateStreamRequest, grpc_context: RayServegRPCContext
                              ) -> AsyncIterator[tpb.TranslateStreamResponse]:
        async for piece in self._stream("TranslateStream",
                                        lambda ctx: self.translator.TranslateStream(request, ctx), grpc_context):
            yield piece

    # inference.GRPCInferenceService (KServe v2)
    ServerLive = _unary_rpc("ServerLive", "inference", ipb.ServerLiveResponse)
    ServerReady = _unary_rpc("ServerReady", "inference", ipb.ServerReadyResponse)
    ModelReady = _unary_rpc("ModelReady", "inference", ipb.ModelReadyResponse)
    ServerMetadata = _unary_rpc("ServerMetadata", "inference", ipb.ServerMetadataResponse)
    ModelMetadata = _unary_rpc("ModelMetadata", "inference", ipb.ModelMetadataResponse)
    ModelInfer = _unary_rpc("ModelInfer", "inference", ipb.ModelInferResponse)
    ModelStatistics = _unary_rpc("ModelStatistics", "inference", ipb.ModelStatisticsResponse)
    RepositoryIndex = _unary_rpc("RepositoryIndex", "inference", ipb.RepositoryIndexResponse)

    async def ModelStreamInfer(self, requests: AsyncIterator[ipb.ModelInferRequest],
                               grpc_context: RayServegRPCContext) -> AsyncIterator[ipb.ModelStreamInferResponse]:
        async for response in self._stream("ModelStreamInfer",
                                           lambda ctx: self.inference.ModelStreamInfer(requests, ctx), grpc_context):
            yield response

    async def RepositoryModelLoad(self, request: ipb.RepositoryModelLoadRequest, grpc_context: RayServegRPCContext
                                  ) -> ipb.RepositoryModelLoadResponse:
        return self._per_process_only(grpc_context, ipb.RepositoryModelLoadResponse)

    async def RepositoryModelUnload(self, request: ipb.RepositoryModelUnloadRequest,
                                    grpc_context: RayServegRPCContext) -> ipb.RepositoryModelUnloadResponse:
        return self._per_process_only(grpc_context, ipb.RepositoryModelUnloadResponse)

    def _per_process_only(self, grpc_context: RayServegRPCContext, empty: Callable[[], R]) -> R:
        ProxiedContext(grpc_context, self.replica).fail(
            grpc.StatusCode.UNIMPLEMENTED, "repository control: under Ray Serve a load or unload would reach one "
            "replica of many; change the repository and redeploy the application instead")
        return empty()

    # grpc.health.v1.Health (not Watch: a stream held open per watcher would hold a replica's request slot)
    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
                    ) -> health_pb2.HealthCheckResponse:
        statuses = self._health_statuses()
        if request.service not in statuses:
            ProxiedContext(grpc_context, self.replica).fail(grpc.StatusCode.NOT_FOUND,
                                                            f"service: {request.service!r} is unknown")  # as grpc's
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=statuses[request.service])

    async def List(self, request: health_pb2.HealthListRequest, grpc_context: RayServegRPCContext
                   ) -> health_pb2.HealthListResponse:
        ProxiedContext(grpc_context, self.replica)  # the replica header, as on every answer
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._health_statuses().items()})

    def _health_statuses(self) -> dict[str, Any]:
        status = health_pb2.HealthCheckResponse.SERVING if self.ready else health_pb2.HealthCheckResponse.NOT_SERVING
        return {name: status for name in [*HEALTH_NAMES, *self.manager.servable()]}

def app_builder(args: dict[str, str]) -> serve.Application:
    """What ``serve run deploy/ray/serve.yaml`` builds: the repository from ``args.repo`` or ``$TRANSERVE_REPO``,
    ONNX Runtime threads per replica from ``args.threads`` or ``$TRANSERVE_THREADS`` (default 1: one Ray
    CPU per replica), the precision from ``args.precision`` or ``$TRANSERVE_PRECISION`` (default: each
    config.yaml's, as ``serve --precision``). The config file's ``deployments`` entry sets replicas and
    autoscaling."""
    repo = args.get("repo") or os.environ.get(REPO_ENV, "")
    if not repo:
        raise ValueError(f"{REPO_ENV}: not set; run `{REPO_ENV}=/path/to/repo serve run deploy/ray/serve.yaml`")
    threads = int(args.get("threads") or os.environ.get(THREADS_ENV) or 1)
    precision = args.get("precision") or os.environ.get(PRECISION_ENV) or None
    budget = args.get("memory_budget") or os.environ.get(BUDGET_ENV) or None
    return build(Path(repo), threads, args.get("backend", "auto"), precision,
                 parse_bytes(budget) if budget else None, args.get("pivot_language", "en"))


def build(repo: Path, threads: int = 1, backend: str = "auto", precision: str | None = None,
          memory_budget: int | None = None, pivot_language: str = "en", **options: Any) -> serve.Application:
    """The application from Python (``serve.run(build(repo, num_replicas=2))``); ``options`` are Ray's
    deployment options over this module's defaults."""
    path = repo.expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"{REPO_ENV}={repo}: {path} is not a directory (an absolute path is safest: Ray "
                         "builds the application in its own worker process)")
    deployment = cast(serve.Deployment, TranserveReplica)  # the decorator made it one; mypy sees the class
    if precision not in (None, "auto", "fp32", "int8", "bf16"):
        raise ValueError(f"precision {precision!r}: one of auto, fp32, int8, bf16")
    return (deployment.options(**options) if options else deployment).bind(str(path), threads, backend, precision,
                                                                           memory_budget, normalize(pivot_language))
