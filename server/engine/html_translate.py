"""``format: html``: each page parsed (:mod:`html_document`), the text of its blocks translated as documents —
blocks with inline elements with word alignments, to carry those elements — and the page rendered again
(:mod:`html_render`). Parsing and rendering run off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from transerve.server.engine.document_plan import check_text
from transerve.server.engine.documents import split_document
from transerve.server.engine.html_document import HtmlPage, parse_html
from transerve.server.engine.html_render import render_block, render_page
from transerve.server.engine.translation_types import TranslationResult, all_or_cancel
from transerve.server.exceptions import RequestError

# (block texts, the request field each belongs to, whether word alignments are needed) → their translations
TranslateBlocks = Callable[[list[str], list[str], bool], Awaitable[list[TranslationResult]]]


@dataclass(frozen=True)
class PageLimits:
    max_chars: int
    max_sentences: int
    language: str


async def translate_pages(texts: list[str], field: str, limits: PageLimits, translate_blocks: TranslateBlocks
                          ) -> list[TranslationResult]:
    loop = asyncio.get_running_loop()
    fields = [f"{field}[{i}]" for i in range(len(texts))]
    pages = await loop.run_in_executor(None, _parse_all, texts, fields, limits)
    blocks = [(f, b) for f, page in zip(fields, pages, strict=True) for b in page.blocks]
    groups = [(g, align) for g, align in (([i for i, (_, b) in enumerate(blocks) if b.inlines], True),
                                          ([i for i, (_, b) in enumerate(blocks) if not b.inlines], False)) if g]
    translated = await all_or_cancel([translate_blocks([blocks[i][1].text for i in g], [blocks[i][0] for i in g],
                                                       align) for g, align in groups])
    done: dict[int, TranslationResult] = {}
    for (group, _), results in zip(groups, translated, strict=True):
        done.update(zip(group, results, strict=True))
    return await loop.run_in_executor(None, _render_all, pages, [done[i] for i in range(len(blocks))])


def _parse_all(texts: list[str], fields: list[str], limits: PageLimits) -> list[HtmlPage]:
    pages = []
    for text, name in zip(texts, fields, strict=True):
        check_text(text, name, limits.max_chars, "max_document_chars")
        page = parse_html(text)
        if not page.blocks:
            raise RequestError(f"{name}: nothing to translate (only markup)")
        sentences = sum(len(split_document(b.text, limits.language).spans) for b in page.blocks)
        if sentences > limits.max_sentences:
            raise RequestError(f"{name}: {sentences} sentences exceed max_document_sentences {limits.max_sentences}")
        pages.append(page)
    return pages


def _render_all(pages: list[HtmlPage], results: list[TranslationResult]) -> list[TranslationResult]:
    out, at = [], 0
    for page in pages:
        mine = results[at:at + len(page.blocks)]
        at += len(page.blocks)
        rendered = [render_block(block, r.text, [a for s in r.sentences or () for a in s.score.alignments])
                    for block, r in zip(page.blocks, mine, strict=True)]
        out.append(TranslationResult([t for r in mine for t in r.ids], render_page(page, rendered)))
    return out


__all__ = ["PageLimits", "TranslateBlocks", "translate_pages"]
