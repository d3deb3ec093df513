"""Which entries translate from one language to another: a direct entry, or two through the pivot language.

Requests may name a language pair instead of a model. Every translate entry that declares ``languages`` in its
``config.yaml`` serves its pairs (a multilingual-target entry, each of its targets); an entry that failed to
load does not. With no entry for A→B, A→pivot and pivot→B together serve it (Argos and LibreTranslate do the
same through English). Among several entries for one pair, a bilingual one beats a multilingual one, then the
one marked ``default``, then the first by name — the same choice every time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from transerve.server.engine.model_config import ModelConfig
from transerve.server.exceptions import ModelNotFound


@dataclass(frozen=True)
class Leg:
    model: str
    source: str
    target: str
    target_token: str | None  # the token naming the target, before every source sentence (multilingual)


@dataclass(frozen=True)
class Route:
    source: str
    target: str
    legs: tuple[Leg, ...]

    @property
    def via(self) -> str:
        """The pivot language, or "" for a direct entry."""
        return self.legs[0].target if len(self.legs) > 1 else ""

    @property
    def models(self) -> list[str]:
        return [leg.model for leg in self.legs]


class LanguageRouter:
    def __init__(self, configs: Callable[[], Iterable[tuple[str, ModelConfig]]], pivot: str) -> None:
        """``configs``: the servable entries' names and configs, asked afresh at each routing (entries load,
        fail and reload while the server runs)."""
        self.configs, self.pivot = configs, pivot

    def direct(self) -> dict[tuple[str, str], Leg]:
        """The best entry for each pair some entry serves itself."""
        best: dict[tuple[str, str], tuple[tuple[bool, bool, str], Leg]] = {}
        for name, config in self.configs():
            languages = config.languages
            if config.task != "translate" or languages is None:
                continue
            for target in languages.target:
                if target == languages.source:
                    continue
                token = languages.token_for(target)
                rank = (languages.multilingual, not config.default, name)
                pair = (languages.source, target)
                if pair not in best or rank < best[pair][0]:
                    best[pair] = (rank, Leg(name, languages.source, target, token))
        return {pair: leg for pair, (_, leg) in best.items()}

    def routes(self) -> list[Route]:
        """Every pair that can be served, direct ones and those through the pivot, sorted."""
        direct = self.direct()
        routes = {pair: Route(*pair, (leg,)) for pair, leg in direct.items()}
        into = {s: leg for (s, t), leg in direct.items() if t == self.pivot}
        out_of = {t: leg for (s, t), leg in direct.items() if s == self.pivot}
        for source, first in into.items():
            for target, second in out_of.items():
                if source != target and (source, target) not in routes:
                    routes[(source, target)] = Route(source, target, (first, second))
        return [routes[pair] for pair in sorted(routes)]

    def route(self, source: str, target: str) -> Route:
        """The route for a pair; NOT_FOUND naming the pairs there are when there is none."""
        routes = self.routes()
        for r in routes:
            if (r.source, r.target) == (source, target):
                return r
        there = ", ".join(f"{r.source}→{r.target}" + (f" (via {r.via})" if r.via else "") for r in routes)
        raise ModelNotFound(f"source_language, target_language: no translation from {source} to {target}: no "
                            f"entry for the pair and no pivot "
                            f"through {self.pivot} (pairs served: {there or 'none — no entry declares languages'})")

    def sources(self) -> list[str]:
        """The languages some route reads: what detection chooses among."""
        return sorted({r.source for r in self.routes()})
