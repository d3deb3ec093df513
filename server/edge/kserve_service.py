"""``inference.GRPCInferenceService``: the KServe v2 / Open Inference Protocol, as Triton clients expect it.

Every model is reachable through ModelInfer: classifiers take ``images``
(FP32 ``[N, C, H, W]``, preprocessed) and answer ``logits``; translators take
``text`` (BYTES ``[N]``) and answer ``translation`` (BYTES ``[N]``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import numpy as np
from transerve import __version__
from transerve.server.edge.infer_parameters import InferParameters, parse_parameters
from transerve.server.edge.routed_infer import ROUTED_MODEL, is_routed, routed_outputs
from transerve.server.edge.rpc import RequestInfo, RpcCall, deadline_of, remaining, unary_call
from transerve.server.edge.tensors import fill_response, request_inputs, tensor_metadata
from transerve.server.edge.translation_outputs import decoded_texts, sentences_json
from transerve.server.engine.classifier import ClassifierModel
from transerve.server.engine.loaded_model import LoadedModel, deadline_from
from transerve.server.engine.manager import ModelManager
from transerve.server.engine.metrics import Metrics
from transerve.server.engine.routed_translation import RoutedTranslator, StreamRoute, language_pair
from transerve.server.engine.tensor_model import TensorModel
from transerve.server.engine.translation_types import StreamPiece
from transerve.server.engine.translator import TranslatorModel
from transerve.server.exceptions import ControlDisabled, ModelNotFound, RequestError
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc

Context: TypeAlias = Any  # grpc.aio.ServicerContext (grpcio ships no type hints)
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino", "tensorrt": "tensorrt_plan",
             "torch": "pytorch_libtorch"}


def serving_parameters(model: LoadedModel, reason: bool = True) -> dict[str, pb.InferParameter]:
    """Which runtime and precision serve ``model`` (and, for metadata, why that precision)."""
    values = {"runtime": model.backend, "precision": model.precision}
    if reason:
        values["precision_reason"] = model.precision_reason
    return {key: pb.InferParameter(string_param=value) for key, value in values.items()}


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, manager: ModelManager, metrics: Metrics, is_ready: Any, repository_control: bool = False,
                 routed: RoutedTranslator | None = None) -> None:
        self.manager, self.metrics, self.is_ready = manager, metrics, is_ready
        self.routed = routed or RoutedTranslator.serving(manager, "en")
        self.repository_control = repository_control  # load/unload: only with admin tokens (server/edge/auth.py)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.is_ready()))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            self.manager.get(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=bool(self.is_ready()))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="transerve", version=__version__,
                                         extensions=["model_repository", "statistics", "binary_tensor_data"])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        async def metadata(scope: RequestInfo) -> Any:
            model = self.manager.get(request.name, request.version)
            scope.model = model.name
            return model_metadata(model, self.manager)

        return await unary_call(self.metrics, "ModelMetadata", context, metadata)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        async def inferred(scope: RequestInfo) -> Any:
            return await self.infer(request, scope, deadline_of(context))

        return await unary_call(self.metrics, "ModelInfer", context, inferred)

    async def infer(self, request: pb.ModelInferRequest, scope: RequestInfo, deadline: float | None
                    ) -> pb.ModelInferResponse:
        """One inference, whatever the protocol (gRPC here, REST in :mod:`transerve.server.edge.rest`)."""
        if not request.model_name:
            raise RequestError("model_name: required")
        if is_routed(request.model_name, self.manager.configs):
            parameters = parse_parameters(request.parameters, "translate")
            if parameters.stream:
                raise RequestError("parameters.stream: only ModelStreamInfer streams (ModelInfer answers once)")
            inputs = request_inputs(request, self.manager.limits.max_elements)
            outputs, results = await routed_outputs(self.routed, inputs, parameters, parameters.deadline(deadline))
            scope.model = "+".join(dict.fromkeys(m for r in results if r.route for m in r.route.models)) or "-"
            return answer(request, ROUTED_MODEL, "", outputs)
        async with self.manager.use(request.model_name, request.model_version, deadline=deadline) as model:
            scope.model = model.name
            parameters = parse_parameters(request.parameters, model.config.task)
            if parameters.stream:
                raise RequestError("parameters.stream: only ModelStreamInfer streams (ModelInfer answers once)")
            inputs = request_inputs(request, self.manager.limits.max_elements)
            outputs = await run_model(model, inputs, parameters.deadline(deadline), parameters)
        return answer(request, model.name, model.version, outputs)

    def known_model(self, name: str, version: str) -> str:
        """The model a request names, checked before its body is read: a loaded or loadable entry, or the
        routing name; NOT_FOUND otherwise."""
        if is_routed(name, self.manager.configs):
            return ROUTED_MODEL
        if name in self.manager.models or name not in self.manager.servable():
            return self.manager.get(name, version).name
        return name


    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request answered in order; an error is reported in the stream, which stays open.

        A translator request with the parameter ``stream: true`` (Triton's decoupled convention) is answered
        with one response per text piece as the tokens are produced — output ``translation`` BYTES ``[1]``,
        parameter ``tokens`` — and then an empty response with ``triton_final_response: true``.
        """
        async for request in request_iterator:
            with RpcCall(self.metrics, "ModelStreamInfer", RequestInfo(context, request.id)) as call:
                try:
                    if _wants_stream(request):
                        async for response in self._stream_translation(request, call.scope, remaining(context)):
                            yield pb.ModelStreamInferResponse(infer_response=response)
                    else:
                        response = await self.infer(request, call.scope, deadline_of(context))
                        yield pb.ModelStreamInferResponse(infer_response=response)
                except Exception as e:  # answered in the stream, which stays open for the next request
                    status, message = call.failed(e)
                    yield pb.ModelStreamInferResponse(error_message=f"{status.name}: {message}",
                                                      infer_response=pb.ModelInferResponse(id=request.id))

    async def _stream_translation(self, request: pb.ModelInferRequest, scope: RequestInfo, time_left: float | None
                                  ) -> AsyncIterator[pb.ModelInferResponse]:
        deadline = deadline_from(time_left)
        if is_routed(request.model_name, self.manager.configs):
            parameters = parse_parameters(request.parameters, "translate")
            pair = language_pair(parameters.source_language, parameters.target_language)
            pieces = self.routed.stream(one_text(request, self.manager.limits.max_elements), pair,
                                        parameters.deadline(deadline), parameters.call_options())
            async for response in piece_responses(request, ROUTED_MODEL, "", pieces, scope):
                yield response
            return
        async with self.manager.use(request.model_name, request.model_version, deadline=deadline) as model:
            scope.model = model.name
            if not isinstance(model, TranslatorModel):
                raise RequestError(f"parameters.stream: only translators stream; {model.name} is a "
                                   f"{model.config.task} model")
            parameters = parse_parameters(request.parameters, model.config.task)
            o = parameters.call_options()
            pieces = model.stream(one_text(request, self.manager.limits.max_elements), o.max_new_tokens,
                                  parameters.deadline(deadline), o.beam_size, o.length_penalty, o.segmentation,
                                  o.use_cache, o.glossary, o.markup)
            async for response in piece_responses(request, model.name, model.version, pieces, scope):
                yield response

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        async def statistics(scope: RequestInfo) -> Any:
            names = [request.name] if request.name else sorted(self.manager.models)
            stats = []
            for name in names:
                model = self.manager.get(name, request.version)
                stats.append(model_statistics(model, self.metrics))
            return pb.ModelStatisticsResponse(model_stats=stats)

        return await unary_call(self.metrics, "ModelStatistics", context, statistics)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        return repository_index(self.manager, request.ready)

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: Context
                                  ) -> pb.RepositoryModelLoadResponse:
        async def loaded(scope: RequestInfo) -> Any:
            scope.model = request.model_name
            await self.load(request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await unary_call(self.metrics, "RepositoryModelLoad", context, loaded)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: Context
                                    ) -> pb.RepositoryModelUnloadResponse:
        async def unloaded(scope: RequestInfo) -> Any:
            scope.model = request.model_name
            await self.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await unary_call(self.metrics, "RepositoryModelUnload", context, unloaded)

    async def load(self, name: str) -> None:
        self._check_control()
        state = await self.manager.load(name)
        if state.failed:
            raise RequestError(f"model_name: {name!r} failed to load: {state.reason}")

    async def unload(self, name: str) -> None:
        self._check_control()
        await self.manager.unload(name)

    def _check_control(self) -> None:
        if not self.repository_control:
            raise ControlDisabled("repository control is disabled: start the server with --admin-token-file "
                                  "to allow RepositoryModelLoad/Unload with an admin token")


