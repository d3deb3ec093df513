"""Translation asked by language pair: detect the source where asked, route each text, run the legs.

Texts of one request may go different ways (``auto`` finds each its own language; per-sentence detection
splits a text into runs of one language). Texts that share a route translate together, one batch per leg;
routes run concurrently. A text already in the target language comes back as it was. Each leg holds its model
(:meth:`ModelManager.use`) only while it runs, so a two-leg route never needs both models at once.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Literal

from transerve.languages import AUTO, LanguageCodeError, normalize
from transerve.server.engine.documents import Segmented, split_document
from transerve.server.engine.glossary import GlossaryEntry
from transerve.server.engine.language_id import Detected, LanguageDetector
from transerve.server.engine.manager import ModelManager
from transerve.server.engine.pivot import compose_reports, glossary_legs
from transerve.server.engine.routing import LanguageRouter, Route
from transerve.server.engine.scoring import SentenceReport, shifted
from transerve.server.engine.translation_types import (
    NO_REPORT,
    Markup,
    ReportOptions,
    Segmentation,
    StreamPiece,
    TranslationResult,
)
from transerve.server.engine.translator import TranslatorModel
from transerve.server.exceptions import RequestError

DetectionScope = Literal["document", "sentence"]
Piece = tuple[str, str, "Detected | None"]  # text, its language, how it was detected (None: given)


@dataclass(frozen=True)
class LanguagePair:
    source: str  # a normalised code, or "auto"
    target: str
    detection: DetectionScope = "document"


@dataclass(frozen=True)
class CallOptions:
    """A Translate request's options, as every leg takes them."""

    max_new_tokens: int | None = None
    beam_size: int | None = None
    length_penalty: float | None = None
    segmentation: Segmentation = "sentences"
    use_cache: bool = True
    report: ReportOptions = NO_REPORT
    glossary: tuple[GlossaryEntry, ...] = ()
    markup: Markup = "text"


@dataclass
class LanguageRun:
    span: tuple[int, int]
    language: str
    confidence: float


@dataclass
class RoutedResult:
    result: TranslationResult
    source_language: str
    confidence: float  # 0 when the client named the language
    route: Route | None  # None: already in the target language
    languages: list[LanguageRun] = field(default_factory=list)  # per-sentence detection: each run


@dataclass(frozen=True)
class StreamRoute:
    """What a stream says before its first piece: which way the text goes."""

    model: str  # the model producing the pieces (the last leg's)
    source_language: str = ""
    confidence: float = 0.0
    via: str = ""
    models: tuple[str, ...] = ()


def language_pair(source: str, target: str, detection: DetectionScope = "document") -> LanguagePair:
    """The request's languages, checked and normalised; errors name the field."""
    if not target:
        raise RequestError("target_language: required when source_language is given (e.g. de)")
    try:
        to = normalize(target)
    except LanguageCodeError as e:
        raise RequestError(f"target_language: {e}") from None
    if not source or source.strip().lower() == AUTO:
        return LanguagePair(AUTO, to, detection)
    try:
        return LanguagePair(normalize(source), to, detection)
    except LanguageCodeError as e:
        raise RequestError(f"source_language: {e} (or \"auto\" to detect it)") from None


