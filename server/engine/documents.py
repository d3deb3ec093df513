"""Documents cut into the sentences a translator was trained on, and put back together with every character
between them exactly as sent.

Three rules, in order: a blank line is a paragraph break; inside a paragraph, a line break is a break too when
the next line starts like a new sentence (a capital, a digit, a list marker: headings, list items, "You
need:" lines), unless it starts in lower case or follows a long line (``WRAPPED_LINE`` characters or more)
that does not end a sentence — a hard-wrapped sentence, which may go on with a name; what remains
goes to sentencex, chosen over pysbd, blingfire and syntok for its speed at close to the best accuracy on our
test set (``bench/sentence_splitters.py``, figures in ``bench/RESULTS.md``). Sentences are spans of the
original text, so reassembly keeps paragraph breaks, line breaks, indentation and spacing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import sentencex

PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
SENTENCE_END = re.compile(r"""[.!?。！？…:;]["'”’»)\]]*\s*$""")
LIST_MARKERS = "-*•–—#>"
WRAPPED_LINE = 60
ENUMERATOR = re.compile(r"\(?(?:\d{1,3}|[a-zA-Z]|[ivxIVX]{1,4})[.)]")


@dataclass(frozen=True)
class Segmented:
    """A document and the spans ``(start, end)`` of its sentences, in order, without surrounding whitespace."""

    text: str
    spans: tuple[tuple[int, int], ...]

    @property
    def sentences(self) -> list[str]:
        return [self.text[start:end] for start, end in self.spans]

    def reassemble(self, translations: Sequence[str]) -> str:
        """The document with each sentence replaced by its translation and everything between kept."""
        return self.reassemble_spans(translations)[0]

    def reassemble_spans(self, translations: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
        """:meth:`reassemble`, and where each translation sits in the result."""
        if len(translations) != len(self.spans):
            raise ValueError(f"{len(translations)} translations for {len(self.spans)} sentences")
        parts, spans, cursor, at = [], [], 0, 0
        for (start, end), translation in zip(self.spans, translations, strict=True):
            at += start - cursor
            parts += [self.text[cursor:start], translation]
            spans.append((at, at + len(translation)))
            at += len(translation)
            cursor = end
        parts.append(self.text[cursor:])
        return "".join(parts), spans

    def gap_before(self, index: int) -> str:
        """What lies between sentence ``index - 1`` and sentence ``index`` (or the document's start)."""
        start = self.spans[index - 1][1] if index else 0
        return self.text[start:self.spans[index][0]]

    def tail(self) -> str:
        return self.text[self.spans[-1][1]:] if self.spans else self.text


def split_document(text: str, language: str = "en") -> Segmented:
    """Sentence spans of ``text`` (see the module's rules); ``language`` picks sentencex's rules (ISO 639)."""
    spans: list[tuple[int, int]] = []
    for start, end in _blocks(text):
        spans += _sentences(text, start, end, language)
    return Segmented(text, tuple(spans))


def _blocks(text: str) -> Iterator[tuple[int, int]]:
    """Spans of paragraphs, cut further at line breaks that start a heading or a list item."""
    start = 0
    for brk in PARAGRAPH_BREAK.finditer(text):
        yield from _lines(text, start, brk.start())
        start = brk.end()
    yield from _lines(text, start, len(text))


def _lines(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    cursor = start
    for newline in re.finditer("\n", text[start:end]):
        at = start + newline.start()
        line = text[cursor:at]
        wrapped = len(line.strip()) >= WRAPPED_LINE and SENTENCE_END.search(line) is None
        if not wrapped and _starts_like_a_sentence(text[at + 1:end].lstrip()[:1]):
            yield cursor, at
            cursor = at + 1
    yield cursor, end


def _starts_like_a_sentence(first: str) -> bool:
    return first.isupper() or first.isdigit() or (first != "" and first in LIST_MARKERS)


def _sentences(text: str, start: int, end: int, language: str) -> list[tuple[int, int]]:
    """sentencex's sentences of ``text[start:end]`` as spans of ``text``, whitespace trimmed. sentencex returns
    consecutive pieces of its input; a piece not found where expected (never seen) ends the block as one."""
    block, spans, cursor = text[start:end], [], 0
    for piece in sentencex.segment(language, block):
        stripped = piece.strip()
        if not stripped:
            continue
        found = block.find(stripped, cursor)
        if found < 0:
            rest = block[cursor:]
            offset = len(rest) - len(rest.lstrip())
            spans.append((start + cursor + offset, start + len(block.rstrip())))
            return [s for s in spans if s[0] < s[1]]
        if spans and ENUMERATOR.fullmatch(text, *spans[-1]):  # "1." cut off its list item: one sentence
            spans[-1] = (spans[-1][0], start + found + len(stripped))
        else:
            spans.append((start + found, start + found + len(stripped)))
        cursor = found + len(stripped)
    return spans
