"""``transerve.v1.Translator`` and ``transerve.v1.Classifier``: the task API in its own terms."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import numpy as np
from transerve.server.edge.rpc import RequestInfo, RpcCall, abort, deadline_of, unary_call
from transerve.server.engine.classifier import ClassifierModel
from transerve.server.engine.glossary import GlossaryEntry
from transerve.server.engine.manager import ModelManager
from transerve.server.engine.metrics import Metrics
from transerve.server.engine.routed_translation import (
    CallOptions,
    LanguagePair,
    RoutedResult,
    RoutedTranslator,
    StreamRoute,
    language_pair,
)
from transerve.server.engine.scoring import SentenceReport
from transerve.server.engine.translation_types import Markup, ReportOptions, Segmentation, TranslationResult
from transerve.server.engine.translator import TranslatorModel
from transerve.server.exceptions import RequestError
from transerve_client._proto import transerve_pb2 as pb
from transerve_client._proto import transerve_pb2_grpc as pb_grpc

Context: TypeAlias = Any  # grpc.aio.ServicerContext (grpcio ships no type hints)
DEFAULT_TOP_K = 5


class TranslatorService(pb_grpc.TranslatorServicer):
    def __init__(self, manager: ModelManager, metrics: Metrics, routed: RoutedTranslator) -> None:
        self.manager, self.metrics, self.routed = manager, metrics, routed

    async def Translate(self, request: pb.TranslateRequest, context: Context) -> pb.TranslateResponse:
        async def translated(scope: RequestInfo) -> Any:
            pair = routed_pair(request.model, request.source_language, request.target_language, request.detection)
            if pair is not None:
                return await self._routed(request, pair, scope, deadline_of(context))
            async with self.manager.use(request.model, task="translate", deadline=deadline_of(context)) as model:
                assert isinstance(model, TranslatorModel)
                scope.model = model.name
                o = call_options(request.options)
                results = await model.translate(list(request.texts), o.max_new_tokens, deadline_of(context), "texts",
                                                o.beam_size, o.length_penalty, o.segmentation, o.use_cache, o.report,
                                                o.glossary, o.markup)
            self.metrics.generated_tokens.labels(model.name).inc(sum(len(r.ids) for r in results))
            return pb.TranslateResponse(model=model.name, model_version=model.version,
                                        translations=[translation_message(r) for r in results])

        return await unary_call(self.metrics, "Translate", context, translated)

    async def _routed(self, request: pb.TranslateRequest, pair: LanguagePair, scope: RequestInfo,
                      deadline: float | None) -> pb.TranslateResponse:
        results = await self.routed.translate(list(request.texts), pair, deadline, call_options(request.options))
        used = list(dict.fromkeys(m for r in results if r.route is not None for m in r.route.models))
        scope.model = "+".join(used) or "-"
        for name in used:
            tokens = sum(len(r.result.ids) for r in results if r.route is not None and r.route.models[-1] == name)
            self.metrics.generated_tokens.labels(name).inc(tokens)
        return pb.TranslateResponse(model=",".join(used), translations=[routed_message(r) for r in results])

    async def ListLanguages(self, request: pb.ListLanguagesRequest, context: Context) -> pb.ListLanguagesResponse:
        async def listed(scope: RequestInfo) -> Any:
            router = self.routed.router
            return pb.ListLanguagesResponse(
                pivot_language=router.pivot, detectable=router.sources(),
                pairs=[pb.LanguagePair(source=r.source, target=r.target, via=r.via, models=r.models,
                                       loaded=all(m in self.manager.models for m in r.models))
                       for r in router.routes()])

        return await unary_call(self.metrics, "ListLanguages", context, listed)

    async def TranslateStream(self, request: pb.TranslateStreamRequest, context: Context
                              ) -> AsyncIterator[pb.TranslateStreamResponse]:
        """Pieces of the translation as tokens are produced: the sequence joins the model's continuous batch
        and leaves it at the next step when the client cancels."""
        tokens, header = 0, pb.TranslateStreamResponse()
        with RpcCall(self.metrics, "TranslateStream", RequestInfo(context)) as call:
            try:
                opts = request.options
                if opts.scores or opts.alignments:
                    raise RequestError("options.scores, options.alignments: TranslateStream sends text pieces only; "
                                       "ask Translate for sentence scores and alignments")
                o = call_options(opts)
                pair = routed_pair(request.model, request.source_language, request.target_language,
                                   pb.DETECTION_DOCUMENT)
                if pair is not None:
                    pieces = self.routed.stream(request.text, pair, deadline_of(context), o)
                else:
                    pieces = self._model_stream(request, o, deadline_of(context))
                async for piece in pieces:
                    if isinstance(piece, StreamRoute):
                        header = route_header(piece)
                        call.scope.model = piece.model
                        continue
                    tokens = piece.tokens
                    if piece.text:
                        yield merged(header, pb.TranslateStreamResponse(piece=piece.text, tokens=tokens))
                        header = pb.TranslateStreamResponse()
                yield merged(header, pb.TranslateStreamResponse(done=True, tokens=tokens))
            except Exception as e:
                await abort(call, context, e)
            finally:
                if tokens and call.scope.model != "-":
                    self.metrics.generated_tokens.labels(call.scope.model).inc(tokens)

    async def _model_stream(self, request: pb.TranslateStreamRequest, o: CallOptions, deadline: float | None
                            ) -> AsyncIterator[Any]:
        """The named (or default) model's pieces, after a StreamRoute saying which model it is."""
        async with self.manager.use(request.model, task="translate", deadline=deadline) as model:
            assert isinstance(model, TranslatorModel)
            yield StreamRoute(model.name)
            async for piece in model.stream(request.text, o.max_new_tokens, deadline, o.beam_size, o.length_penalty,
                                            o.segmentation, o.use_cache, o.glossary, o.markup):
                yield piece


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, manager: ModelManager, metrics: Metrics) -> None:
        self.manager, self.metrics = manager, metrics

    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        async def classified(scope: RequestInfo) -> Any:
            async with self.manager.use(request.model, task="classify", deadline=deadline_of(context)) as model:
                assert isinstance(model, ClassifierModel)
                scope.model = model.name
                images = await self._images(model, request)
                logits = await model.logits(images, deadline_of(context))
            k = min(request.top_k or DEFAULT_TOP_K, logits.shape[1])  # top_k beyond the classes: all of them
            return pb.ClassifyResponse(model=model.name, model_version=model.version,
                                       results=[top_k(row, k, model.labels) for row in logits])

        return await unary_call(self.metrics, "Classify", context, classified)

    async def _images(self, model: ClassifierModel, request: pb.ClassifyRequest) -> np.ndarray:
        if not 1 <= len(request.images) <= model.config.max_batch_size:
            raise RequestError(f"images: {len(request.images)} images, the limit is 1 to "
                               f"{model.config.max_batch_size}")
        encoded = [(i, im.encoded) for i, im in enumerate(request.images) if im.WhichOneof("source") == "encoded"]
        arrays: list[np.ndarray | None] = [None] * len(request.images)
        if encoded:
            decoded = await model.decode_images([b for _, b in encoded], "images")
            for (i, _), array in zip(encoded, decoded, strict=True):
                arrays[i] = array
        for i, im in enumerate(request.images):
            source = im.WhichOneof("source")
            if source is None:
                raise RequestError(f"images[{i}]: neither encoded bytes nor a tensor")
            if source == "tensor":
                one = model.check_tensor(tensor_array(im.tensor, f"images[{i}].tensor"), f"images[{i}].tensor")
                if len(one) != 1:
                    raise RequestError(f"images[{i}].tensor: holds {len(one)} images; send one per Image")
                arrays[i] = one[0]
        return np.stack([a for a in arrays if a is not None])


