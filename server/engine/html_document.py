"""HTML documents: the text of each block translated, every tag, attribute, comment and entity kept.

The page is read with the standard library's HTML tokenizer (``html.parser``, the one BeautifulSoup's
``html.parser`` mode uses) and cut into *parts*: markup kept verbatim — block-level tags, ``<br>``,
declarations, and whole elements never to be translated (``code``, ``pre``, ``script``, ``style``,
``textarea``, … and any element with ``translate="no"`` or class ``notranslate``, with everything inside) —
and *blocks*: runs of text with the inline elements inside them (``b``, ``i``, ``em``, ``a``, ``span``, … —
any tag not known to be block-level), whose text is translated as a document, sentence by sentence. An
inline element is carried onto the words of the translation that its words align with (the decoder's
cross-attention, :mod:`scoring`); comments and void elements inside a block (``<img>``, ``<wbr>``) stay at
the word they followed. Elements keep their order and nesting: a child inside its parent, siblings in their
source order (clamped when the translation reorders their words), so the result parses to the element
structure of the input. Entities: markup is kept as written; text is re-escaped, and a character the source
wrote as an entity (``&nbsp;``, ``&copy;``, ``&#8217;``) is written as that entity again.

Malformed HTML is read best-effort, never refused: the tokenizer, like a browser's, accepts anything, and every
tag is kept where it was relative to the text — an unclosed inline element runs to the end of its block, an
end tag with no start tag stays as a zero-width piece at its place. Nothing here recurses, so depth is no
limit (10 000 nested elements render as any other page); the size limit is ``max_document_chars``.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from itertools import accumulate

BLOCK = frozenset(["address", "article", "aside", "blockquote", "body", "br", "caption", "center", "dd", "details",
                   "dialog", "dir", "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form",
                   "frameset", "h1", "h2", "h3", "h4", "h5", "h6", "head", "header", "hgroup", "hr", "html", "legend",
                   "li", "main", "menu", "nav", "ol", "optgroup", "option", "p", "section", "select", "summary",
                   "table", "tbody", "td", "tfoot", "th", "thead", "title", "tr", "ul"])
UNTRANSLATED = frozenset(["code", "pre", "script", "style", "textarea", "kbd", "samp", "var", "noscript", "template",
                          "svg", "math"])
VOID = frozenset(["area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
                  "track", "wbr"])
ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);?")


@dataclass
class Inline:
    """An inline element of a block (or a zero-width piece: a void element, a comment, a stray end tag)."""

    tag: str
    start: int  # span in the block's text
    end: int
    open: str  # the markup as written
    close: str = ""  # its end tag as written ("" for a piece, or an element never closed)
    parent: int = -1  # the enclosing inline element's index, -1 for none
    piece: bool = False


@dataclass
class Block:
    raw: str = ""  # the markup as written: what an untranslated block renders as
    text: str = ""  # the text, entities decoded: what is translated
    inlines: list[Inline] = field(default_factory=list)
    entities: dict[str, str] = field(default_factory=dict)  # character → the entity the source wrote it as
    open: list[int] = field(default_factory=list)  # inline elements not yet closed, innermost last

    @property
    def translatable(self) -> bool:
        return bool(self.text.strip())


@dataclass
class HtmlPage:
    parts: list[str | Block]

    @property
    def blocks(self) -> list[Block]:
        return [p for p in self.parts if isinstance(p, Block) and p.translatable]


class _Events(HTMLParser):
    """Every token with the offset where its markup starts."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.line_starts = [0, *accumulate(len(line) for line in text.splitlines(keepends=True))]
        self.events: list[tuple[str, str, dict[str, str | None], int]] = []

    def _add(self, kind: str, tag: str = "", attrs: list[tuple[str, str | None]] | None = None) -> None:
        line, column = self.getpos()
        self.events.append((kind, tag, dict(attrs or []), self.line_starts[line - 1] + column))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._add("start", tag, attrs)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._add("void", tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        self._add("end", tag)

    def handle_data(self, data: str) -> None:
        self._add("data")

    def handle_comment(self, data: str) -> None:
        self._add("comment")

    def handle_decl(self, decl: str) -> None:
        self._add("markup")

    def handle_pi(self, data: str) -> None:
        self._add("markup")

    def unknown_decl(self, data: str) -> None:
        self._add("markup")


def parse_html(text: str) -> HtmlPage:
    events = _Events(text)
    events.feed(text)
    events.close()
    offsets = [e[3] for e in events.events] + [len(text)]
    parts: list[str | Block] = []
    block, skip, skip_depth = Block(), "", 0
    for (kind, tag, attrs, start), end in zip(events.events, offsets[1:], strict=True):
        raw = text[start:end]
        if skip:  # inside an element left as it is, until its own end tag
            skip_depth += (kind == "start" and tag == skip) - (kind == "end" and tag == skip)
            skip = "" if skip_depth == 0 else skip
            parts.append(raw)
            continue
        if kind == "start" and tag not in VOID and (tag in UNTRANSLATED or _marked_untranslated(attrs)):
            skip, skip_depth = tag, 1
        if skip or kind == "markup" or (kind in ("start", "end", "void") and tag in BLOCK):
            block = _flush(block, parts)
            parts.append(raw)
        else:
            _add_to_block(block, kind, tag, raw)
    _flush(block, parts)
    return HtmlPage(parts)


def _marked_untranslated(attrs: dict[str, str | None]) -> bool:
    return (attrs.get("translate") or "").strip().lower() == "no" or \
        "notranslate" in (attrs.get("class") or "").split()


def _flush(block: Block, parts: list[str | Block]) -> Block:
    if block.raw:
        for i in block.open:  # never closed: runs to the block's end
            block.inlines[i].end = len(block.text)
        block.open.clear()
        parts.append(block)
    return Block()


def _add_to_block(block: Block, kind: str, tag: str, raw: str) -> None:
    block.raw += raw
    at = len(block.text)
    parent = block.open[-1] if block.open else -1
    if kind == "data":
        for entity in ENTITY.findall(raw):
            decoded = html.unescape(entity)
            if len(decoded) == 1 and decoded not in "&<>":
                block.entities.setdefault(decoded, entity)
        block.text += html.unescape(raw)
    elif kind == "start" and tag not in VOID:
        block.open.append(len(block.inlines))
        block.inlines.append(Inline(tag, at, at, raw, parent=parent))
    elif kind == "end" and any(block.inlines[i].tag == tag for i in block.open):
        while block.open:  # misnested ones above it end here, unclosed
            i = block.open.pop()
            block.inlines[i].end = at
            if block.inlines[i].tag == tag:
                block.inlines[i].close = raw
                break
    else:  # a void element, a comment, a stray end tag
        block.inlines.append(Inline(tag, at, at, raw, parent=parent, piece=True))


__all__ = ["Block", "HtmlPage", "Inline", "parse_html"]
