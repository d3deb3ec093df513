"""A model's generation rules: what a Hugging Face checkpoint's ``generation_config.json`` does to each step.

The request chooses the beam size, the budget and the length penalty; the
*model* brings rules that change which tokens may come out and when a beam
search ends. They are applied the way ``transformers``' ``generate()``
applies them (its logits processors and ``_beam_search``, version 5), so an
imported opus-mt checkpoint decodes token for token as it does there:

- ``bad_words``: token sequences never completed. A one-token sequence is
  masked at every step (Marian checkpoints forbid their pad token), a longer
  one only right after its prefix. A lone EOS is never banned (as there).
- ``forced_eos``: the budget's last token is EOS — a budget of N new tokens
  yields at most N − 1 tokens of text.
- ``renormalize``: beam scores are log-softmaxed again after masking
  (``renormalize_logits``); greedy picks are unchanged by it.
- ``early_stopping``: when a source's beam search ends. ``True``: once
  ``beam_size`` hypotheses have finished. ``False`` (the library default):
  once ``beam_size`` have finished and the best running beam, normalised at
  its current length, can no longer beat the worst of them. ``"never"``: as
  ``False``, but the best running beam is normalised at the full budget when
  ``length_penalty > 0``.

The defaults are transerve's own models' rules: nothing masked, nothing
forced, stop once ``beam_size`` hypotheses finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

EarlyStopping = bool | Literal["never"]


@dataclass(frozen=True)
class GenerationRules:
    bad_words: tuple[tuple[int, ...], ...] = ()
    forced_eos: bool = False
    renormalize: bool = False
    early_stopping: EarlyStopping = True
    banned: np.ndarray = field(init=False, repr=False, compare=False)  # the one-token bad words

    def __post_init__(self) -> None:
        singles = sorted({w[0] for w in self.bad_words if len(w) == 1})
        object.__setattr__(self, "banned", np.asarray(singles, np.int64))

    @classmethod
    def from_settings(cls, bad_words_ids: Sequence[Sequence[int]] = (), forced_eos: bool = False,
                      renormalize: bool = False, early_stopping: EarlyStopping = True,
                      eos_id: int | None = None) -> GenerationRules:
        """The rules of a checkpoint's settings; ``[eos_id]`` alone is dropped from the bad words, as there."""
        words = tuple(tuple(int(t) for t in w) for w in bad_words_ids if list(w) != [eos_id] and len(w))
        return cls(words, forced_eos, renormalize, early_stopping)

    @property
    def needs_history(self) -> bool:
        """Whether masking needs each row's tokens so far (only bad words longer than one token do)."""
        return any(len(w) > 1 for w in self.bad_words)

    def mask(self, scores: np.ndarray, histories: Sequence[Sequence[int]] | None = None,
             forced: np.ndarray | None = None, eos_id: int = 0) -> np.ndarray:
        """Scores ``[N, V]`` (logits or log-probabilities) as the model's rules leave them: bad words at −inf, and
        each ``forced`` row all −inf but EOS at 0. ``histories``: each row's tokens so far, decoder start first
        (only read when :attr:`needs_history`). A copy whenever something changes; ``scores`` is never written."""
        out = scores
        if self.banned.size:
            out = out.copy()
            out[:, self.banned] = -np.inf
        if self.needs_history and histories is not None:
            for row, history in enumerate(histories):
                for token in self._banned_after(history):
                    out = out if out is not scores else out.copy()
                    out[row, token] = -np.inf
        if forced is not None and self.forced_eos and forced.any():
            out = out if out is not scores else out.copy()
            out[forced] = -np.inf
            out[forced, eos_id] = 0.0
        return out

    def _banned_after(self, history: Sequence[int]) -> list[int]:
        return [w[-1] for w in self.bad_words
                if len(w) > 1 and len(history) >= len(w) - 1 and list(history[len(history) - len(w) + 1:]) == list(
                    w[:-1])]

    def greedy_pick(self, scores: np.ndarray, histories: Sequence[Sequence[int]] | None = None,
                    forced: np.ndarray | None = None, eos_id: int = 0) -> np.ndarray:
        """The greedy token of each row under the rules. Fast path for serving: the argmax of the raw scores is
        kept unless it is a banned token (then that row is masked and picked again) — the same pick as masking
        every row first, since masking can only lower scores."""
        best = scores.argmax(axis=-1)
        if self.banned.size:
            hit = np.isin(best, self.banned)
            if hit.any():
                best[hit] = self.mask(scores[hit]).argmax(axis=-1)
        if self.needs_history and histories is not None:
            for row, history in enumerate(histories):
                if int(best[row]) in self._banned_after(history):
                    best[row] = self.mask(scores[row:row + 1], [history]).argmax(axis=-1)[0]
        if forced is not None and self.forced_eos:
            best[forced] = eos_id
        return best


@dataclass(frozen=True)
class DecodingDefaults:
    """A checkpoint's own decoding settings, as an entry's ``config.yaml`` carries them: the beam size, budget and
    length penalty a request gets unless it sends its own, and the model's :class:`GenerationRules`."""

    beam_size: int = 1
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    rules: GenerationRules = GenerationRules()

    def generation_section(self) -> dict[str, object]:
        """``config.yaml``'s ``generation`` section (``server.model_config.Generation``)."""
        r = self.rules
        return {"length_penalty": self.length_penalty, "early_stopping": r.early_stopping,
                "bad_words_ids": [list(w) for w in r.bad_words], "forced_eos": r.forced_eos,
                "renormalize_logits": r.renormalize}


__all__ = ["DecodingDefaults", "EarlyStopping", "GenerationRules"]
