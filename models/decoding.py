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
    Each source is a :class:`SourceBeams` — the same object the server's
    scheduler advances — so offline and served beam search agree by construction.
    """
    k = beam_size
    sources = [SourceBeams(k, bos_id, eos_id, max_new_tokens, length_penalty) for _ in range(batch_size)]
    last = torch.full((batch_size * k,), bos_id, dtype=torch.long)
    for _ in range(max_new_tokens):
        log_probs, state = step(last, state)
        rows = torch.arange(batch_size * k)  # a finished source's rows stay as they are (never read again)
        last = last.clone()  # a step may have kept the old tensor in its state
        for b, beams in enumerate(sources):
            if not beams.done:
                rows[b * k:(b + 1) * k] = torch.tensor(beams.advance(log_probs[b * k:(b + 1) * k])) + b * k
                last[b * k:(b + 1) * k] = torch.tensor(beams.last_tokens())
        if all(beams.done for beams in sources):
            break
        state = select_rows(state, rows)
    return [beams.best() for beams in sources]


class SourceBeams:
    """One source's beam search, advanced a step at a time.

    A hypothesis' score is ``log p / length ** length_penalty`` with the length
    counted in generated tokens, EOS included. The search stops as soon as
    ``beam_size`` hypotheses have finished (early stopping), which makes
    ``beam_size=1`` exactly greedy search; out of budget, the unfinished beams
    compete as they are.
    """

    def __init__(self, beam_size: int, bos_id: int, eos_id: int, max_new_tokens: int,
                 length_penalty: float = 1.0) -> None:
        self.k, self.bos_id, self.eos_id = beam_size, bos_id, eos_id
        self.max_new_tokens, self.length_penalty = max_new_tokens, length_penalty
        self.scores = torch.full((beam_size,), float("-inf"))
        self.scores[0] = 0.0  # all beams start identical: expand only the first
        self.prefixes: list[list[int]] = [[] for _ in range(beam_size)]
        self.finished: list[Hypothesis] = []
        self.steps = 0
        self.done = False

    def last_tokens(self) -> list[int]:
        return [p[-1] if p else self.bos_id for p in self.prefixes]

    def advance(self, log_probs: Tensor) -> list[int]:
        """``log_probs [k, V]`` of this source's beams → for each new beam, the beam it extends."""
        k, vocab = self.k, log_probs.shape[-1]
        self.steps += 1
        cand = (self.scores[:, None] + log_probs).view(k * vocab)
        top_scores, top_ids = cand.topk(2 * k)  # 2k: enough that k survive even if k end
        rows, tokens, scores = [0] * k, [self.eos_id] * k, torch.full((k,), float("-inf"))
        alive = 0
        for rank in range(2 * k):
            if alive == k or len(self.finished) >= k:
                break
            row, tok = int(top_ids[rank]) // vocab, int(top_ids[rank]) % vocab
            score = float(top_scores[rank])
            if tok == self.eos_id:
                if rank < k:  # an EOS outside the top k would not have been kept by greedy-like search
                    self._add([*self.prefixes[row], self.eos_id], score)
                continue
            rows[alive], tokens[alive], scores[alive] = row, tok, score
            alive += 1
        self.done = len(self.finished) >= k
        if not self.done:
            self.prefixes = [[*self.prefixes[r], t] for r, t in zip(rows, tokens, strict=True)]
            self.scores = scores
            if self.steps >= self.max_new_tokens:  # out of budget: unfinished beams compete as they are
                for j in range(k):
                    self._add(self.prefixes[j], float(scores[j]))
                self.done = True
        return rows

    def best(self) -> Hypothesis:
        return max(self.finished)

    def _add(self, tokens: list[int], log_prob: float) -> None:
        if log_prob != float("-inf"):
            self.finished.append(Hypothesis(log_prob / max(len(tokens), 1) ** self.length_penalty, tokens, log_prob))


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