def model_metadata(model: LoadedModel, manager: ModelManager) -> pb.ModelMetadataResponse:
    """KServe metadata, with parameters saying what serves it (runtime, precision and why) and what the SDK
    needs to split large calls: ``task``, ``max_batch_size`` (items per request) and ``default`` (whether a
    request naming no model of this task reaches it)."""
    c = model.config
    try:
        default = manager.default_for(c.task) is model
    except ModelNotFound:
        default = False
    response = pb.ModelMetadataResponse(
        name=model.name, versions=[model.version], platform=PLATFORMS.get(model.backend, model.backend),
        inputs=[tensor_metadata(t.name, t.datatype, t.dims) for t in c.inputs],
        outputs=[tensor_metadata(t.name, t.datatype, t.dims) for t in c.outputs],
        parameters=serving_parameters(model))
    response.parameters["task"].string_param = c.task
    response.parameters["max_batch_size"].int64_param = c.max_batch_size
    response.parameters["default"].bool_param = default
    return response


def repository_index(manager: ModelManager, ready_only: bool) -> pb.RepositoryIndexResponse:
    models = []
    for name in manager.entry_names():
        state = manager.states.get(name)
        if state is None or (ready_only and state.state != "READY"):
            continue
        models.append(pb.RepositoryIndexResponse.ModelIndex(name=name, version=state.version, state=state.state,
                                                            reason=state.reason))
    return pb.RepositoryIndexResponse(models=models)


