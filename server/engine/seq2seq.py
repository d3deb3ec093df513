"""Greedy and beam decoding over an exported translator's graphs, torch-free.

The search is :mod:`transerve.search` (numpy); the graphs are any
:class:`~transerve.server.backends.runtime.GraphRunner`. One decoder graph serves
every path: ``decoder_step_ragged`` (per-row positions and a cache mask, what
continuous batching runs) decodes a uniform batch too — every row at the same
position, the cache starting with one masked slot — so a repository entry
needs no second copy of the decoder's weights for request-level batching.
An older entry's ``decoder_step`` (no ``positions`` input) still works.

Export verification runs this same class, so what the export report checks
is what the server runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transerve.search import (
    DEFAULT_RULES,
    Budgets,
    GenerationRules,
    SourceBeams,
    beam_search,
    greedy_search,
    log_softmax,
    strip_special,
)


@dataclass(frozen=True)
class DecoderLayout:
    """What decoding needs to know of the graphs (from the entry's ``config.yaml``)."""

    num_layers: int
    num_heads: int
    head_dim: int
    bos_id: int
    eos_id: int
    pad_id: int


class OrtSeq2Seq:
    """An encoder and a decoder step, the cache layout they share, and the model's generation rules."""

    def __init__(self, encoder: Any, decoder: Any, layout: DecoderLayout, rules: GenerationRules = DEFAULT_RULES
                 ) -> None:
        self.encoder, self.decoder, self.layout, self.rules = encoder, decoder, layout, rules
        layers = layout.num_layers
        self.past_names = [f"past_{k}_{i}" for i in range(layers) for k in ("k", "v")]
        self.cross_names = [f"cross_{k}_{i}" for i in range(layers) for k in ("k", "v")]
        names = [i.name for i in decoder.get_inputs()] if hasattr(decoder, "get_inputs") else decoder.input_names
        self.ragged = "positions" in names

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        return list(self.encoder.run(None, {"input_ids": ids.astype(np.int64),
                                            "attention_mask": mask.astype(np.int64)}))

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """The cache before the first step: the ragged graph takes one (masked) slot, the plain one none."""
        slots = 1 if self.ragged else 0
        shape = (batch, self.layout.num_heads, slots, self.layout.head_dim)
        return [np.zeros(shape, np.float32) for _ in self.past_names]

    def step(self, last: np.ndarray, mask: np.ndarray, past: list[np.ndarray],
             cross: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits ``[N, V]`` for the next token and the grown cache, every row at the same position."""
        feeds = {"input_ids": last.reshape(-1, 1).astype(np.int64), "attention_mask": mask.astype(np.int64)}
        if self.ragged:
            n, slots = len(last), past[0].shape[2]
            feeds["input_ids"] = feeds["input_ids"].reshape(-1)
            feeds["positions"] = np.full(n, slots - 1, np.int64)  # slot 0 is the masked placeholder
            past_mask = np.ones((n, slots), np.int64)
            past_mask[:, 0] = 0
            feeds["past_mask"] = past_mask
        feeds.update(zip(self.past_names, past, strict=True))
        feeds.update(zip(self.cross_names, cross, strict=True))
        logits, *present = self.decoder.run(None, feeds)
        return logits, present

    def generate(self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: Budgets, beam_size: int = 1,
                 length_penalty: float = 1.0, beams: Sequence[SourceBeams] | None = None) -> list[list[int]]:
        """Token ids for each source (EOS stripped), greedy when ``beam_size == 1``; one budget or one each.
        ``beams``: each source's beam search, made by the caller (constrained ones for glossary terms)."""
        batch, layout = ids.shape[0], self.layout
        cross = self.encode(ids, mask)
        rows = np.arange(batch).repeat(beam_size)
        cross, mask = [c[rows] for c in cross], mask[rows]

        def step(last: np.ndarray, past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
            logits, present = self.step(last, mask, self.empty_cache(len(rows)) if past is None else past, cross)
            return (logits if beam_size == 1 else log_softmax(logits)), present

        if beam_size == 1:
            return greedy_search(step, None, batch, layout.bos_id, layout.eos_id, max_new_tokens, layout.pad_id,
                                 self.rules)
        best = beam_search(step, None, batch, beam_size, layout.bos_id, layout.eos_id, max_new_tokens,
                           length_penalty, self.rules, beams)
        return [strip_special(h.tokens, layout.eos_id) for h in best]


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids ``[N, S]`` and their mask."""
    width = max((len(r) for r in rows), default=1)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, (ids != pad_id).astype(np.int64)


__all__ = ["DecoderLayout", "OrtSeq2Seq", "pad_ids"]
