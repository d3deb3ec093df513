"""From a request's texts to what the decoder runs: each text checked against the limits, split into sentences,
a sentence too long for the encoder cut at its best boundary, tokenized, and given its budget.

Budgets: a request's ``max_new_tokens`` applies to every sentence (up to the model's hard limit, the decoder's
positions); without one, each sentence may make the larger of the model's default budget (its generation
config: what the library's own ``generate`` would allow, so an imported model still answers as its library
does) and twice its source tokens (EOS included) plus 10, capped by the hard limit — so a long sentence is not
cut short by a small default sized for short ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer
from transerve.server.engine.documents import Segmented, split_document
from transerve.server.exceptions import RequestError

CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# where to cut a sentence too long for the encoder, strongest first: after a clause's end, after a comma or a
# dash, at a space; failing all, at the last token that fits
CUTS = (re.compile(r"""[.!?;:。！？；：…]["'”’»)\]]*\s+"""), re.compile(r"[,،、，)\]—–]\s+|\s[—–-]\s+"),
        re.compile(r"\s+"))


@dataclass(frozen=True)
class DocumentPlan:
    document: Segmented  # sentence spans, each short enough for the encoder
    sources: list[list[int]]  # token ids per sentence, EOS appended
    budgets: list[int]  # new tokens each sentence may make


@dataclass(frozen=True)
class TextLimits:
    max_chars: int
    max_sentences: int
    max_input_tokens: int
    default_budget: int
    hard_budget: int
    language: str


def check_text(text: str, field: str, max_chars: int, limit_name: str) -> None:
    """The checks every text passes: length, not empty, no control characters (tab, CR, LF allowed)."""
    if len(text) > max_chars:
        raise RequestError(f"{field}: {len(text)} characters exceed {limit_name} {max_chars}")
    if not text.strip():
        raise RequestError(f"{field}: empty text (nothing to translate)")
    control = CONTROL_CHARACTERS.search(text)
    if control:
        raise RequestError(f"{field}: control character U+{ord(control.group()):04X} at position "
                           f"{control.start()} (only tab, newline and carriage return are allowed)")


class DocumentPlanner:
    def __init__(self, tokenizer: Tokenizer, eos_id: int, limits: TextLimits) -> None:
        self.tokenizer, self.eos_id, self.limits = tokenizer, eos_id, limits

    def plan(self, texts: Sequence[str], field: str, max_new_tokens: int | None) -> list[DocumentPlan]:
        return [self.plan_one(text, f"{field}[{i}]", max_new_tokens) for i, text in enumerate(texts)]

    def plan_one(self, text: str, field: str, max_new_tokens: int | None, prefix: tuple[int, ...] = ()
                 ) -> DocumentPlan:
        """``prefix``: ids put before every sentence (a multilingual model's target token), within its limit."""
        lim = self.limits
        check_text(text, field, lim.max_chars, "max_document_chars")
        document, sources = self.fit(split_document(text, lim.language), len(prefix))
        sources = [[*prefix, *s] for s in sources] if prefix else sources
        if len(document.spans) > lim.max_sentences:
            raise RequestError(f"{field}: {len(document.spans)} sentences exceed max_document_sentences "
                               f"{lim.max_sentences}")
        budgets = [max_new_tokens or min(lim.hard_budget, max(lim.default_budget, 2 * len(s) + 10))
                   for s in sources]
        return DocumentPlan(document, sources, budgets)

    def fit(self, document: Segmented, reserved: int = 0) -> tuple[Segmented, list[list[int]]]:
        """The document with every sentence longer than the encoder's limit (less ``reserved`` ids) cut into
        pieces that fit, and each sentence's token ids (EOS appended): tokenized once, only cut pieces again."""
        rows = [[*e.ids, self.eos_id] for e in self.tokenizer.encode_batch(document.sentences)]
        limit = self.limits.max_input_tokens - reserved
        if all(len(r) <= limit for r in rows):
            return document, rows
        spans: list[tuple[int, int]] = []
        sources: list[list[int]] = []
        for (start, end), row in zip(document.spans, rows, strict=True):
            if len(row) <= limit:
                spans.append((start, end))
                sources.append(row)
                continue
            pieces = self._cut(document.text, start, end, reserved)
            spans += pieces
            sources += [[*e.ids, self.eos_id]
                        for e in self.tokenizer.encode_batch([document.text[a:b] for a, b in pieces])]
        return Segmented(document.text, tuple(spans)), sources

    def _cut(self, text: str, start: int, end: int, reserved: int = 0) -> list[tuple[int, int]]:
        """Pieces of ``text[start:end]`` that each fit: the longest prefix that fits, ended at its strongest
        boundary in its second half, then the rest the same way."""
        fits = self.limits.max_input_tokens - 1 - reserved  # tokens besides EOS (and the prefix)
        pieces: list[tuple[int, int]] = []
        while start < end:
            window_end = min(end, start + 64 * fits)  # a token is rarely longer than 64 characters
            encoding = self.tokenizer.encode(text[start:window_end])
            if len(encoding.ids) <= fits:
                if window_end == end:
                    pieces.append((start, end))
                    break
                fits_until = window_end
            else:
                fits_until = start + encoding.offsets[fits - 1][1]
            cut = _best_cut(text, start, fits_until)
            while cut > start + 1 and len(self.tokenizer.encode(text[start:cut]).ids) > fits:  # re-tokenized longer
                cut = _best_cut(text, start, cut - 1)
            pieces.append((start, start + len(text[start:cut].rstrip())))
            rest = text[cut:end]
            start = cut + len(rest) - len(rest.lstrip())
        return [p for p in pieces if p[0] < p[1]]


def _best_cut(text: str, start: int, limit: int) -> int:
    """The end of the strongest boundary in ``text[(start + limit) / 2 : limit]``; ``limit`` itself if none."""
    half = start + (limit - start) // 2
    for pattern in CUTS:
        ends = [m.end() for m in pattern.finditer(text, half, limit)]
        if ends:
            return ends[-1]
    return max(limit, start + 1)
