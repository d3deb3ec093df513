"""What a translation request and its answer are made of, apart from the model that serves them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transerve.constrained import Constraints
from transerve.server.engine.glossary import Glossary
from transerve.server.engine.scoring import SentenceReport

CONSTRAINED_BEAM = 4  # the least beam a sentence with glossary terms decodes with (bench/glossary rows)
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


__all__ = ["NO_REPORT", "DecodeOptions", "ReportOptions", "Segmentation", "StreamPiece", "TokenProgress",
           "TranslateJob", "TranslationResult"]
