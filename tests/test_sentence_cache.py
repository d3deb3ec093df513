"""The sentence cache: least recently used out first, bounded in bytes, each event counted."""

from __future__ import annotations

import asyncio
from collections import Counter

from transerve.server.engine.sentence_cache import CachedSentence, CacheKey, SentenceCache, SharedSentences, _size


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


def test_a_sentence_under_way_is_awaited_not_decoded_again() -> None:
    """Two requests at once with a shared sentence, and a repeat within one: each distinct sentence is decoded
    once; the decode that fails (its request cancelled) leaves its waiters to decode it themselves."""
    decoded: list[str] = []
    events: Counter[str] = Counter()
    shared = SharedSentences(SentenceCache(1 << 20, on_event=lambda kind, count: events.update({kind: count})))

    def decoder(keys: list[CacheKey], fail: bool = False):  # type: ignore[no-untyped-def]
        async def decode(indices: list[int]) -> list[CachedSentence]:
            await asyncio.sleep(0.01)
            if fail:
                raise asyncio.CancelledError
            decoded.extend(keys[i].sentence for i in indices)
            return [CachedSentence((i,), keys[i].sentence.upper()) for i in indices]
        return decode

    async def main() -> tuple[list[CachedSentence], list[CachedSentence]]:
        first, second = [key("a"), key("b"), key("a")], [key("b"), key("c")]
        return await asyncio.gather(shared.translate(first, decoder(first)), shared.translate(second, decoder(second)))

    one, two = asyncio.run(main())
    assert [v.text for v in one] == ["A", "B", "A"] and [v.text for v in two] == ["B", "C"]
    assert sorted(decoded) == ["a", "b", "c"] and events == {"miss": 3, "hit": 2}

    async def cancelled_then_waiter() -> list[CachedSentence]:
        keys = [key("d")]
        failing = asyncio.ensure_future(shared.translate(keys, decoder(keys, fail=True)))
        await asyncio.sleep(0)  # the failing request starts decoding d first
        waiter = shared.translate(keys, decoder(keys))
        results = await asyncio.gather(failing, waiter, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        return results[1]  # type: ignore[return-value]

    assert [v.text for v in asyncio.run(cancelled_then_waiter())] == ["D"] and decoded.count("d") == 1
