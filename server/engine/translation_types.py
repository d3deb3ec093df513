"""What a translation request and its answer are made of, apart from the model that serves them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

from transerve.constrained import Constraints
from transerve.server.engine.document_plan import DocumentPlan
from transerve.server.engine.glossary import Glossary
from transerve.server.engine.scoring import SentenceReport
from transerve.server.engine.sentence_cache import CachedSentence

CONSTRAINED_BEAM = 2  # the least beam a sentence with glossary terms decodes with (bench/glossary rows)
NO_TERMS = Constraints(())
Markup = Literal["text", "html"]  # what a text is: plain text, or an HTML page whose markup is kept
Segmentation = Literal["sentences", "whole"]  # a text split into sentences (documents), or one model input


@dataclass
class TranslationResult:
    ids: list[int]
    text: str
    sentences: list[SentenceReport] | None = None  # when the request asked for scores or alignments


@dataclass(frozen=True)
class ReportOptions:
    """What a request wants beside the text: per-sentence scores, word alignments (both cost a scoring pass)."""

    scores: bool = False
    alignments: bool = False

    @property
    def wanted(self) -> bool:
        return self.scores or self.alignments


NO_REPORT = ReportOptions()


@dataclass(frozen=True)
class DecodeOptions:
    """A request's decoding settings, validated against the model's limits (``max_new_tokens`` None: each
    sentence's budget is the model's rule, :mod:`document_plan`)."""

    max_new_tokens: int | None
    beam_size: int
    length_penalty: float
    glossary: Glossary | None = field(default=None, compare=False)  # the model's merged with the request's
    prefix: tuple[int, ...] = ()  # before every source sentence: a multilingual model's target-language token

    def constraints(self, sentences: list[str], field: str) -> list[Constraints]:
        """Each sentence's glossary terms (none without a glossary)."""
        if self.glossary is None or self.glossary.pattern is None:
            return [NO_TERMS] * len(sentences)
        return [self.glossary.constraints(s, field) for s in sentences]

    def beam_for(self, constraints: Constraints | None) -> int:
        """The beam a sentence decodes with: a sentence with glossary terms takes at least the constrained
        search's beam (a greedy request's included)."""
        return max(self.beam_size, CONSTRAINED_BEAM) if constraints else self.beam_size


@dataclass(frozen=True)
class TranslateJob:
    """Sources of one request (or a slice of a document's sentences) for request-level batching
    (``scheduler.mode: static``), each with its budget."""

    sources: list[list[int]]
    budgets: list[int]
    options: DecodeOptions
    constraints: list[Constraints] | None = None  # each source's glossary terms (a constrained beam search)


@dataclass(frozen=True)
class StreamPiece:
    """New text of a streamed translation and the tokens made so far (the last piece may be empty)."""

    text: str
    tokens: int


@dataclass(frozen=True)
class TokenProgress:
    ids: list[int]  # every token so far
    final: bool



def assemble(plans: list[DocumentPlan], done: list[CachedSentence]
              ) -> tuple[list[TranslationResult], list[list[tuple[list[int], str]]]]:
    """Each document's result from its sentences' translations (in plan order), and those per document."""
    results, pieces, start = [], [], 0
    for plan in plans:
        mine = done[start:start + len(plan.sources)]
        results.append(TranslationResult([t for m in mine for t in m.ids],
                                         plan.document.reassemble([m.text for m in mine])))
        pieces.append([(list(m.ids), m.text) for m in mine])
        start += len(plan.sources)
    return results, pieces


async def all_or_cancel(coros: list[Any]) -> list[Any]:
    """Like gather, but one failure cancels the rest (their sequences leave the batch)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


__all__ = [
    "CONSTRAINED_BEAM",
    "NO_REPORT",
    "DecodeOptions",
    "ReportOptions",
    "Segmentation",
    "StreamPiece",
    "TokenProgress",
    "TranslateJob",
    "TranslationResult",
    "all_or_cancel", "assemble",
]
