"""What a translation through the pivot language reports, made from what its two legs report.

Leg one reports spans of the request's text and of the pivot text; leg two, spans of the pivot text and of
the final translation. A final sentence's source is the union of the leg-one sentences whose pivot text it
read; its word alignments join the legs on the pivot words they share (source word → pivot word → target
word); its scores combine the legs: the mean log-probabilities add (the chain's probability is the
product), the least likely token is the least likely of either leg.
"""

from __future__ import annotations

from collections.abc import Sequence

from transerve.server.engine.glossary import GlossaryEntry
from transerve.server.engine.scoring import SentenceReport, SentenceScore, WordAlignment

Span = tuple[int, int]


def overlaps(a: Span, b: Span) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def compose_reports(first: Sequence[SentenceReport], second: Sequence[SentenceReport]) -> list[SentenceReport]:
    """Each final sentence's report, from leg one's (text → pivot) and leg two's (pivot → translation)."""
    out = []
    for last in second:
        feeding = [f for f in first if overlaps(f.target, last.source)] or list(first[:1])
        source = (min(f.source[0] for f in feeding), max(f.source[1] for f in feeding)) if feeding else (0, 0)
        mean = sum(f.score.mean_log_prob for f in feeding) / max(len(feeding), 1) + last.score.mean_log_prob
        least = min([last.score.min_token_prob, *(f.score.min_token_prob for f in feeding)])
        out.append(SentenceReport(source, last.target, SentenceScore(mean, least, joined(feeding, last))))
    return out


def joined(feeding: Sequence[SentenceReport], last: SentenceReport) -> tuple[WordAlignment, ...]:
    """Source → target word pairs through the pivot words both legs align."""
    pairs: dict[tuple[Span, Span], None] = {}
    for second in last.score.alignments:
        for report in feeding:
            for first in report.score.alignments:
                if overlaps(first.target, second.source):
                    pairs[(first.source, second.target)] = None
    return tuple(WordAlignment(s, t) for s, t in sorted(pairs, key=lambda p: (p[1], p[0])))


def glossary_legs(glossary: Sequence[GlossaryEntry]) -> tuple[list[GlossaryEntry], list[GlossaryEntry]]:
    """The terms each leg must use so the final translation holds every target term as written: leg one writes
    the target term into the pivot text, leg two keeps it."""
    return list(glossary), [GlossaryEntry(e.target, e.target) for e in glossary]
