"""Greedy and beam search over numpy: what serving runs, with no training framework behind it.

Both searches drive a *step function* — last tokens ``[N]`` and a state in,
next-token log-probabilities ``[N, V]`` and a new state out — so the same
code decodes an ONNX Runtime session, a TensorRT engine or a scripted scorer
in a test. The state is a list of arrays whose first axis is the row; beam
search reorders it when beams swap.

The offline PyTorch search (``transerve.models.decoding``) implements the
same rules on tensors; tests hold the two equal token for token. The rules:
a hypothesis scores ``log p / length ** length_penalty`` (length in
generated tokens, EOS included); at the budget's last step the top beams
finish as they are; a source stops when its :class:`GenerationRules` say
(by default once ``beam_size`` hypotheses have finished, so ``beam_size=1``
is exactly greedy search). A model's rules (bad words, forced EOS, Hugging
Face's early-stopping heuristic) are :mod:`transerve.generation`'s; with an
imported checkpoint's rules both searches decode as ``generate()`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from transerve.generation import GenerationRules

State = list[np.ndarray] | None
DEFAULT_RULES = GenerationRules()
Budgets = int | Sequence[int]  # one budget for every source, or one each
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
    """One source's beam search, advanced a step at a time (the scheduler advances one per request).

    Each step ranks the top ``2k`` continuations of the ``k`` beams by summed log-probability; those among the top
    ``k`` that end (EOS, or the budget's last step) join the finished hypotheses (the best ``k`` are kept), the best
    ``k`` that go on become the beams. When the source is done is ``rules.early_stopping``'s choice."""

    def __init__(self, beam_size: int, bos_id: int, eos_id: int, max_new_tokens: int,
                 length_penalty: float = 1.0, rules: GenerationRules = DEFAULT_RULES) -> None:
        self.k, self.bos_id, self.eos_id = beam_size, bos_id, eos_id
        self.max_new_tokens, self.length_penalty, self.rules = max_new_tokens, length_penalty, rules
        self.scores = np.full(beam_size, -np.inf, np.float32)
        self.scores[0] = 0.0  # all beams start identical: expand only the first
        self.prefixes: list[list[int]] = [[] for _ in range(beam_size)]
        self.finished: list[Hypothesis] = []  # the best k, best first
        self.steps = 0
        self.done = False

    def last_tokens(self) -> list[int]:
        return [p[-1] if p else self.bos_id for p in self.prefixes]

    def advance(self, log_probs: np.ndarray) -> list[int]:
        """``log_probs [k, V]`` of this source's beams → for each new beam, the beam it extends."""
        k, vocab = self.k, log_probs.shape[-1]
        self.steps += 1
        last = self.steps >= self.max_new_tokens
        cand = (self.scores[:, None] + self._processed(log_probs, last)).reshape(k * vocab)
        rows, tokens, scores = [0] * k, [self.eos_id] * k, np.full(k, -np.inf, np.float32)
        alive = 0
        for rank, flat in enumerate(_top(cand, 2 * k).tolist()):  # 2k: k go on even if k of them end
            row, tok, score = flat // vocab, flat % vocab, cand[flat]
            if tok == self.eos_id or last:
                if rank < k:  # only the top k may finish (the rest are there to keep k beams going)
                    self._add([*self.prefixes[row], tok], score)
            elif alive < k:
                rows[alive], tokens[alive], scores[alive] = row, tok, score
                alive += 1
        self.prefixes = [[*self.prefixes[r], t] for r, t in zip(rows, tokens, strict=True)]
        self.scores = scores
        self.done = last or self._cannot_improve()
        return rows

    def _processed(self, log_probs: np.ndarray, last: bool) -> np.ndarray:
        rules, lp = self.rules, log_probs.astype(np.float32, copy=False)
        histories = [[self.bos_id, *p] for p in self.prefixes] if rules.needs_history else None
        forced = np.full(self.k, last) if rules.forced_eos else None
        lp = rules.mask(lp, histories, forced, self.eos_id)
        return log_softmax(lp) if rules.renormalize else lp

    def _cannot_improve(self) -> bool:
        """Whether no running beam can enter the finished ``k`` any more (Hugging Face's early-stop rule)."""
        if len(self.finished) < self.k:
            return False
        if self.rules.early_stopping is True:
            return True
        length = self.steps
        if self.rules.early_stopping == "never" and self.length_penalty > 0:
            length = self.max_new_tokens
        best_running = self.scores[0] / np.float32(length ** self.length_penalty)
        return bool(best_running <= self.finished[-1].score)

    def best(self) -> Hypothesis:
        return self.finished[0]

    def _add(self, tokens: list[int], log_prob: np.float32) -> None:
        if log_prob != -np.inf:
            normalised = float(log_prob / np.float32(len(tokens) ** self.length_penalty))
            self.finished.append(Hypothesis(normalised, tokens, float(log_prob)))
            self.finished.sort(reverse=True)  # stable: an equal later one ranks below
            del self.finished[self.k:]


def greedy_search(step: StepFn, state: State, batch_size: int, bos_id: int, eos_id: int, max_new_tokens: Budgets,
                  pad_id: int = 0, rules: GenerationRules = DEFAULT_RULES) -> list[list[int]]:
    """Pick the most likely token the rules allow at every step; finished rows are fed ``pad_id``."""
    budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (batch_size,))
    last = np.full(batch_size, bos_id, np.int64)
    finished = np.zeros(batch_size, bool)
    out: list[np.ndarray] = []
    for made in range(int(budgets.max(initial=0))):
        scores, state = step(last, state)
        histories = None
        if rules.needs_history:
            histories = [[bos_id, *row] for row in (np.stack(out, axis=1).tolist() if out else [[]] * batch_size)]
        picked = rules.greedy_pick(scores, histories, np.asarray(made + 1 == budgets), eos_id)
        last = np.where(finished, pad_id, picked).astype(np.int64)
        out.append(last)
        finished |= (last == eos_id) | (made + 1 >= budgets)
        if finished.all():
            break
    ids = np.stack(out, axis=1).tolist() if out else [[] for _ in range(batch_size)]
    return [strip_special(row, eos_id)[:budget] for row, budget in zip(ids, budgets.tolist(), strict=True)]