class RoutedTranslator:
    def __init__(self, manager: ModelManager, router: LanguageRouter, detector: LanguageDetector) -> None:
        self.manager, self.router, self.detector = manager, router, detector

    @classmethod
    def serving(cls, manager: ModelManager, pivot: str) -> RoutedTranslator:
        """Routes over the manager's servable entries (loaded, or lazy and loadable), asked afresh each time."""
        return cls(manager, LanguageRouter(manager.servable_configs, pivot), LanguageDetector())

    async def translate(self, texts: list[str], pair: LanguagePair, deadline: float | None, options: CallOptions,
                        field: str = "texts") -> list[RoutedResult]:
        if not texts:
            raise RequestError(f"{field}: no text")
        pieces, runs = await asyncio.to_thread(self._pieces, texts, pair, field)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, (_, language, _) in enumerate(pieces):
            groups[language].append(i)
        done: dict[int, tuple[TranslationResult, Route | None]] = {}

        async def one_route(language: str, indices: list[int]) -> None:
            route = None if language == pair.target else self.router.route(language, pair.target)
            results = await self._run(route, [pieces[i][0] for i in indices], deadline, options, field)
            done.update({i: (r, route) for i, r in zip(indices, results, strict=True)})

        await asyncio.gather(*(one_route(language, indices) for language, indices in groups.items()))
        if runs is None:
            return [RoutedResult(done[i][0], piece[1], piece[2].confidence if piece[2] else 0.0, done[i][1])
                    for i, piece in enumerate(pieces)]
        return assembled(texts, runs, done)

    async def stream(self, text: str, pair: LanguagePair, deadline: float | None, options: CallOptions
                     ) -> AsyncIterator[StreamRoute | StreamPiece]:
        """One text's pieces as its last leg makes them, after a :class:`StreamRoute`; a pivot's first leg
        translates whole first (the last leg cannot start before its source exists)."""
        [(_, language, detected)], _ = await asyncio.to_thread(self._pieces, [text], pair, "text")
        if language == pair.target:
            yield StreamRoute("-", language, detected.confidence if detected else 0.0)
            yield StreamPiece(text, 0)
            return
        route = self.router.route(language, pair.target)
        source = text
        if len(route.legs) > 1:
            first = Route(route.source, route.legs[0].target, route.legs[:1])
            source = (await self._run(first, [text], deadline, options, "text"))[0].text
        last = route.legs[-1]
        glossary = glossary_legs(options.glossary)[1] if len(route.legs) > 1 else list(options.glossary)
        async with self.manager.use(last.model, task="translate", deadline=deadline) as model:
            assert isinstance(model, TranslatorModel)
            yield StreamRoute(last.model, language, detected.confidence if detected else 0.0, route.via,
                              tuple(route.models))
            async for piece in model.stream(source, options.max_new_tokens, deadline, options.beam_size,
                                            options.length_penalty, options.segmentation, options.use_cache,
                                            glossary, options.markup, last.target_token):
                yield piece

    def _pieces(self, texts: list[str], pair: LanguagePair, field: str
                ) -> tuple[list[Piece], list[list[LanguageRun]] | None]:
        """What to translate: each text (its language given or detected) or, per-sentence, each run of one
        language; with what language and how sure (and the runs of each text, per-sentence)."""
        if pair.source != AUTO:
            return [(text, pair.source, None) for text in texts], None
        candidates = self.router.sources()
        if pair.detection == "document":
            found = [self.detector.detect(t, candidates, f"{field}[{i}]") for i, t in enumerate(texts)]
            return [(t, d.language, d) for t, d in zip(texts, found, strict=True)], None
        out: list[Piece] = []
        runs = [self._language_runs(t, candidates, f"{field}[{i}]") for i, t in enumerate(texts)]
        for text, text_runs in zip(texts, runs, strict=True):
            out += [(text[r.span[0]:r.span[1]], r.language, Detected(r.language, r.confidence)) for r in text_runs]
        return out, runs

    def _language_runs(self, text: str, candidates: list[str], field: str) -> list[LanguageRun]:
        """Consecutive sentences of one detected language, as runs covering the text (a sentence with no
        letters joins the run before it, or the first run); the text's own error when no sentence has any."""
        spans = split_document(text).spans
        runs: list[LanguageRun] = []
        for start, end in spans:
            try:
                found = self.detector.detect(text[start:end], candidates, field)
            except RequestError:
                if runs:
                    runs[-1].span = (runs[-1].span[0], end)
                continue
            if runs and runs[-1].language == found.language:
                runs[-1].span = (runs[-1].span[0], end)
                runs[-1].confidence = min(runs[-1].confidence, found.confidence)
            else:
                runs.append(LanguageRun((runs[-1].span[1] if runs else start, end), found.language,
                                        found.confidence))
        if not runs:
            found = self.detector.detect(text, candidates, field)  # raises: nothing to tell the language by
            return [LanguageRun((0, len(text)), found.language, found.confidence)]
        runs[0].span = (spans[0][0], runs[0].span[1])
        return runs

    async def _run(self, route: Route | None, texts: list[str], deadline: float | None, options: CallOptions,
                   field: str) -> list[TranslationResult]:
        """``texts`` through every leg of ``route``; reports composed across a pivot."""
        if route is None:
            return [TranslationResult([], t) for t in texts]
        glossaries = glossary_legs(options.glossary) if len(route.legs) > 1 else (list(options.glossary),)
        results: list[TranslationResult] = []
        current, reports = texts, None
        for leg, glossary in zip(route.legs, glossaries, strict=True):
            async with self.manager.use(leg.model, task="translate", deadline=deadline) as model:
                assert isinstance(model, TranslatorModel)
                results = await model.translate(
                    current, options.max_new_tokens, deadline, field, options.beam_size, options.length_penalty,
                    options.segmentation, options.use_cache, options.report, glossary, options.markup,
                    leg.target_token)
            if reports is not None:
                results = [replace(r, sentences=compose_reports(before, r.sentences or []))
                           for r, before in zip(results, reports, strict=True)]
            reports = [r.sentences or [] for r in results] if options.report.wanted else None
            current = [r.text for r in results]
        return results


def assembled(texts: list[str], runs: list[list[LanguageRun]],
              done: dict[int, tuple[TranslationResult, Route | None]]) -> list[RoutedResult]:
    """Per-sentence detection: each text put back together from its runs' translations, reports moved from
    run offsets to text offsets."""
    out, at = [], 0
    for text, text_runs in zip(texts, runs, strict=True):
        parts = [done[at + k] for k in range(len(text_runs))]
        joined, targets = Segmented(text, tuple(r.span for r in text_runs)).reassemble_spans(
            [r.text for r, _ in parts])
        reports = None
        if any(r.sentences is not None for r, _ in parts):
            reports = [moved(report, run.span[0], target[0]) for (r, _), run, target
                       in zip(parts, text_runs, targets, strict=True) for report in r.sentences or []]
        main = max(text_runs, key=lambda r: r.span[1] - r.span[0])
        route = next((route for _, route in parts if route is not None), None)
        result = TranslationResult([t for r, _ in parts for t in r.ids], joined, reports)
        out.append(RoutedResult(result, main.language, main.confidence, route, text_runs))
        at += len(text_runs)
    return out


def moved(report: SentenceReport, source_at: int, target_at: int) -> SentenceReport:
    return SentenceReport((report.source[0] + source_at, report.source[1] + source_at),
                          (report.target[0] + target_at, report.target[1] + target_at),
                          shifted(report.score, source_at, target_at))
