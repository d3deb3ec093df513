"""Request builders and response readers shared by the sync and asyncio clients (no I/O here)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transerve_client._proto import inference_pb2 as ipb
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client.codec import TensorError, add_tensor, tensors_to_numpy

ImageLike = str | os.PathLike[str] | bytes | np.ndarray | Any  # Any: a PIL.Image.Image



@dataclass(frozen=True)
class Prediction:
    """One class of a classification: its label, its index in the model's output, its probability."""

    label: str
    index: int
    score: float


Span = tuple[int, int]  # [start, end) in Unicode code points
Glossary = Mapping[str, str] | Sequence[tuple[str, str]]  # source term → the target term the translation must use


@dataclass(frozen=True)
class SentenceScore:
    """One sentence of a translated text: where it is (``source``, in the text sent) and where its translation
    is (``target``, in the translated text), how sure the model was, and its word alignments (pairs of
    source and target spans of those same texts, when asked for)."""

    source: Span
    target: Span
    mean_log_prob: float
    min_token_prob: float
    alignments: list[tuple[Span, Span]]


@dataclass(frozen=True)
class DetailedTranslation:
    """A translation with what the server reports beside the text: sentence scores (when asked for) and, for a
    request routed by language, the source language (detected, with ``language_confidence``, for "auto"), the
    pivot language (``via``, "" when direct), the entries that translated it and, with per-sentence
    detection, each run's language (``languages``: ``(start, end, language, confidence)``)."""

    text: str
    tokens: int
    sentences: list[SentenceScore]
    source_language: str = ""
    language_confidence: float = 0.0
    via: str = ""
    models: list[str] = field(default_factory=list)
    languages: list[tuple[int, int, str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class LanguagePair:
    """A pair the server translates: by one entry, or through the pivot language (``via``)."""

    source: str
    target: str
    via: str
    models: list[str]
    loaded: bool


@dataclass(frozen=True)
class Languages:
    """Where a translation goes: ``source`` ("auto" detects it) → ``target``; ``detection`` "document" (one
    language per text) or "sentence"."""

    source: str | None = None
    target: str | None = None
    detection: str = "document"

    def apply(self, request: Any) -> Any:
        if self.target is None and self.source is None:
            return request
        if self.target is None:
            raise ValueError("source_language needs target_language")
        if self.detection not in DETECTIONS:
            raise ValueError(f"detection: {self.detection!r} is not one of {', '.join(DETECTIONS)}")
        request.source_language, request.target_language = self.source or "auto", self.target
        if hasattr(request, "detection"):
            request.detection = DETECTIONS[self.detection]
        return request


SEGMENTATIONS = {"sentences": tpb.SEGMENTATION_SENTENCES, "whole": tpb.SEGMENTATION_WHOLE}
FORMATS = {"text": tpb.FORMAT_TEXT, "html": tpb.FORMAT_HTML}
DETECTIONS = {"document": tpb.DETECTION_DOCUMENT, "sentence": tpb.DETECTION_SENTENCE}


def translate_options(beam_size: int | None = None, max_new_tokens: int | None = None,
                      length_penalty: float | None = None, segmentation: str = "sentences",
                      glossary: Glossary | None = None, scores: bool = False, alignments: bool = False,
                      format: str = "text") -> Any:
    if format not in FORMATS:
        raise ValueError(f"format: {format!r} is not one of {', '.join(FORMATS)}")
    options = tpb.TranslateOptions(beam_size=beam_size or 0, max_new_tokens=max_new_tokens or 0,
                                   segmentation=_segmentation(segmentation), scores=scores, alignments=alignments,
                                   glossary=glossary_entries(glossary), format=FORMATS[format])
    if length_penalty is not None:
        options.length_penalty = length_penalty
    return options


NO_LANGUAGES = Languages()


def translate_request(texts: Sequence[str], model: str | None, options: Any,
                      languages: Languages = NO_LANGUAGES) -> Any:
    if isinstance(texts, str):
        raise TypeError("translate() takes a list of texts; wrap a single text in a list")
    return languages.apply(tpb.TranslateRequest(model=model or "", texts=list(texts), options=options))


def stream_request(text: str, model: str | None, segmentation: str = "sentences",
                   glossary: Glossary | None = None, format: str = "text", languages: Languages = NO_LANGUAGES
                   ) -> Any:
    return languages.apply(tpb.TranslateStreamRequest(model=model or "", text=text, options=translate_options(
        segmentation=segmentation, glossary=glossary, format=format)))


def language_pairs(response: Any) -> list[LanguagePair]:
    return [LanguagePair(p.source, p.target, p.via, list(p.models), p.loaded) for p in response.pairs]


def glossary_entries(glossary: Glossary | None) -> list[Any]:
    pairs = glossary.items() if isinstance(glossary, Mapping) else (glossary or [])
    return [tpb.GlossaryEntry(source=source, target=target) for source, target in pairs]


def read_glossary(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """A ``source<TAB>target`` file (UTF-8; blank lines and ``#`` comments skipped), as the server's model
    glossaries are written."""
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            parts = line.split("\t")
            if len(parts) != 2:
                raise ValueError(f"{path}:{number}: expected 'source<TAB>target', got {len(parts)} fields")
            pairs.append((parts[0].strip(), parts[1].strip()))
    return pairs


def detailed(response: Any) -> list[DetailedTranslation]:
    def span(m: Any, side: str) -> Span:
        return getattr(m, f"{side}_start"), getattr(m, f"{side}_end")

    return [DetailedTranslation(t.text, t.tokens, [
        SentenceScore(span(s, "source"), span(s, "target"), s.mean_log_prob, s.min_token_prob,
                      [(span(a, "source"), span(a, "target")) for a in s.alignments]) for s in t.sentences],
        t.source_language, t.language_confidence, t.via, list(t.models),
        [(r.start, r.end, r.language, r.confidence) for r in t.languages])
        for t in response.translations]


def _segmentation(name: str) -> Any:
    if name not in SEGMENTATIONS:
        raise ValueError(f"segmentation: {name!r} is not one of {', '.join(SEGMENTATIONS)}")
    return SEGMENTATIONS[name]


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("sending PIL images or uint8 pixel arrays needs Pillow: "
                          "pip install 'transerve-client[images]'") from None
    return Image


def image_message(image: ImageLike) -> Any:
    """Paths and bytes are sent encoded as they are; float32 arrays as preprocessed tensors; uint8 arrays and
    PIL images as PNG."""
    if isinstance(image, bytes | bytearray):
        return tpb.Image(encoded=bytes(image))
    if isinstance(image, str | os.PathLike):
        return tpb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, np.ndarray):
        if image.dtype == np.float32:
            return tpb.Image(tensor=tpb.Tensor(shape=list(image.shape), data=image.astype("<f4").tobytes()))
        if image.dtype == np.uint8 and image.ndim in (2, 3):
            return tpb.Image(encoded=_png(_pil().fromarray(image)))
        raise TypeError(f"image arrays must be float32 (preprocessed [C, H, W]) or uint8 pixels ([H, W] or "
                        f"[H, W, C]); got {image.dtype} {list(image.shape)}")
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image, without importing Pillow to check
        return tpb.Image(encoded=_png(image))
    raise TypeError(f"cannot send a {type(image).__name__} as an image (path, bytes, PIL image or numpy array)")


def image_list(images: Sequence[ImageLike] | ImageLike) -> list[ImageLike]:
    """What ``classify`` accepts as a list of single images: one image alone, a ``[N, C, H, W]`` array, or a
    sequence of images."""
    if isinstance(images, str | bytes | np.ndarray) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        return [images]
    return list(images)  # type: ignore[arg-type]  # a PathLike alone was handled above


def classify_request(images: Sequence[ImageLike], model: str | None, top_k: int) -> Any:
    return tpb.ClassifyRequest(model=model or "", images=[image_message(i) for i in image_list(images)],
                               top_k=top_k)


def predictions(response: Any) -> list[list[Prediction]]:
    return [[Prediction(p.label, p.index, p.score) for p in result.predictions] for result in response.results]


def infer_request(model: str, inputs: dict[str, np.ndarray], version: str = "") -> Any:
    request = ipb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        try:
            add_tensor(request.inputs, request.raw_input_contents, name, np.asarray(array))
        except TensorError as e:
            raise TypeError(f"input {name!r}: {e}") from None
    return request


def infer_outputs(response: Any) -> dict[str, np.ndarray]:
    return tensors_to_numpy(response.outputs, response.raw_output_contents, field="raw_output_contents")


MAX_CHUNKS_IN_FLIGHT = 4  # chunks of one large call sent at once: enough to fill a server's batches


def batch_limit(metadatas: Sequence[Any], task: str, model: str | None) -> int | None:
    """Items per request for calls to ``model`` (None: the server's default ``task`` model), read from the
    ``max_batch_size`` its ModelMetadata carries; None when the server does not say (no splitting)."""
    for meta in metadatas:
        params = meta.parameters
        if "max_batch_size" not in params:
            continue
        named = model is not None and meta.name == model
        default = model is None and params["task"].string_param == task and params["default"].bool_param
        if named or default:
            return int(params["max_batch_size"].int64_param) or None
    return None


def chunk_ranges(count: int, limit: int | None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``limit`` items covering ``count`` (one range without a limit)."""
    if not limit or count <= limit:
        return [(0, count)]
    return [(start, min(start + limit, count)) for start in range(0, count, limit)]