def routed_pair(model: str, source: str, target: str, detection: int) -> LanguagePair | None:
    """The languages a request routes by, or None when it names a model (which wins) or no language."""
    if model or not (source or target):
        return None
    if detection not in (pb.DETECTION_DOCUMENT, pb.DETECTION_SENTENCE):
        raise RequestError(f"detection: {detection} is not a Detection value (0 document, 1 sentence)")
    return language_pair(source, target, "sentence" if detection == pb.DETECTION_SENTENCE else "document")


def call_options(opts: pb.TranslateOptions) -> CallOptions:
    return CallOptions(opts.max_new_tokens or None, opts.beam_size or None, length_penalty(opts), segmentation(opts),
                       opts.cache if opts.HasField("cache") else True, ReportOptions(opts.scores, opts.alignments),
                       tuple(glossary(opts)), markup(opts))


def routed_message(routed: RoutedResult) -> pb.Translation:
    message = translation_message(routed.result)
    message.source_language, message.language_confidence = routed.source_language, routed.confidence
    if routed.route is not None:
        message.via = routed.route.via
        message.models.extend(routed.route.models)
    message.languages.extend(pb.LanguageSpan(start=r.span[0], end=r.span[1], language=r.language,
                                             confidence=r.confidence) for r in routed.languages)
    return message


