"""A translated HTML block put back together: the translation, escaped, with the block's inline elements placed
on the words their source words align with (see :mod:`html_document` for the rules)."""

from __future__ import annotations

import html
from collections.abc import Sequence

from transerve.server.engine.html_document import Block, HtmlPage
from transerve.server.engine.scoring import WordAlignment

Span = tuple[int, int]


def render_page(page: HtmlPage, translated: Sequence[str]) -> str:
    """``translated``: the rendering of each of ``page.blocks``, in order."""
    rendered = iter(translated)
    return "".join(p if isinstance(p, str) else next(rendered) if p.translatable else p.raw for p in page.parts)


def render_block(block: Block, translation: str, alignments: Sequence[WordAlignment]) -> str:
    spans = place(block, alignments, len(translation))
    children: dict[int, list[int]] = {}
    for i, element in enumerate(block.inlines):
        children.setdefault(element.parent, []).append(i)
    out: list[str] = []
    # iterative depth-first walk: (element, its next child, where its text continues)
    stack: list[tuple[int, int, int]] = [(-1, 0, 0)]
    while stack:
        node, child, cursor = stack.pop()
        mine = children.get(node, [])
        end = len(translation) if node < 0 else spans[node][1]
        if child < len(mine):
            c = mine[child]
            out.append(_escaped(translation[cursor:spans[c][0]], block))
            out.append(block.inlines[c].open)
            stack.append((node, child + 1, spans[c][1]))
            stack.append((c, 0, spans[c][0]))
            continue
        out.append(_escaped(translation[cursor:end], block))
        if node >= 0:
            out.append(block.inlines[node].close)
    return "".join(out)


def place(block: Block, alignments: Sequence[WordAlignment], length: int) -> list[Span]:
    """Each inline element's span in the translation: the target words aligned with its source words, inside
    its parent's span and after its earlier siblings'; an element with no aligned word (and a zero-width piece)
    sits where the translation of the source word before it ends."""
    spans: list[Span] = []
    after_sibling: dict[int, int] = {}
    for element in block.inlines:
        low, high = (0, length) if element.parent < 0 else spans[element.parent]
        low = max(low, after_sibling.get(element.parent, low))
        if element.piece or element.start == element.end:
            start = end = _anchor(alignments, element.start, length)
        else:
            targets = [a.target for a in alignments if a.source[0] < element.end and element.start < a.source[1]]
            start, end = (min(t[0] for t in targets), max(t[1] for t in targets)) if targets else (
                _anchor(alignments, element.start, length),) * 2
        start = min(max(start, low), high)
        end = min(max(end, start), high)
        spans.append((start, end))
        after_sibling[element.parent] = end
    return spans


def _anchor(alignments: Sequence[WordAlignment], position: int, length: int) -> int:
    """Where a point between source words lands in the translation: as far after the translation of the
    source word before it as it was after that word (so a comment or an image keeps its side of a space), but
    not past the translation of the word after it."""
    before = [a for a in alignments if a.source[1] <= position]
    after = [a.target[0] for a in alignments if a.source[0] >= position]
    if not before:
        return min([position, *after, length])
    last = max(a.source[1] for a in before)
    end = max(a.target[1] for a in before if a.source[1] == last)
    return min([end + position - last, *[t for t in after if t >= end], length])


def _escaped(text: str, block: Block) -> str:
    out = html.escape(text, quote=False)
    for character, entity in block.entities.items():
        out = out.replace(character, entity)
    return out


__all__ = ["place", "render_block", "render_page"]
