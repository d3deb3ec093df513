"""Translated sentences remembered, so a document that repeats its boilerplate decodes it once.

An LRU bounded in bytes (``translation_cache_mb`` in the model's ``config.yaml``; 0 turns it off). The key
holds everything that changes a sentence's translation — the decoding options, the sentence's budget and the
glossary terms it must contain —
and the cache belongs to one loaded model version, so a reload or a new version starts empty. It lives on the
event loop (no lock): looked up before a sentence joins the batch, filled when it is decoded.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

ENTRY_OVERHEAD = 200  # bytes of Python objects around an entry's strings and ids, roughly


@dataclass(frozen=True)
class CacheKey:
    sentence: str
    budget: int
    beam_size: int
    length_penalty: float
    terms: tuple[tuple[int, ...], ...] = ()  # the glossary targets the sentence must contain (token ids)


@dataclass(frozen=True)
class CachedSentence:
    ids: tuple[int, ...]
    text: str


class SentenceCache:
    def __init__(self, max_bytes: int, on_event: Callable[[str, int], None] | None = None) -> None:
        """``on_event(kind, count)``, kind ``hit``, ``miss`` or ``eviction``: for the metrics."""
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: OrderedDict[CacheKey, CachedSentence] = OrderedDict()
        self.on_event = on_event or (lambda kind, count: None)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey, count: bool = True) -> CachedSentence | None:
        """The entry, made the most recent; ``count``: a hit or a miss for the metrics (the translator counts
        itself when a miss may still be served by a decode already under way)."""
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        if count:
            self.on_event("miss" if found is None else "hit", 1)
        return found

    def put(self, key: CacheKey, value: CachedSentence) -> None:
        size = _size(key, value)
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = value
        self.bytes += size
        evicted = 0
        while self.bytes > self.max_bytes:
            old_key, old_value = self._entries.popitem(last=False)
            self.bytes -= _size(old_key, old_value)
            evicted += 1
        if evicted:
            self.on_event("eviction", evicted)


def _size(key: CacheKey, value: CachedSentence) -> int:
    terms = sum(len(t) for t in key.terms)
    return ENTRY_OVERHEAD + len(key.sentence.encode()) + len(value.text.encode()) + 8 * (len(value.ids) + terms)


Decode = Callable[[list[int]], Awaitable[list[CachedSentence]]]


class SharedSentences:
    """The cache, plus the decodes under way: a sentence that another request (or an earlier place in this one)
    is already decoding is awaited, not decoded again. Counted as a hit; a miss is a sentence decoded here."""

    def __init__(self, cache: SentenceCache) -> None:
        self.cache = cache
        self._under_way: dict[CacheKey, asyncio.Future[CachedSentence | None]] = {}

    async def translate(self, keys: list[CacheKey], decode: Decode) -> list[CachedSentence]:
        """Each key's translation; ``decode(indices)`` decodes the sentences at those indices of ``keys``."""
        found: dict[CacheKey, CachedSentence] = {}
        waits: dict[CacheKey, asyncio.Future[CachedSentence | None]] = {}
        mine: dict[CacheKey, int] = {}
        for i, key in enumerate(keys):
            if key in found or key in waits or key in mine:
                continue
            hit = self.cache.get(key, count=False)
            if hit is not None:
                found[key] = hit
            elif key in self._under_way:
                waits[key] = self._under_way[key]
            else:
                mine[key] = i
        self.cache.on_event("hit", len(keys) - len(mine))
        self.cache.on_event("miss", len(mine))
        found |= await self._decode_mine(mine, decode)
        retry: dict[CacheKey, int] = {}
        for key, future in waits.items():
            value = await asyncio.shield(future)
            if value is None:  # that decode failed or was cancelled with its request: do it here
                retry[key] = keys.index(key)
            else:
                found[key] = value
        if retry:
            found |= await self._decode_mine(retry, decode)
        return [found[key] for key in keys]

    async def _decode_mine(self, mine: dict[CacheKey, int], decode: Decode) -> dict[CacheKey, CachedSentence]:
        if not mine:
            return {}
        loop = asyncio.get_running_loop()
        futures = {key: loop.create_future() for key in mine}
        self._under_way.update(futures)
        decoded: dict[CacheKey, CachedSentence] = {}
        try:
            decoded = dict(zip(mine, await decode(list(mine.values())), strict=True))
            for key, value in decoded.items():
                self.cache.put(key, value)
            return decoded
        finally:
            for key, future in futures.items():
                if self._under_way.get(key) is future:
                    del self._under_way[key]
                if not future.done():
                    future.set_result(decoded.get(key))  # None: the waiters decode it themselves
