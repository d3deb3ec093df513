"""Translated sentences remembered, so a document that repeats its boilerplate decodes it once.

An LRU bounded in bytes (``translation_cache_mb`` in the model's ``config.yaml``; 0 turns it off). The key
holds everything that changes a sentence's translation — the decoding options and the sentence's budget —
and the cache belongs to one loaded model version, so a reload or a new version starts empty. It lives on the
event loop (no lock): looked up before a sentence joins the batch, filled when it is decoded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

ENTRY_OVERHEAD = 200  # bytes of Python objects around an entry's strings and ids, roughly


@dataclass(frozen=True)
class CacheKey:
    sentence: str
    budget: int
    beam_size: int
    length_penalty: float


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

    def get(self, key: CacheKey) -> CachedSentence | None:
        found = self._entries.get(key)
        if found is None:
            self.on_event("miss", 1)
            return None
        self._entries.move_to_end(key)
        self.on_event("hit", 1)
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
    return ENTRY_OVERHEAD + len(key.sentence.encode()) + len(value.text.encode()) + 8 * len(value.ids)
