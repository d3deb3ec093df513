"""Lexically constrained beam search (dynamic beam allocation) against an exhaustive search over a scripted
model, its constraint bookkeeping, and that a small beam still writes every term."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from transerve.constrained import ConstrainedBeams, Constraints, ConstraintState, new_beams
from transerve.search import SourceBeams, beam_search, log_softmax

BOS, EOS = 0, 1
WORDS = (2, 3, 4, 5)  # the scripted model's vocabulary beside BOS and EOS
VOCAB = 6


def markov_model(seed: int) -> np.ndarray:
    """log p(next | last) ``[VOCAB, VOCAB]``: a stand-in decoder whose step depends on the last token only
    (BOS never comes out)."""
    logits = np.random.default_rng(seed).normal(0, 2, (VOCAB, VOCAB)).astype(np.float32)
    logits[:, BOS] = -np.inf
    return log_softmax(logits)


def run(table: np.ndarray, beams: list[SourceBeams], k: int, budget: int) -> list[list[int]]:
    def step(last: np.ndarray, state: object) -> tuple[np.ndarray, None]:
        return table[last], None

    best = beam_search(step, None, len(beams), k, BOS, EOS, budget, beams=beams)
    return [h.tokens for h in best]


def contains(tokens: list[int], term: tuple[int, ...]) -> bool:
    return any(tuple(tokens[i:i + len(term)]) == term for i in range(len(tokens) - len(term) + 1))


def exhaustive_best(table: np.ndarray, terms: list[tuple[int, ...]], budget: int) -> tuple[float, list[int]]:
    """The constrained optimum by enumeration: every sequence that ends in EOS (EOS nowhere else), or runs to the
    budget, holding every term; scored ``log p / length`` (length penalty 1, EOS counted) as the search does."""
    best: tuple[float, list[int]] = (-np.inf, [])
    for n in range(1, budget + 1):
        for body in itertools.product(WORDS, repeat=n - 1):
            for last in (EOS, *WORDS) if n == budget else (EOS,):
                tokens = [*body, last]
                if not all(contains(tokens, t) for t in terms):
                    continue
                history = [BOS, *tokens]
                score = sum(float(table[a, b]) for a, b in itertools.pairwise(history)) / n
                best = max(best, (score, tokens), key=lambda x: x[0])
    return best


def test_constraint_states_follow_the_terms() -> None:
    c = Constraints([(3, 4), (5,)])
    s = c.advance(ConstraintState(), 3)
    assert s.progress == (0, 1) and c.bank(s) == 1 and c.wanted(s) == {3, 4, 5}
    assert c.advance(s, 2) == ConstraintState()  # abandoned: its token stops counting
    assert c.advance(s, 3).progress == (0, 1)  # abandoned and started again
    s = c.advance(c.advance(s, 4), 5)
    assert s.met == frozenset({0, 1}) and c.complete(s) and c.bank(s) == 3
    assert Constraints([(3,), (3,), ()]).terms == ((3,),)  # each term once, empty ones dropped


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("terms", [[(3, 4)], [(5,), (2, 3)], [(4, 4)]])
def test_a_beam_wide_enough_finds_the_exhaustive_optimum(seed: int, terms: list[tuple[int, ...]]) -> None:
    """With room for every prefix in every bank, dynamic beam allocation is exact: the same best sequence and
    score as enumerating all of them."""
    table, budget, k = markov_model(seed), 5, 4096
    beams = ConstrainedBeams(k, BOS, EOS, budget, Constraints(terms))
    [tokens] = run(table, [beams], k, budget)
    score, expected = exhaustive_best(table, terms, budget)
    assert beams.met_all() and all(contains(tokens, t) for t in terms)
    assert beams.best().score == pytest.approx(score, abs=1e-5)  # the optimum (paths may tie: not the tokens)
    own = sum(float(table[a, b]) for a, b in itertools.pairwise([BOS, *tokens])) / len(tokens)
    assert own == pytest.approx(score, abs=1e-5), (tokens, expected)


@pytest.mark.parametrize("seed", range(40))
def test_a_small_beam_writes_every_term(seed: int) -> None:
    """Beam 4, one or two terms the model does not favour: every term is in the result, within the budget."""
    rng = np.random.default_rng(seed)
    table = markov_model(100 + seed)
    terms = [tuple(int(t) for t in rng.choice(WORDS, size=rng.integers(1, 3))) for _ in range(rng.integers(1, 3))]
    beams = ConstrainedBeams(4, BOS, EOS, 12, Constraints(terms))
    [tokens] = run(table, [beams], 4, 12)
    assert beams.met_all() and all(contains(tokens, t) for t in terms), (terms, tokens)


def test_sources_with_and_without_constraints_decode_together() -> None:
    """One batch: the unconstrained source decodes exactly as plain beam search, the constrained one holds its
    term."""
    table, k, budget = markov_model(7), 4, 8
    plain = run(table, [SourceBeams(k, BOS, EOS, budget)], k, budget)[0]
    mixed = run(table, [new_beams(k, BOS, EOS, budget), new_beams(k, BOS, EOS, budget,
                                                                  constraints=Constraints([(5, 5)]))], k, budget)
    assert mixed[0] == plain and contains(mixed[1], (5, 5))
    assert type(new_beams(k, BOS, EOS, budget, constraints=Constraints([]))) is SourceBeams
