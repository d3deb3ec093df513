"""Greedy and beam decoding over the exported ``encoder`` + ``decoder_step`` graphs with ONNX Runtime.

The search itself is :mod:`transerve.models.decoding` — the same code that
decodes the PyTorch model — so the two can only differ in the graphs'
numbers, which is exactly what export verification wants to see.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor
from transerve.models.decoding import beam_search, greedy_search, strip_special


def session_options(threads: int = 2, spinning: bool = True) -> ort.SessionOptions:
    """``spinning=False`` for servers: ORT's worker threads stop spinning when a run ends instead of burning the
    cores that the gRPC and batching threads need between batches (offline loops keep the default)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: ORT's initializer chatter is not for users
    if not spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


def make_session(path: Path | bytes, threads: int = 2) -> ort.InferenceSession:
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])


class OrtSeq2Seq:
    """The two translator sessions and the cache layout they share."""

    def __init__(self, encoder: ort.InferenceSession, decoder: ort.InferenceSession, *, num_layers: int,
                 num_heads: int, head_dim: int, bos_id: int, eos_id: int, pad_id: int) -> None:
        self.encoder, self.decoder = encoder, decoder
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.past_names = [f"past_{k}_{i}" for i in range(num_layers) for k in ("k", "v")]
        self.cross_names = [f"cross_{k}_{i}" for i in range(num_layers) for k in ("k", "v")]

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        return self.encoder.run(None, {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})

    def step(self, last: np.ndarray, mask: np.ndarray, past: list[np.ndarray],
             cross: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": last.reshape(-1, 1).astype(np.int64), "attention_mask": mask.astype(np.int64)}
        feeds.update(zip(self.past_names, past, strict=True))
        feeds.update(zip(self.cross_names, cross, strict=True))
        logits, *present = self.decoder.run(None, feeds)
        return logits, present

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.num_heads, 0, self.head_dim), np.float32) for _ in self.past_names]

    def generate(self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, beam_size: int = 1,
                 length_penalty: float = 1.0) -> list[list[int]]:
        """Token ids for each source (EOS stripped), greedy when ``beam_size == 1``."""
        batch = ids.shape[0]
        cross = self.encode(ids, mask)
        rows = np.arange(batch).repeat(beam_size)
        cross, mask = [c[rows] for c in cross], mask[rows]

        def step(last: Tensor, past: list[np.ndarray] | None) -> tuple[Tensor, list[np.ndarray]]:
            logits, present = self.step(last.numpy(), mask, self.empty_cache(len(rows)) if past is None else past,
                                        cross)
            return torch.from_numpy(logits).log_softmax(dim=-1), present

        if beam_size == 1:
            return greedy_search(step, None, batch, self.bos_id, self.eos_id, max_new_tokens, self.pad_id)
        best = beam_search(_NumpyState(step), None, batch, beam_size, self.bos_id, self.eos_id, max_new_tokens,
                           length_penalty)
        return [strip_special(h.tokens, self.eos_id) for h in best]


class _NumpyState:
    """Adapts a step whose cache is numpy arrays to beam search's tensor row selection."""

    def __init__(self, step) -> None:  # type: ignore[no-untyped-def]
        self.inner = step

    def __call__(self, last: Tensor, state: list[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
        log_probs, present = self.inner(last, None if state is None else [s.numpy() for s in state])
        return log_probs, [torch.from_numpy(p) for p in present]


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max((len(r) for r in rows), default=1)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, (ids != pad_id).astype(np.int64)


__all__ = ["OrtSeq2Seq", "make_session", "pad_ids", "session_options"]
