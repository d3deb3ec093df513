"""Greedy decoding and beam search over PyTorch tensors: the offline reference the server is held to.

Both search over a *step function* — last tokens ``[N]`` and a state in,
next-token log-probabilities ``[N, V]`` and a new state out — so the same
search drives the PyTorch model or a hand-made scorer in a test. The state is
any nest of lists/tuples of tensors whose first axis is the row; beam search
reorders it with :func:`select_rows` when beams swap. Serving runs the numpy
twin of these drivers (:mod:`transerve.search`, no torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transerve.models.attention import KVCache
from transerve.models.transformer import Seq2SeqTransformer
from transerve.search import DEFAULT_RULES, GenerationRules, Hypothesis, SourceBeams, strip_special

StepFn = Callable[[Tensor, Any], tuple[Tensor, Any]]


def select_rows(state: Any, rows: Tensor) -> Any:
    """Index the first axis of every tensor in a nest of lists/tuples (None passes through)."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.index_select(0, rows)
    return type(state)(select_rows(s, rows) for s in state)


@torch.no_grad()
def greedy_search(step: StepFn, state: Any, batch_size: int, bos_id: int, eos_id: int, max_new_tokens: int,
                  pad_id: int = 0, rules: GenerationRules = DEFAULT_RULES) -> list[list[int]]:
    """Pick the most likely token the rules allow at every step; finished rows are fed ``pad_id``."""
    last = torch.full((batch_size,), bos_id, dtype=torch.long)
    finished = torch.zeros(batch_size, dtype=torch.bool)
    out: list[Tensor] = []
    for made in range(max_new_tokens):
        log_probs, state = step(last, state)
        histories = None
        if rules.needs_history:
            histories = [[bos_id, *row] for row in (torch.stack(out, 1).tolist() if out else [[]] * batch_size)]
        forced = np.full(batch_size, made + 1 == max_new_tokens)
        picked = torch.from_numpy(rules.greedy_pick(log_probs.numpy(), histories, forced, eos_id))
        last = picked.masked_fill(finished, pad_id)
        out.append(last)
        finished |= last == eos_id
        if bool(finished.all()):
            break
    ids = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(batch_size)]
    return [strip_special(row, eos_id) for row in ids]


@torch.no_grad()
def beam_search(step: StepFn, state: Any, batch_size: int, beam_size: int, bos_id: int, eos_id: int,
                max_new_tokens: int, length_penalty: float = 1.0, rules: GenerationRules = DEFAULT_RULES
                ) -> list[Hypothesis]:
    """Keep the ``beam_size`` best prefixes per source; return the best finished one each.

    ``state`` must already hold ``batch_size * beam_size`` rows (source-major).
    Each source is a :class:`transerve.search.SourceBeams` — the torch-free object the server's scheduler
    advances too — so the two searches share their beam rules; they differ in the driver (tensors and the
    PyTorch model here, arrays and the exported graphs there), which tests hold equal token for token.
    """
    k = beam_size
    sources = [SourceBeams(k, bos_id, eos_id, max_new_tokens, length_penalty, rules) for _ in range(batch_size)]
    last = torch.full((batch_size * k,), bos_id, dtype=torch.long)
    for _ in range(max_new_tokens):
        log_probs, state = step(last, state)
        rows = torch.arange(batch_size * k)  # a finished source's rows stay as they are (never read again)
        last = last.clone()  # a step may have kept the old tensor in its state
        for b, beams in enumerate(sources):
            if not beams.done:
                rows[b * k:(b + 1) * k] = torch.tensor(beams.advance(log_probs[b * k:(b + 1) * k].numpy())) + b * k
                last[b * k:(b + 1) * k] = torch.tensor(beams.last_tokens())
        if all(beams.done for beams in sources):
            break
        state = select_rows(state, rows)
    return [beams.best() for beams in sources]


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
                  beam_size: int = 1, length_penalty: float = 1.0, use_cache: bool = True,
                  rules: GenerationRules = DEFAULT_RULES) -> list[list[int]]:
    """Token ids in, generated ids out (EOS stripped); greedy when ``beam_size == 1``."""
    cfg = model.config
    memory_kv = model.memory_kv(model.encode(src, src_keep))
    make_step = model_step if use_cache else recompute_step
    if beam_size == 1:
        return greedy_search(make_step(model, memory_kv, src_keep), None, src.shape[0], cfg.bos_id,
                             cfg.eos_id, max_new_tokens, cfg.pad_id, rules)
    expand = torch.arange(src.shape[0]).repeat_interleave(beam_size)
    step = make_step(model, select_rows(memory_kv, expand), src_keep.index_select(0, expand))
    best = beam_search(step, None, src.shape[0], beam_size, cfg.bos_id, cfg.eos_id, max_new_tokens,
                       length_penalty, rules)
    return [strip_special(h.tokens, cfg.eos_id) for h in best]
