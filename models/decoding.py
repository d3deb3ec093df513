"""Greedy decoding and beam search.

Both search over a *step function* — last tokens ``[N]`` and a state in,
next-token log-probabilities ``[N, V]`` and a new state out — so the same
search drives the PyTorch model, an ONNX session, or a hand-made scorer in a
test. The state is any nest of lists/tuples of tensors whose first axis is the
row; beam search reorders it with :func:`select_rows` when beams swap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transerve.models.attention import KVCache
from transerve.models.transformer import Seq2SeqTransformer

StepFn = Callable[[Tensor, Any], tuple[Tensor, Any]]


def select_rows(state: Any, rows: Tensor) -> Any:
    """Index the first axis of every tensor in a nest of lists/tuples (None passes through)."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.index_select(0, rows)
    return type(state)(select_rows(s, rows) for s in state)


def strip_special(ids: list[int], eos_id: int) -> list[int]:
    """Tokens up to (not including) the first EOS."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


@dataclass(order=True)
class Hypothesis:
    """A finished beam: ``score`` is the length-normalised log-probability."""

    score: float
    tokens: list[int] = field(compare=False)
    log_prob: float = field(compare=False)


@torch.no_grad()
def greedy_search(step: StepFn, state: Any, batch_size: int, bos_id: int, eos_id: int, max_new_tokens: int,
                  pad_id: int = 0) -> list[list[int]]:
    """Pick the most likely token at every step; finished rows are fed ``pad_id``."""
    last = torch.full((batch_size,), bos_id, dtype=torch.long)
    finished = torch.zeros(batch_size, dtype=torch.bool)
    out: list[Tensor] = []
    for _ in range(max_new_tokens):
        log_probs, state = step(last, state)
        last = log_probs.argmax(dim=-1).masked_fill(finished, pad_id)
        out.append(last)
        finished |= last == eos_id
        if bool(finished.all()):
            break
    ids = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(batch_size)]
    return [strip_special(row, eos_id) for row in ids]


@torch.no_grad()
def beam_search(step: StepFn, state: Any, batch_size: int, beam_size: int, bos_id: int, eos_id: int,
                max_new_tokens: int, length_penalty: float = 1.0) -> list[Hypothesis]:
    """Keep the ``beam_size`` best prefixes per source; return the best finished one each.

    ``state`` must already hold ``batch_size * beam_size`` rows (source-major).
    A hypothesis' score is ``log p / length ** length_penalty`` with the length
    counted in generated tokens, EOS included. A source stops as soon as
    ``beam_size`` hypotheses have finished (early stopping), which makes
    ``beam_size=1`` exactly greedy search.
    """
    k = beam_size
    scores = torch.full((batch_size, k), float("-inf"))
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    prefixes = torch.full((batch_size * k, 1), bos_id, dtype=torch.long)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
    for t in range(1, max_new_tokens + 1):
        log_probs, state = step(prefixes[:, -1], state)
        vocab = log_probs.shape[-1]
        cand = (scores[:, :, None] + log_probs.view(batch_size, k, vocab)).view(batch_size, k * vocab)
        top_scores, top_ids = cand.topk(2 * k, dim=-1)  # 2k: enough that k survive even if k end
        rows, tokens, scores = _advance(top_scores, top_ids // vocab, top_ids % vocab, prefixes, finished,
                                        k, eos_id, t, length_penalty)
        if all(len(f) >= k for f in finished):
            break
        prefixes = torch.cat([prefixes.index_select(0, rows), tokens[:, None]], dim=1)
        state = select_rows(state, rows)
    for b in range(batch_size):  # out of budget: unfinished beams compete as they are
        if len(finished[b]) < k:
            for j in range(k):
                _add(finished[b], prefixes[b * k + j, 1:].tolist(), float(scores[b, j]), length_penalty)
    return [max(f) for f in finished]


def _add(pool: list[Hypothesis], tokens: list[int], log_prob: float, length_penalty: float) -> None:
    if log_prob != float("-inf"):
        pool.append(Hypothesis(log_prob / max(len(tokens), 1) ** length_penalty, tokens, log_prob))


def _advance(top_scores: Tensor, beam_ids: Tensor, token_ids: Tensor, prefixes: Tensor,
             finished: list[list[Hypothesis]], k: int, eos_id: int, t: int,
             length_penalty: float) -> tuple[Tensor, Tensor, Tensor]:
    """Move candidates ending in EOS to ``finished``; keep the best ``k`` others alive."""
    batch_size = top_scores.shape[0]
    rows = torch.zeros(batch_size * k, dtype=torch.long)
    tokens = torch.full((batch_size * k,), eos_id, dtype=torch.long)
    scores = torch.full((batch_size, k), float("-inf"))
    for b in range(batch_size):
        alive = 0
        for rank in range(2 * k):
            if alive == k or len(finished[b]) >= k:
                break
            row = b * k + int(beam_ids[b, rank])
            tok, score = int(token_ids[b, rank]), float(top_scores[b, rank])
            if tok == eos_id:
                if rank < k:  # an EOS outside the top k would not have been kept by greedy-like search
                    _add(finished[b], [*prefixes[row, 1:].tolist(), eos_id], score, length_penalty)
                continue
            rows[b * k + alive], tokens[b * k + alive], scores[b, alive] = row, tok, score
            alive += 1
    return rows, tokens, scores


def model_step(model: Seq2SeqTransformer, memory_kv: list[KVCache], src_keep: Tensor) -> StepFn:
    """Step function over the model's KV-cached ``decode``; the state is the self-attention cache."""

    def step(last: Tensor, past: list[KVCache] | None) -> tuple[Tensor, list[KVCache]]:
        logits, present = model.decode(last[:, None], memory_kv, src_keep, past)
        return logits[:, -1].log_softmax(dim=-1), present

    return step


def recompute_step(model: Seq2SeqTransformer, memory_kv: list[KVCache], src_keep: Tensor) -> StepFn:
    """Step function without a cache: the state is the prefix, re-decoded in full every step."""

    def step(last: Tensor, prefix: Tensor | None) -> tuple[Tensor, Tensor]:
        prefix = last[:, None] if prefix is None else torch.cat([prefix, last[:, None]], dim=1)
        logits, _ = model.decode(prefix, memory_kv, src_keep)
        return logits[:, -1].log_softmax(dim=-1), prefix

    return step


@torch.no_grad()
def translate_ids(model: Seq2SeqTransformer, src: Tensor, src_keep: Tensor, max_new_tokens: int,
                  beam_size: int = 1, length_penalty: float = 1.0, use_cache: bool = True) -> list[list[int]]:
    """Token ids in, generated ids out (EOS stripped); greedy when ``beam_size == 1``."""
    cfg = model.config
    memory_kv = model.memory_kv(model.encode(src, src_keep))
    make_step = model_step if use_cache else recompute_step
    if beam_size == 1:
        return greedy_search(make_step(model, memory_kv, src_keep), None, src.shape[0], cfg.bos_id,
                             cfg.eos_id, max_new_tokens, cfg.pad_id)
    expand = torch.arange(src.shape[0]).repeat_interleave(beam_size)
    step = make_step(model, select_rows(memory_kv, expand), src_keep.index_select(0, expand))
    best = beam_search(step, None, src.shape[0], beam_size, cfg.bos_id, cfg.eos_id, max_new_tokens,
                       length_penalty)
    return [strip_special(h.tokens, cfg.eos_id) for h in best]