async def run_model(model: LoadedModel, inputs: dict[str, np.ndarray], deadline: float | None,
                    parameters: InferParameters | None = None) -> dict[str, np.ndarray]:
    expected = [t.name for t in model.config.inputs]
    if sorted(inputs) != sorted(expected):
        raise RequestError(f"inputs: {model.name} takes {expected}, got {sorted(inputs)}")
    if isinstance(model, TensorModel):
        return await model.infer(inputs, deadline)
    if isinstance(model, ClassifierModel):
        images = model.check_tensor(inputs["images"], "inputs.images", batched=True)
        return {"logits": await model.logits(images, deadline)}
    assert isinstance(model, TranslatorModel)
    texts = inputs["text"]
    if texts.dtype != np.object_:
        raise RequestError("inputs.text: datatype must be BYTES")
    o = (parameters or InferParameters()).call_options()
    results = await model.translate(decoded_texts(texts), o.max_new_tokens, deadline, "inputs.text", o.beam_size,
                                    o.length_penalty, o.segmentation, o.use_cache, o.report, o.glossary, o.markup)
    outputs = {"translation": np.array([r.text.encode() for r in results], dtype=np.object_).reshape(texts.shape)}
    if o.report.wanted:
        outputs["sentences"] = np.array([sentences_json(r).encode() for r in results],
                                        dtype=np.object_).reshape(texts.shape)
    return outputs


def answer(request: pb.ModelInferRequest, name: str, version: str, outputs: dict[str, np.ndarray]
           ) -> pb.ModelInferResponse:
    """The response holding the outputs the request asked for (all when it named none)."""
    wanted = [o.name for o in request.outputs]
    unknown = sorted(set(wanted) - set(outputs))
    if unknown:
        raise RequestError(f"outputs: {unknown} not produced by {name} (it has {sorted(outputs)})")
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request.id)
    fill_response(response, {k: v for k, v in outputs.items() if not wanted or k in wanted})
    return response


def one_text(request: pb.ModelInferRequest, max_elements: int) -> str:
    texts = request_inputs(request, max_elements).get("text")
    if texts is None or texts.dtype != np.object_ or texts.size != 1:
        raise RequestError("inputs.text: a streamed request takes exactly one BYTES text")
    return decoded_texts(texts)[0]


async def piece_responses(request: pb.ModelInferRequest, name: str, version: str,
                          pieces: AsyncIterator[StreamPiece | StreamRoute], scope: RequestInfo
                          ) -> AsyncIterator[pb.ModelInferResponse]:
    """One response per text piece, then the final one (Triton's decoupled convention)."""
    tokens = 0
    async for piece in pieces:
        if isinstance(piece, StreamRoute):
            scope.model = piece.model
            continue
        tokens = piece.tokens
        if not piece.text:
            continue
        response = pb.ModelInferResponse(model_name=name, model_version=version, id=request.id)
        fill_response(response, {"translation": np.array([piece.text.encode()], dtype=np.object_)})
        response.parameters["tokens"].int64_param = tokens
        response.parameters["triton_final_response"].bool_param = False
        yield response
    final = pb.ModelInferResponse(model_name=name, model_version=version, id=request.id)
    final.parameters["tokens"].int64_param = tokens
    final.parameters["triton_final_response"].bool_param = True
    yield final


def _wants_stream(request: pb.ModelInferRequest) -> bool:
    return "stream" in request.parameters and bool(request.parameters["stream"].bool_param)


def model_statistics(model: LoadedModel, metrics: Metrics) -> pb.ModelStatistics:
    c = metrics.counters[model.name]

    def duration(d: Any) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=d.count, ns=d.ns)

    return pb.ModelStatistics(
        name=model.name, version=model.version, last_inference=c.last_inference_ms,
        inference_count=c.inference_count, execution_count=c.execution_count,
        inference_stats=pb.InferStatistics(success=duration(c.success), fail=duration(c.fail),
                                           queue=duration(c.queue), compute_infer=duration(c.compute)),
        batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_infer=duration(d))
                     for size, d in sorted(c.batches.items())],
        parameters=serving_parameters(model, reason=False))

