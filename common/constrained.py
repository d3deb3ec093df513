"""Lexically constrained beam search: every glossary term that applies to a sentence appears in its translation.

Dynamic beam allocation, after Post & Vilar (2018), "Fast lexically constrained decoding with dynamic beam
allocation": a hypothesis's *bank* is how many constraint tokens it has written; each step the candidates are
the beam's usual best continuations, each hypothesis's single best token, and every token that would advance
one of its unmet constraints; the ``k`` places are shared out equally among the banks that have candidates,
highest bank first (with fewer places than banks, the ones nearest to meeting every term), so hypotheses that
have written more of the terms survive beside the ones the model likes best. The search is done once ``k``
hypotheses that met every constraint have ended; one that ends (EOS, or the budget's last step) before
meeting them all is kept too, but ranks below any that met them — the answer when the terms cannot be
written within the budget.

Each hypothesis tracks its constraints as a small state: the set met in full, and the one it is part-way
through (Hu et al. 2019 keep the same in a trie to vectorise it on a GPU; a few terms per sentence on a CPU
need no trie). A part-written term that is not continued is abandoned — its tokens stop counting — and may be
started again later. A term the model writes of its own accord counts the same as a forced one.

The interface is :class:`transerve.search.SourceBeams`' (``advance``, ``last_tokens``, ``done``, ``best``), so
the continuous scheduler and the static search run it unchanged. Length normalisation and the model's
generation rules are as there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transerve.generation import GenerationRules
from transerve.search import DEFAULT_RULES, Hypothesis, SourceBeams

Constraint = tuple[int, ...]  # a term's token ids, as the tokenizer writes it mid-sentence


@dataclass(frozen=True)
class ConstraintState:
    met: frozenset[int] = frozenset()  # constraints written out in full
    progress: tuple[int, int] | None = None  # (constraint, tokens of it written so far) while one is under way


START = ConstraintState()


class Constraints:
    """The terms one sentence must contain, and the state machine a hypothesis walks through them."""

    def __init__(self, terms: Sequence[Constraint]) -> None:
        self.terms = tuple(dict.fromkeys(tuple(t) for t in terms if t))  # each once, in order
        self.total = sum(len(t) for t in self.terms)

    def __bool__(self) -> bool:
        return bool(self.terms)

    def advance(self, state: ConstraintState, token: int) -> ConstraintState:
        if state.progress is not None:
            c, written = state.progress
            if self.terms[c][written] == token:
                return self._written(state.met, c, written + 1)
            state = ConstraintState(state.met)  # abandoned: the token may start a term afresh
        for c, term in enumerate(self.terms):
            if c not in state.met and term[0] == token:
                return self._written(state.met, c, 1)
        return state

    def _written(self, met: frozenset[int], c: int, written: int) -> ConstraintState:
        if written == len(self.terms[c]):
            return ConstraintState(met | {c})
        return ConstraintState(met, (c, written))

    def bank(self, state: ConstraintState) -> int:
        """Constraint tokens written: whole terms met and the part-written one."""
        return sum(len(self.terms[c]) for c in state.met) + (state.progress[1] if state.progress else 0)

    def complete(self, state: ConstraintState) -> bool:
        return len(state.met) == len(self.terms)

    def wanted(self, state: ConstraintState) -> set[int]:
        """The tokens that would advance a constraint from ``state``."""
        tokens = {t[0] for c, t in enumerate(self.terms) if c not in state.met}
        if state.progress is not None:
            c, written = state.progress
            tokens.add(self.terms[c][written])
        return tokens


@dataclass(frozen=True)
class _Candidate:
    score: float
    row: int
    token: int
    state: ConstraintState
    bank: int


class ConstrainedBeams(SourceBeams):
    """One source's constrained beam search (see the module's docstring)."""

    def __init__(self, beam_size: int, bos_id: int, eos_id: int, max_new_tokens: int, constraints: Constraints,
                 length_penalty: float = 1.0, rules: GenerationRules = DEFAULT_RULES) -> None:
        super().__init__(beam_size, bos_id, eos_id, max_new_tokens, length_penalty, rules)
        self.constraints = constraints
        self.states = [START] * beam_size
        self.ranked: list[tuple[bool, Hypothesis]] = []  # finished: (met every constraint, hypothesis), best first

    def advance(self, log_probs: np.ndarray) -> list[int]:
        self.steps += 1
        last = self.steps >= self.max_new_tokens
        cand = self.scores[:, None] + self._processed(log_probs, last)
        ending, going = self._candidates(cand, last)
        for c in self._allocate(sorted(ending + going, key=_order)):  # the ones that end and win a place finish
            if c.token == self.eos_id or last:
                self._finish(c)
        kept = self._allocate(going)  # k go on even if some ended (as SourceBeams' 2k)
        kept.sort(key=lambda c: (-c.bank, -c.score))
        rows, tokens = [c.row for c in kept], [c.token for c in kept]
        self.prefixes = [[*self.prefixes[r], t] for r, t in zip(rows, tokens, strict=True)]
        self.states = [c.state for c in kept]
        self.scores = np.array([c.score for c in kept], np.float32)
        padding = self.k - len(kept)  # fewer candidates than places: dead rows that are never read
        if padding:
            rows += [0] * padding
            self.prefixes += [[self.eos_id]] * padding
            self.states += [START] * padding
            self.scores = np.concatenate([self.scores, np.full(padding, -np.inf, np.float32)])
        self.done = last or not kept or sum(met for met, _ in self.ranked) >= self.k
        return rows

    def _candidates(self, cand: np.ndarray, last: bool) -> tuple[list[_Candidate], list[_Candidate]]:
        """The beam's best ``2k`` continuations, each row's best and each row's constraint-advancing tokens:
        those that end (EOS — a hypothesis that has not met every term ends too, ranked below any that has, so
        a sentence whose terms cannot be written still gets the model's own ending — or the last step) and those
        that go on (best first)."""
        vocab = cand.shape[1]
        pairs = {(int(f) // vocab, int(f) % vocab) for f in self._top(cand.reshape(-1), 2 * self.k)}
        for row in range(self.k):
            if self.scores[row] > -np.inf:
                pairs.add((row, int(cand[row].argmax())))
                pairs.update((row, t) for t in self.constraints.wanted(self.states[row]))
        ending: list[_Candidate] = []
        going: list[_Candidate] = []
        for row, token in pairs:
            score = float(cand[row, token])
            if score == -np.inf:
                continue
            state = self.constraints.advance(self.states[row], token)
            c = _Candidate(score, row, token, state, self.constraints.bank(state))
            (ending if token == self.eos_id or last else going).append(c)
        return ending, sorted(going, key=_order)

    @staticmethod
    def _top(values: np.ndarray, count: int) -> np.ndarray:
        count = min(count, values.size)
        return np.argpartition(-values, count - 1)[:count]

    def _allocate(self, candidates: list[_Candidate]) -> list[_Candidate]:
        """``k`` places shared equally among the banks that have candidates: round by round, each bank, highest
        first, takes its best remaining candidate — so a bank that cannot fill its share leaves the places to
        the others, and with fewer places than banks the ones nearest to meeting every term go first.
        ``candidates`` is best first."""
        banks: dict[int, list[_Candidate]] = {}
        for c in candidates:
            banks.setdefault(c.bank, []).append(c)
        queues = [banks[b][::-1] for b in sorted(banks, reverse=True)]  # popped from the end: best first
        kept: list[_Candidate] = []
        while len(kept) < self.k and queues:
            for queue in queues:
                if len(kept) < self.k:
                    kept.append(queue.pop())
            queues = [q for q in queues if q]
        return kept

    def _finish(self, c: _Candidate) -> None:
        tokens = [*self.prefixes[c.row], c.token]
        normalised = float(np.float32(c.score) / np.float32(len(tokens) ** self.length_penalty))
        self.ranked.append((self.constraints.complete(c.state), Hypothesis(normalised, tokens, c.score)))
        self.ranked.sort(key=lambda entry: (not entry[0], -entry[1].score))
        del self.ranked[self.k:]

    def best(self) -> Hypothesis:
        return self.ranked[0][1]

    def met_all(self) -> bool:
        """Whether the best hypothesis wrote every constraint (False only when the budget ran out first)."""
        return bool(self.ranked and self.ranked[0][0])


def _order(c: _Candidate) -> tuple[float, int, int]:
    return -c.score, c.row, c.token


def new_beams(beam_size: int, bos_id: int, eos_id: int, max_new_tokens: int, length_penalty: float = 1.0,
              rules: GenerationRules = DEFAULT_RULES, constraints: Constraints | None = None) -> SourceBeams:
    """A source's beam search: constrained when it has constraints."""
    if constraints:
        return ConstrainedBeams(beam_size, bos_id, eos_id, max_new_tokens, constraints, length_penalty, rules)
    return SourceBeams(beam_size, bos_id, eos_id, max_new_tokens, length_penalty, rules)


__all__ = ["ConstrainedBeams", "Constraint", "ConstraintState", "Constraints", "new_beams"]
