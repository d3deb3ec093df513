"""Greedy and beam search over numpy: what serving runs, with no training framework behind it.

Both searches drive a *step function* — last tokens ``[N]`` and a state in,
next-token log-probabilities ``[N, V]`` and a new state out — so the same
code decodes an ONNX Runtime session, a TensorRT engine or a scripted scorer
in a test. The state is a list of arrays whose first axis is the row; beam
search reorders it when beams swap.

The offline PyTorch search (``transerve.models.decoding``) implements the
same rules on tensors; tests hold the two equal token for token. The rules:
a hypothesis scores ``log p / length ** length_penalty`` (length in
generated tokens, EOS included); a source stops once ``beam_size``
hypotheses have finished (early stopping), so ``beam_size=1`` is exactly
greedy search; out of budget, the unfinished beams compete as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

State = list[np.ndarray] | None
StepFn = Callable[[np.ndarray, State], tuple[np.ndarray, State]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise ``log softmax`` in float32 (the formula torch uses: x − max − log Σ exp(x − max))."""
    x = np.asarray(logits, np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def strip_special(ids: list[int], eos_id: int) -> list[int]:
    """Tokens up to (not including) the first EOS."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


@dataclass(order=True)
class Hypothesis:
    """A finished beam: ``score`` is the length-normalised log-probability."""

    score: float
    tokens: list[int] = field(compare=False)
    log_prob: float = field(compare=False)


def _top(cand: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest values, best first; equal values in index order (as torch's topk)."""
    count = min(count, cand.size)
    part = np.argpartition(-cand, count - 1)[:count] if count < cand.size else np.arange(cand.size)
    return part[np.lexsort((part, -cand[part]))]


class SourceBeams:
    """One source's beam search, advanced a step at a time (the scheduler advances one per request)."""

    def __init__(self, beam_size: int, bos_id: int, eos_id: int, max_new_tokens: int,
                 length_penalty: float = 1.0) -> None:
        self.k, self.bos_id, self.eos_id = beam_size, bos_id, eos_id
        self.max_new_tokens, self.length_penalty = max_new_tokens, length_penalty
        self.scores = np.full(beam_size, -np.inf, np.float32)
        self.scores[0] = 0.0  # all beams start identical: expand only the first
        self.prefixes: list[list[int]] = [[] for _ in range(beam_size)]
        self.finished: list[Hypothesis] = []
        self.steps = 0
        self.done = False

    def last_tokens(self) -> list[int]:
        return [p[-1] if p else self.bos_id for p in self.prefixes]

    def advance(self, log_probs: np.ndarray) -> list[int]:
        """``log_probs [k, V]`` of this source's beams → for each new beam, the beam it extends."""
        k, vocab = self.k, log_probs.shape[-1]
        self.steps += 1
        cand = (self.scores[:, None] + log_probs.astype(np.float32, copy=False)).reshape(k * vocab)
        top_ids = _top(cand, 2 * k)  # 2k: enough that k survive even if k end
        rows, tokens, scores = [0] * k, [self.eos_id] * k, np.full(k, -np.inf, np.float32)
        alive = 0
        for rank, flat in enumerate(top_ids.tolist()):
            if alive == k or len(self.finished) >= k:
                break
            row, tok, score = flat // vocab, flat % vocab, float(cand[flat])
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


def greedy_search(step: StepFn, state: State, batch_size: int, bos_id: int, eos_id: int, max_new_tokens: int,
                  pad_id: int = 0) -> list[list[int]]:
    """Pick the most likely token at every step; finished rows are fed ``pad_id``."""
    last = np.full(batch_size, bos_id, np.int64)
    finished = np.zeros(batch_size, bool)
    out: list[np.ndarray] = []
    for _ in range(max_new_tokens):
        scores, state = step(last, state)
        last = np.where(finished, pad_id, scores.argmax(axis=-1)).astype(np.int64)
        out.append(last)
        finished |= last == eos_id
        if finished.all():
            break
    ids = np.stack(out, axis=1).tolist() if out else [[] for _ in range(batch_size)]
    return [strip_special(row, eos_id) for row in ids]


def beam_search(step: StepFn, state: State, batch_size: int, beam_size: int, bos_id: int, eos_id: int,
                max_new_tokens: int, length_penalty: float = 1.0) -> list[Hypothesis]:
    """Keep the ``beam_size`` best prefixes per source; the best finished one each. ``step`` must return
    log-probabilities, and ``state`` hold ``batch_size * beam_size`` rows (source-major)."""
    k = beam_size
    sources = [SourceBeams(k, bos_id, eos_id, max_new_tokens, length_penalty) for _ in range(batch_size)]
    last = np.full(batch_size * k, bos_id, np.int64)
    for _ in range(max_new_tokens):
        log_probs, state = step(last, state)
        rows = np.arange(batch_size * k)  # a finished source's rows stay as they are (never read again)
        last = last.copy()
        for b, beams in enumerate(sources):
            if not beams.done:
                rows[b * k:(b + 1) * k] = np.asarray(beams.advance(log_probs[b * k:(b + 1) * k])) + b * k
                last[b * k:(b + 1) * k] = beams.last_tokens()
        if all(beams.done for beams in sources):
            break
        state = None if state is None else [s[rows] for s in state]
    return [beams.best() for beams in sources]


__all__ = ["Hypothesis", "SourceBeams", "StepFn", "beam_search", "greedy_search", "log_softmax", "strip_special"]
