"""``TranserveClient`` (blocking; ``AsyncTranserveClient``, its asyncio twin, is in :mod:`transerve_client.aio`):
one channel each.

Example::

    from transerve_client import TranserveClient

    with TranserveClient("localhost:8001") as client:
        print(client.translate(["three hundred and forty-two"]))    # ['dreihundertzweiundvierzig']
        top = client.classify(["digit.png"], top_k=3)[0]
        print(top[0].label, top[0].score)

``url`` may name several servers (``"10.0.0.1:8001,10.0.0.2:8001"``, a list) or a ``dns:///name:port``;
calls are then spread over all of them by gRPC's ``round_robin`` policy (:mod:`transerve_client.targets`).

``translate`` and ``classify`` split a call holding more items than the model takes per request (its
``max_batch_size``, read once from the model's metadata) into requests sent concurrently (at most
``MAX_CHUNKS_IN_FLIGHT`` at once), and return the results in order; ``infer`` is always one request.

Every failed call raises :class:`TranserveError` carrying the gRPC status code and the server's message
(for a split call, also the index range of the items the failed request held: ``items``).
Only ``UNAVAILABLE`` is retried (the server restarting, not yet listening, or its models still loading), with
exponential backoff and jitter, a bounded number of times; every call has a deadline.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from transerve_client import _requests as rq
from transerve_client._proto import inference_pb2 as ipb
from transerve_client._proto import inference_pb2_grpc as ipb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc
from transerve_client._requests import ImageLike, Prediction
from transerve_client.targets import ROUND_ROBIN, channel_target

T = TypeVar("T")


class TranserveError(Exception):
    """A failed call: ``code`` is the ``grpc.StatusCode``, ``message`` the server's explanation, and
    ``request_id`` the id the server logged the request under (quote it when reporting a problem)."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None,
                 items: tuple[int, int] | None = None) -> None:
        where = f"items {items[0]}–{items[1] - 1} of the call: " if items else ""
        super().__init__(f"{code.name}: {where}{message}" + (f" [request id {request_id}]" if request_id else ""))
        self.code, self.message, self.request_id, self.items = code, message, request_id, items

    def for_items(self, start: int, stop: int) -> TranserveError:
        """The same failure, saying which items of a split call (``[start, stop)``) the failed request held."""
        return TranserveError(self.code, self.message, self.request_id, (start, stop))


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # calls in all, the first included
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        """Full-jitter exponential backoff (each wait uniform in [0, cap])."""
        cap = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield random.uniform(0, cap)
            cap = min(self.max_backoff, cap * self.multiplier)


def _credentials(tls: bool | str | Path, client_cert: str | Path | None,
                 client_key: str | Path | None) -> grpc.ChannelCredentials | None:
    if tls is False:
        return None
    root = None if tls is True else Path(tls).read_bytes()
    cert = Path(client_cert).read_bytes() if client_cert else None
    key = Path(client_key).read_bytes() if client_key else None
    return grpc.ssl_channel_credentials(root, key, cert)


_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                    ROUND_ROBIN]  # several addresses or a dns:/// name: each call goes to the next server


class _Base:
    def __init__(self, url: str | Sequence[str], *, tls: bool | str | Path = False,
                 client_cert: str | Path | None = None, client_key: str | Path | None = None,
                 token: str | None = None, timeout: float = 30.0, retry: RetryPolicy | None = None) -> None:
        self.url, self.timeout = channel_target(url), timeout
        self.retry = retry or RetryPolicy()
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self._credentials = _credentials(tls, client_cert, client_key)
        self._limits: dict[tuple[str, str | None], int | None] = {}  # (task, model) → items per request


def _error(e: grpc.RpcError) -> TranserveError:
    trailing = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    request_id = next((str(v) for k, v in trailing or () if k == "x-request-id"), None)
    return TranserveError(e.code(), e.details() or "", request_id)


