"""English → German number words, generated with num2words (it ships both languages).

Forms: cardinals 0–999 999 ("three hundred and forty-two" →
"dreihundertzweiundvierzig"), ordinals ("forty-second" → "zweiundvierzigste")
and years 1100–2099 ("nineteen eighty-four" → "neunzehnhundertvierundachtzig").

The split is by *number*: a number is held out when a hash of it falls in the
test bucket, so no form of a test number is ever seen in training and the
model has to compose it from parts.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from num2words import num2words


@dataclass
class NumbersDataConfig:
    cardinals: int = 24_000  # sampled with a uniform number of digits (1–6), so small numbers are well covered
    ordinals: int = 8_000
    test_cardinals: int = 500
    test_ordinals: int = 250
    test_years: int = 50
    held_out_per_mille: int = 50  # 5 % of all numbers are test-only
    seed: int = 0


Pair = tuple[str, str]


def is_held_out(n: int, per_mille: int) -> bool:
    """Stable across Python runs (unlike ``hash``), so the split is fixed."""
    digest = hashlib.blake2b(str(n).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % 1000 < per_mille


def to_pair(n: int, form: str) -> Pair:
    """``form``: "cardinal", "ordinal" or "year"."""
    return num2words(n, lang="en", to=form), num2words(n, lang="de", to=form)


def _sample_numbers(rng: random.Random, count: int) -> list[int]:
    out = []
    for _ in range(count):
        digits = rng.randint(1, 6)
        out.append(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1))
    return out


def _unique(pairs: list[Pair]) -> list[Pair]:
    """Drop repeated sources; keep the first target (all forms of one source agree in num2words)."""
    seen: dict[str, str] = {}
    for src, tgt in pairs:
        seen.setdefault(src, tgt)
    return list(seen.items())


def make_split(cfg: NumbersDataConfig) -> tuple[list[Pair], list[Pair]]:
    """(train pairs, test pairs); deterministic for a given config."""
    rng = random.Random(cfg.seed)

    def held(n: int) -> bool:
        return is_held_out(n, cfg.held_out_per_mille)

    train_nums = [n for n in range(1100) if not held(n)] + _sample_numbers(rng, cfg.cardinals)
    train = [to_pair(n, "cardinal") for n in train_nums if not held(n)]
    ordinal_nums = list(range(200)) + _sample_numbers(rng, cfg.ordinals)
    train += [to_pair(n, "ordinal") for n in ordinal_nums if not held(n)]
    train += [to_pair(n, "year") for n in range(1100, 2100) if not held(n)]

    test_pool = list(dict.fromkeys(n for n in _sample_numbers(rng, 40 * (cfg.test_cardinals + cfg.test_ordinals))
                                   if held(n)))
    test = [to_pair(n, "cardinal") for n in test_pool[: cfg.test_cardinals]]
    test += [to_pair(n, "ordinal") for n in test_pool[cfg.test_cardinals: cfg.test_cardinals + cfg.test_ordinals]]
    years = [n for n in range(1100, 2100) if held(n)]
    test += [to_pair(n, "year") for n in rng.sample(years, min(cfg.test_years, len(years)))]
    train, test = _unique(train), _unique(test)
    test_sources = {s for s, _ in test}
    return [p for p in train if p[0] not in test_sources], test