def beam_search(step: StepFn, state: State, batch_size: int, beam_size: int, bos_id: int, eos_id: int,
                max_new_tokens: Budgets, length_penalty: float = 1.0, rules: GenerationRules = DEFAULT_RULES,
                beams: Sequence[SourceBeams] | None = None) -> list[Hypothesis]:
    """Keep the ``beam_size`` best prefixes per source; the best finished one each. ``step`` must return
    log-probabilities, and ``state`` hold ``batch_size * beam_size`` rows (source-major). ``beams``: each
    source's search, made by the caller (a constrained one, :mod:`transerve.constrained`); by default
    :class:`SourceBeams` from the other arguments."""
    k = beam_size
    budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (batch_size,)).tolist()
    sources = list(beams) if beams is not None else [SourceBeams(k, bos_id, eos_id, budget, length_penalty, rules)
                                                     for budget in budgets]
    last = np.full(batch_size * k, bos_id, np.int64)
    for _ in range(max(budgets, default=0)):
        log_probs, state = step(last, state)
        rows = np.arange(batch_size * k)  # a finished source's rows stay as they are (never read again)
        last = last.copy()
        for b, source in enumerate(sources):
            if not source.done:
                rows[b * k:(b + 1) * k] = np.asarray(source.advance(log_probs[b * k:(b + 1) * k])) + b * k
                last[b * k:(b + 1) * k] = source.last_tokens()
        if all(source.done for source in sources):
            break
        state = None if state is None else [s[rows] for s in state]
    return [source.best() for source in sources]


__all__ = ["DEFAULT_RULES", "Budgets", "GenerationRules", "Hypothesis", "SourceBeams", "StepFn", "beam_search",
           "greedy_search", "log_softmax", "strip_special"]
