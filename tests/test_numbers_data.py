"""The number-words split holds out whole numbers and is fixed."""

from __future__ import annotations

from transerve.models.zoo.numbers import train_tokenizer
from transerve.models.zoo.numbers_data import NumbersDataConfig, is_held_out, make_split, to_pair

SMALL = NumbersDataConfig(cardinals=2000, ordinals=500, test_cardinals=60, test_ordinals=30, test_years=10)


def test_known_pairs() -> None:
    assert to_pair(342, "cardinal") == ("three hundred and forty-two", "dreihundertzweiundvierzig")
    assert to_pair(42, "ordinal") == ("forty-second", "zweiundvierzigste")
    assert to_pair(1984, "year") == ("nineteen eighty-four", "neunzehnhundertvierundachtzig")


def test_split_is_deterministic_and_disjoint() -> None:
    train, test = make_split(SMALL)
    assert (train, test) == make_split(SMALL)
    assert not {s for s, _ in train} & {s for s, _ in test}
    assert len(test) >= 90


def test_test_numbers_never_appear_in_training() -> None:
    held = [n for n in range(5000) if is_held_out(n, 50)]
    assert 150 < len(held) < 350  # about 5 %
    train, _ = make_split(SMALL)
    train_sources = {s for s, _ in train}
    for n in held:
        for form in ("cardinal", "ordinal"):
            assert to_pair(n, form)[0] not in train_sources


def test_tokenizer_round_trips_both_languages() -> None:
    train, test = make_split(SMALL)
    tok = train_tokenizer([t for p in train for t in p], 100)
    for src, tgt in test:
        for text in (src, tgt):
            assert tok.decode(tok.encode(text).ids) == text
    pieces = tok.encode("dreihundertzweiundvierzig").tokens
    assert len(pieces) >= 4  # morphemes, not one opaque compound
