"""``AsyncTranserveClient``: :class:`transerve_client.client.TranserveClient`'s methods for asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from transerve_client import _requests as rq
from transerve_client._proto import inference_pb2 as ipb
from transerve_client._proto import inference_pb2_grpc as ipb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc
from transerve_client._requests import ImageLike, Prediction
from transerve_client.client import _CHANNEL_OPTIONS, TranserveError, _Base, _error

T = TypeVar("T")


class AsyncTranserveClient(_Base):
    """The asyncio twin of :class:`TranserveClient` (``async with``, ``await``, ``async for``)."""

    def __init__(self, url: str | Sequence[str] = "localhost:8001", **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._channel = (grpc.aio.secure_channel(self.url, self._credentials, _CHANNEL_OPTIONS)
                         if self._credentials else grpc.aio.insecure_channel(self.url, _CHANNEL_OPTIONS))
        self._kserve = ipb_grpc.GRPCInferenceServiceStub(self._channel)
        self._translator = tpb_grpc.TranslatorStub(self._channel)
        self._classifier = tpb_grpc.ClassifierStub(self._channel)

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None) -> T:
        delays = self.retry.delays()
        while True:
            try:
                return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                delay = next(delays, None) if e.code() == grpc.StatusCode.UNAVAILABLE else None
                if delay is None:
                    raise _error(e) from None
                await asyncio.sleep(delay)

    async def translate(self, texts: Sequence[str], *, model: str | None = None,
                        source_language: str | None = None, target_language: str | None = None,
                        detection: str = "document", beam_size: int | None = None,
                        max_new_tokens: int | None = None, length_penalty: float | None = None,
                        segmentation: str = "sentences", glossary: rq.Glossary | None = None, format: str = "text",
                        timeout: float | None = None) -> list[str]:
        options = rq.translate_options(beam_size, max_new_tokens, length_penalty, segmentation, glossary,
                                       format=format)
        languages = rq.Languages(source_language, target_language, detection)
        return [t.text for t in await self._translations(texts, model, options, timeout, languages)]

    async def translate_detailed(self, texts: Sequence[str], *, model: str | None = None,
                                 source_language: str | None = None, target_language: str | None = None,
                                 detection: str = "document", beam_size: int | None = None,
                                 max_new_tokens: int | None = None, length_penalty: float | None = None,
                                 segmentation: str = "sentences", glossary: rq.Glossary | None = None,
                                 scores: bool = True, alignments: bool = False, format: str = "text",
                                 timeout: float | None = None) -> list[rq.DetailedTranslation]:
        options = rq.translate_options(beam_size, max_new_tokens, length_penalty, segmentation, glossary, scores,
                                       alignments, format)
        languages = rq.Languages(source_language, target_language, detection)
        return await self._translations(texts, model, options, timeout, languages)

    async def _translations(self, texts: Sequence[str], model: str | None, options: Any, timeout: float | None,
                            languages: rq.Languages = rq.NO_LANGUAGES) -> list[rq.DetailedTranslation]:
        if isinstance(texts, str):
            raise TypeError("translate() takes a list of texts; wrap a single text in a list")

        async def one(part: Sequence[str]) -> list[rq.DetailedTranslation]:
            request = rq.translate_request(part, model, options, languages)
            return rq.detailed(await self._call(self._translator.Translate, request, timeout))

        return await self._split(list(texts), await self._limit("translate", model, timeout), one)

    async def translate_document(self, document: str, *, model: str | None = None,
                                 source_language: str | None = None, target_language: str | None = None,
                                 beam_size: int | None = None, glossary: rq.Glossary | None = None,
                                 format: str = "text", timeout: float | None = None) -> str:
        return (await self.translate([document], model=model, source_language=source_language,
                                     target_language=target_language, beam_size=beam_size, glossary=glossary,
                                     format=format, timeout=timeout))[0]

    async def translate_stream(self, text: str, *, model: str | None = None, source_language: str | None = None,
                               target_language: str | None = None, segmentation: str = "sentences",
                               glossary: rq.Glossary | None = None, format: str = "text",
                               timeout: float | None = None) -> AsyncIterator[str]:
        request = rq.stream_request(text, model, segmentation, glossary, format,
                                    rq.Languages(source_language, target_language))
        call = self._translator.TranslateStream(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for message in call:
                if message.piece:
                    yield message.piece
        except grpc.RpcError as e:
            raise _error(e) from None

    async def languages(self, timeout: float | None = None) -> list[rq.LanguagePair]:
        return rq.language_pairs(await self._call(self._translator.ListLanguages, tpb.ListLanguagesRequest(),
                                                  timeout))

    async def classify(self, images: Sequence[ImageLike], *, model: str | None = None, top_k: int = 5,
                       timeout: float | None = None) -> list[list[Prediction]]:
        async def one(part: Sequence[ImageLike]) -> list[list[Prediction]]:
            return rq.predictions(await self._call(self._classifier.Classify, rq.classify_request(part, model, top_k),
                                                   timeout))

        return await self._split(rq.image_list(images), await self._limit("classify", model, timeout), one)

    async def _limit(self, task: str, model: str | None, timeout: float | None) -> int | None:
        if (task, model) not in self._limits:
            try:
                names = [model] if model else await self.models(timeout)
                metadatas = [await self.model_metadata(name, timeout) for name in names]
            except TranserveError:
                metadatas = []
            self._limits[(task, model)] = rq.batch_limit(metadatas, task, model)
        return self._limits[(task, model)]

    async def _split(self, items: list[Any], limit: int | None,
                     call: Callable[[Sequence[Any]], Awaitable[list[T]]]) -> list[T]:
        ranges = rq.chunk_ranges(len(items), limit)
        if len(ranges) == 1:
            return await call(items)
        gate = asyncio.Semaphore(rq.MAX_CHUNKS_IN_FLIGHT)

        async def part(start: int, stop: int) -> list[T]:
            async with gate:
                try:
                    return await call(items[start:stop])
                except TranserveError as e:
                    raise e.for_items(start, stop) from None

        chunks = await asyncio.gather(*(part(*bounds) for bounds in ranges))
        return [result for chunk in chunks for result in chunk]

    async def infer(self, model: str, inputs: dict[str, np.ndarray], *, version: str = "",
                    timeout: float | None = None) -> dict[str, np.ndarray]:
        return rq.infer_outputs(await self._call(self._kserve.ModelInfer, rq.infer_request(model, inputs, version),
                                                 timeout))

    async def health(self, timeout: float | None = None) -> bool:
        try:
            response = await self._kserve.ServerReady(ipb.ServerReadyRequest(), timeout=timeout or self.timeout,
                                                      metadata=self._metadata)
            return bool(response.ready)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return False
            raise _error(e) from None

    async def models(self, timeout: float | None = None) -> list[str]:
        index = await self._call(self._kserve.RepositoryIndex, ipb.RepositoryIndexRequest(ready=True), timeout)
        return [m.name for m in index.models]

    async def model_metadata(self, name: str, timeout: float | None = None) -> Any:
        return await self._call(self._kserve.ModelMetadata, ipb.ModelMetadataRequest(name=name), timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTranserveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