class TranserveClient(_Base):
    """Blocking client; thread-safe (one channel, reused by every call)."""

    def __init__(self, url: str | Sequence[str] = "localhost:8001", **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._channel = (grpc.secure_channel(self.url, self._credentials, _CHANNEL_OPTIONS) if self._credentials
                         else grpc.insecure_channel(self.url, _CHANNEL_OPTIONS))
        self._kserve = ipb_grpc.GRPCInferenceServiceStub(self._channel)
        self._translator = tpb_grpc.TranslatorStub(self._channel)
        self._classifier = tpb_grpc.ClassifierStub(self._channel)

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        delays = self.retry.delays()
        while True:
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                delay = next(delays, None) if e.code() == grpc.StatusCode.UNAVAILABLE else None
                if delay is None:
                    raise _error(e) from None
                time.sleep(delay)

    def translate(self, texts: Sequence[str], *, model: str | None = None, source_language: str | None = None,
                  target_language: str | None = None, detection: str = "document", beam_size: int | None = None,
                  max_new_tokens: int | None = None, length_penalty: float | None = None,
                  segmentation: str = "sentences", glossary: rq.Glossary | None = None, format: str = "text",
                  timeout: float | None = None) -> list[str]:
        """Translations of ``texts``, in order; more texts than the model takes per request are split (see the
        module's docstring). ``target_language`` (with ``source_language``, "auto" or left out: detected)
        routes by language — to the entry for the pair, or through the server's pivot language; ``model``
        names an entry instead (it wins), and neither means the server's default translator. Each text is a
        document: the server translates it sentence by sentence and keeps its whitespace
        (``segmentation="whole"``: one model input, refused when too long for the model). ``detection=
        "sentence"``: each sentence of an "auto" text may be in another language. ``glossary``: terms the
        translations must use (``{"invoice": "Rechnung"}``), beside the model's own glossary;
        ``format="html"``: each text is an HTML page whose markup is kept."""
        options = rq.translate_options(beam_size, max_new_tokens, length_penalty, segmentation, glossary,
                                       format=format)
        languages = rq.Languages(source_language, target_language, detection)
        return [t.text for t in self._translations(texts, model, options, timeout, languages)]

    def translate_detailed(self, texts: Sequence[str], *, model: str | None = None, source_language: str | None = None,
                           target_language: str | None = None, detection: str = "document",
                           beam_size: int | None = None, max_new_tokens: int | None = None,
                           length_penalty: float | None = None, segmentation: str = "sentences",
                           glossary: rq.Glossary | None = None, scores: bool = True, alignments: bool = False,
                           format: str = "text", timeout: float | None = None) -> list[rq.DetailedTranslation]:
        """As :meth:`translate`, with each sentence's confidence (and, with ``alignments``, its word alignments:
        one extra scoring pass on the server; ``scores=False`` and no alignments: none) and the route taken."""
        options = rq.translate_options(beam_size, max_new_tokens, length_penalty, segmentation, glossary, scores,
                                       alignments, format)
        languages = rq.Languages(source_language, target_language, detection)
        return self._translations(texts, model, options, timeout, languages)

    def _translations(self, texts: Sequence[str], model: str | None, options: Any, timeout: float | None,
                      languages: rq.Languages = rq.NO_LANGUAGES) -> list[rq.DetailedTranslation]:
        if isinstance(texts, str):
            raise TypeError("translate() takes a list of texts; wrap a single text in a list")

        def one(part: Sequence[str]) -> list[rq.DetailedTranslation]:
            request = rq.translate_request(part, model, options, languages)
            return rq.detailed(self._call(self._translator.Translate, request, timeout))

        return self._split(list(texts), self._limit("translate", model, timeout), one)

    def translate_document(self, document: str, *, model: str | None = None, source_language: str | None = None,
                           target_language: str | None = None, beam_size: int | None = None,
                           glossary: rq.Glossary | None = None, format: str = "text",
                           timeout: float | None = None) -> str:
        """One document of any length the server's limits allow (``documents.max_document_chars``), translated
        sentence by sentence with its paragraphs, line breaks and spacing kept (``format="html"``: its markup)."""
        return self.translate([document], model=model, source_language=source_language,
                              target_language=target_language, beam_size=beam_size, glossary=glossary,
                              format=format, timeout=timeout)[0]

    def translate_stream(self, text: str, *, model: str | None = None, source_language: str | None = None,
                         target_language: str | None = None, segmentation: str = "sentences",
                         glossary: rq.Glossary | None = None, format: str = "text",
                         timeout: float | None = None) -> Iterator[str]:
        """Pieces of the translation as the server produces them (a document: sentence by sentence)."""
        try:
            request = rq.stream_request(text, model, segmentation, glossary, format,
                                        rq.Languages(source_language, target_language))
            for message in self._translator.TranslateStream(request,
                                                            timeout=timeout or self.timeout, metadata=self._metadata):
                if message.piece:
                    yield message.piece
        except grpc.RpcError as e:
            raise _error(e) from None

    def languages(self, timeout: float | None = None) -> list[rq.LanguagePair]:
        """The language pairs the server translates, direct and through its pivot language."""
        return rq.language_pairs(self._call(self._translator.ListLanguages, tpb.ListLanguagesRequest(), timeout))

    def classify(self, images: Sequence[ImageLike], *, model: str | None = None, top_k: int = 5,
                 timeout: float | None = None) -> list[list[Prediction]]:
        """Top-``k`` predictions per image; images as paths, bytes, PIL images or numpy arrays. More images
        than the model takes per request are split (see the module's docstring)."""
        items = rq.image_list(images)

        def one(part: Sequence[ImageLike]) -> list[list[Prediction]]:
            return rq.predictions(self._call(self._classifier.Classify, rq.classify_request(part, model, top_k),
                                             timeout))

        return self._split(items, self._limit("classify", model, timeout), one)

    def _limit(self, task: str, model: str | None, timeout: float | None) -> int | None:
        """The model's items per request, asked once per client (None: unknown, calls are not split)."""
        if (task, model) not in self._limits:
            try:
                names = [model] if model else self.models(timeout)
                metadatas = [self.model_metadata(name, timeout) for name in names]
            except TranserveError:
                metadatas = []
            self._limits[(task, model)] = rq.batch_limit(metadatas, task, model)
        return self._limits[(task, model)]

    def _split(self, items: list[Any], limit: int | None, call: Callable[[Sequence[Any]], list[T]]) -> list[T]:
        ranges = rq.chunk_ranges(len(items), limit)
        if len(ranges) == 1:
            return call(items)

        def part(bounds: tuple[int, int]) -> list[T]:
            try:
                return call(items[bounds[0]:bounds[1]])
            except TranserveError as e:
                raise e.for_items(*bounds) from None

        with ThreadPoolExecutor(min(rq.MAX_CHUNKS_IN_FLIGHT, len(ranges))) as pool:
            return [result for chunk in pool.map(part, ranges) for result in chunk]

    def infer(self, model: str, inputs: dict[str, np.ndarray], *, version: str = "",
              timeout: float | None = None) -> dict[str, np.ndarray]:
        """A KServe v2 ModelInfer call: named arrays in, named arrays out."""
        return rq.infer_outputs(self._call(self._kserve.ModelInfer, rq.infer_request(model, inputs, version),
                                           timeout))

    def health(self, timeout: float | None = None) -> bool:
        """True when the server is ready to serve (False while it starts or drains, or when unreachable)."""
        try:
            return bool(self._kserve.ServerReady(ipb.ServerReadyRequest(), timeout=timeout or self.timeout,
                                                 metadata=self._metadata).ready)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return False
            raise _error(e) from None

    def models(self, timeout: float | None = None) -> list[str]:
        """Names of the models ready for inference."""
        index = self._call(self._kserve.RepositoryIndex, ipb.RepositoryIndexRequest(ready=True), timeout)
        return [m.name for m in index.models]

    def model_metadata(self, name: str, timeout: float | None = None) -> Any:
        """KServe ``ModelMetadataResponse``: input/output names, datatypes and shapes (-1: dynamic)."""
        return self._call(self._kserve.ModelMetadata, ipb.ModelMetadataRequest(name=name), timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TranserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
