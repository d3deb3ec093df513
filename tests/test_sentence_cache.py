"""The sentence cache: least recently used out first, bounded in bytes, each event counted."""

from __future__ import annotations

from collections import Counter

from transerve.server.engine.sentence_cache import CachedSentence, CacheKey, SentenceCache, _size


def key(sentence: str, budget: int = 10) -> CacheKey:
    return CacheKey(sentence, budget, 1, 1.0)


def test_least_recently_used_goes_first_and_bytes_stay_within_the_bound() -> None:
    events: Counter[str] = Counter()
    value = CachedSentence((1, 2, 3), "drei")
    one = _size(key("a"), value)
    cache = SentenceCache(3 * one, on_event=lambda kind, count: events.update({kind: count}))
    for s in "abc":
        cache.put(key(s), value)
    assert cache.get(key("a")) == value  # a is now the most recent
    cache.put(key("d"), value)  # evicts b, the least recent
    assert cache.get(key("b")) is None and cache.get(key("c")) == value and cache.get(key("d")) == value
    assert cache.bytes == 3 * one <= cache.max_bytes and len(cache) == 3
    assert events == {"hit": 3, "miss": 1, "eviction": 1}


def test_the_key_holds_what_changes_a_translation() -> None:
    cache = SentenceCache(10_000)
    cache.put(key("seven", budget=10), CachedSentence((5,), "sieben"))
    assert cache.get(key("seven", budget=11)) is None
    assert cache.get(CacheKey("seven", 10, 4, 1.0)) is None and cache.get(CacheKey("seven", 10, 1, 0.5)) is None
    assert cache.get(key("seven", budget=10)) == CachedSentence((5,), "sieben")


def test_an_entry_larger_than_the_cache_is_not_kept_and_zero_turns_it_off() -> None:
    cache = SentenceCache(100)
    cache.put(key("x" * 500), CachedSentence((1,), "y"))
    assert len(cache) == 0 and cache.bytes == 0
    assert not SentenceCache(0).enabled and SentenceCache(1).enabled