def route_header(route: StreamRoute) -> pb.TranslateStreamResponse:
    return pb.TranslateStreamResponse(source_language=route.source_language, language_confidence=route.confidence,
                                      via=route.via, models=route.models)


def merged(header: pb.TranslateStreamResponse, message: pb.TranslateStreamResponse) -> pb.TranslateStreamResponse:
    header.MergeFrom(message)
    return header


def segmentation(options: pb.TranslateOptions) -> Segmentation:
    if options.segmentation == pb.SEGMENTATION_WHOLE:
        return "whole"
    if options.segmentation != pb.SEGMENTATION_SENTENCES:
        raise RequestError(f"options.segmentation: {options.segmentation} is not a Segmentation value "
                           "(0 sentences, 1 whole)")
    return "sentences"


def glossary(options: pb.TranslateOptions) -> list[GlossaryEntry]:
    return [GlossaryEntry(e.source, e.target) for e in options.glossary]


def translation_message(result: TranslationResult) -> pb.Translation:
    return pb.Translation(text=result.text, tokens=len(result.ids),
                          sentences=[sentence_message(r) for r in result.sentences or ()])


def sentence_message(report: SentenceReport) -> pb.SentenceInfo:
    score = report.score
    return pb.SentenceInfo(
        source_start=report.source[0], source_end=report.source[1], target_start=report.target[0],
        target_end=report.target[1], mean_log_prob=score.mean_log_prob, min_token_prob=score.min_token_prob,
        alignments=[pb.WordAlignment(source_start=a.source[0], source_end=a.source[1], target_start=a.target[0],
                                     target_end=a.target[1]) for a in score.alignments])


def markup(options: pb.TranslateOptions) -> Markup:
    if options.format == pb.FORMAT_HTML:
        return "html"
    if options.format != pb.FORMAT_TEXT:
        raise RequestError(f"options.format: {options.format} is not a Format value (0 text, 1 html)")
    return "text"


def length_penalty(options: pb.TranslateOptions) -> float | None:
    return float(options.length_penalty) if options.HasField("length_penalty") else None


def tensor_array(tensor: pb.Tensor, field: str) -> np.ndarray:
    shape = tuple(int(d) for d in tensor.shape)
    count = math.prod(shape) if shape else 0  # Python ints: huge dims must not wrap to a small count
    if not shape or any(d <= 0 for d in shape) or len(tensor.data) != 4 * count:
        raise RequestError(f"{field}: {len(tensor.data)} bytes do not hold float32 of shape {list(shape)}")
    return np.frombuffer(tensor.data, dtype="<f4").reshape(shape).astype(np.float32)


def top_k(logits: np.ndarray, k: int, labels: list[str]) -> pb.Classification:
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    best = np.argsort(-probs, kind="stable")[:k]
    return pb.Classification(predictions=[
        pb.Prediction(label=labels[i] if i < len(labels) else str(i), index=int(i), score=float(probs[i]))
        for i in best])
