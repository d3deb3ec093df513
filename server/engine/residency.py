"""Which models are resident, what each costs, and which to unload when a load would not fit the budget.

``serve --memory-budget`` bounds the process's memory: what it held before its first load (the runtime,
libraries, the RPC stack: the *baseline*) plus what the loaded models cost together. A model's cost is what
its load really
added to the process — resident memory measured before and after (weights, their runtime copies and
pre-packing, memory-mapped pages touched), not its file sizes — so the accounting holds for any runtime and
precision. Before an entry's first load its cost is estimated from its files (:func:`estimate_bytes`); after,
the measured figure counts. Loads happen one at a time, so each one's growth is its own.

When a load would exceed the budget, an *idle* lazy entry goes: one with a request in flight or waiting (a
*user*, counted from the moment a request picks the model until its answer is sent) is never a candidate, and
neither is an eager entry. When nothing can go, the load waits for a user to finish. Which idle entry goes is
the *eviction policy*:

- ``lru`` (the default): the least recently used.
- ``frequency``: the one asked for least often lately — requests counted with a 30 s half-life
  (:data:`HEAT_HALF_LIFE_S`), ties going least recently used first — meant to keep popular entries under
  skewed traffic. Measured against LRU on the routing benchmark's Zipf traffic (bench/RESULTS.md) it is no
  better: with 8 clients over 8 entries and room for 3, most requests for rare entries find the popular ones
  busy, so the choice between idle entries seldom matters; the cost of each load does.

What the models hold is the larger of their measured costs and what the process's RSS says beyond its baseline
(memory a model's runs grew, or an unloaded model's not yet returned): the budget bounds the real figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# an opus-mt-shaped fp32 entry measured 327 MB resident for 296 MB of weights (memory-mapped pages touched, plus
# ONNX Runtime's pre-packed MatMul weights and arenas): 1.1x; the estimate only decides a first load, the
# measured cost replaces it
WEIGHT_FACTOR = 1.25
HEAT_HALF_LIFE_S = 30.0  # how fast an entry's request count fades (frequency policy): shifted traffic wins in ~1 min

EvictionPolicy = Literal["frequency", "lru"]


SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*")
UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30,
         "ti": 2**40}


def parse_bytes(text: str) -> int:
    """``4GB`` → 4·10⁹ bytes, ``1.5GiB`` → 1.5·2³⁰, a bare number: bytes (``serve --memory-budget``, Ray's
    ``memory_budget``)."""
    match = SIZE.fullmatch(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size (e.g. 4GB, 1.5GiB, 800MB)")
    return int(float(match.group(1)) * UNITS[(match.group(2) or "").lower().removesuffix("b")])


def process_rss() -> int:
    """This process's resident memory in bytes (0 where /proc is not there)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
    return 0


def release_memory(unfreeze: bool) -> None:
    """After an unload: the model's objects collected, the memory they held handed back to the system."""
    collect_garbage(unfreeze)
    return_freed_memory()


def collect_garbage(unfreeze: bool) -> None:
    """A model's objects refer to each other: freed by the collector. ``unfreeze``: the model was loaded
    before :func:`gc.freeze`, its objects are in the frozen generation — thawed for one full pass."""
    if unfreeze:
        gc.unfreeze()
    gc.collect()
    if unfreeze:
        gc.freeze()


def return_freed_memory() -> None:
    """Hand memory freed by an unload back to the system (glibc keeps freed heap otherwise, and the RSS the
    budget is checked against would not fall)."""
    with contextlib.suppress(OSError, AttributeError):
        libc().malloc_trim(0)


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, found once: ``find_library`` runs ``ldconfig`` in a subprocess (14 ms a call)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def estimate_bytes(vdir: Path) -> int:
    """A first load's expected cost: the largest weights file (the fp32 variant: an upper bound for the one
    that will serve) times :data:`WEIGHT_FACTOR`, plus the graphs."""
    sizes = [(p.suffix, p.stat().st_size) for p in vdir.iterdir() if p.is_file()]
    weights = max((size for suffix, size in sizes if suffix == ".bin"), default=0)
    graphs = sum(size for suffix, size in sizes if suffix == ".onnx")
    return int(weights * WEIGHT_FACTOR) + graphs


@dataclass
class Resident:
    name: str
    cost: int
    evictable: bool  # lazy entries only: an eager entry stays loaded
    last_used: float = field(default_factory=time.monotonic)
    users: int = 0


class NoRoom(RuntimeError):
    """Nothing can be unloaded to fit a load now: every resident candidate has users."""


class Residency:
    def __init__(self, budget: int | None, policy: EvictionPolicy = "lru",
                 rss: Callable[[], int] | None = None) -> None:
        """``rss``: the process's resident bytes now, checked against the budget beside the measured costs
        (None: the costs alone)."""
        self.budget, self.policy, self.rss = budget, policy, rss
        self.heat: dict[str, tuple[float, float]] = {}  # entry -> (decayed request count, when it was last updated)
        self.baseline = 0  # the process's RSS before its first load (set by the manager)
        self.resident: dict[str, Resident] = {}
        self.measured: dict[str, int] = {}  # the last measured cost of each entry ever loaded
        # requests waiting for each entry's load: once it is in, busy until they pin it (another load must not
        # take it back before they could: under skewed traffic the new entry is often the only idle one)
        self.waiting: dict[str, int] = {}
        self._changed = asyncio.Event()  # a user left, or an entry went: room may have appeared

    @property
    def resident_bytes(self) -> int:
        return sum(r.cost for r in self.resident.values())

    @property
    def for_models(self) -> int | None:
        """What the budget leaves the models, the baseline taken."""
        return None if self.budget is None else self.budget - self.baseline

    @property
    def held(self) -> int:
        """What the models hold: their measured costs, or the process's RSS beyond its baseline if that is more."""
        accounted = self.resident_bytes
        return accounted if self.rss is None else max(accounted, self.rss() - self.baseline)

    @property
    def over_budget(self) -> bool:
        room = self.for_models
        return room is not None and self.held > room

    def expected_cost(self, name: str, vdir: Path) -> int:
        return self.measured.get(name) or estimate_bytes(vdir)

    def too_large(self, cost: int) -> bool:
        room = self.for_models
        return room is not None and cost > room

    def add(self, name: str, cost: int, evictable: bool) -> None:
        """``cost``: what this load added to the RSS; counted as at least the entry's last measured cost. A
        load from prepared graphs (:mod:`transerve.server.backends.prepared_graphs`) maps its weights, whose
        pages join the RSS only as requests touch them: its own growth under-states what it will hold."""
        users = self.resident[name].users if name in self.resident else 0  # a reload keeps its users
        cost = max(cost, self.measured.get(name, 0))
        self.resident[name] = Resident(name, cost, evictable, users=users)
        self.measured[name] = cost

    def remove(self, name: str) -> None:
        if self.resident.pop(name, None) is not None:
            self._changed.set()

    def freed(self, name: str, released: int) -> None:
        """An unload of ``name`` gave back ``released`` bytes: its cost, if more than measured at its load (the
        weights a load from prepared graphs maps join the RSS as requests touch them, and its runs grew its
        buffers), so its next load makes room for what it will really hold."""
        if released > self.measured.get(name, 0):
            self.measured[name] = released

    def pin(self, name: str) -> None:
        resident = self.resident.get(name)
        if resident is not None:
            resident.users += 1
            resident.last_used = time.monotonic()

    def asked(self, name: str) -> None:
        """A request for ``name`` arrived (resident or not): its heat rises by one."""
        now = time.monotonic()
        self.heat[name] = (self.warmth(name, now) + 1, now)

    def warmth(self, name: str, now: float) -> float:
        """Requests for ``name``, each counted ``0.5 ** (age / HEAT_HALF_LIFE_S)``."""
        value, at = self.heat.get(name, (0.0, now))
        return value * 0.5 ** ((now - at) / HEAT_HALF_LIFE_S)

    def wait(self, name: str) -> None:
        self.waiting[name] = self.waiting.get(name, 0) + 1

    def done_waiting(self, name: str) -> None:
        self.waiting[name] -= 1
        if not self.waiting[name]:
            del self.waiting[name]
            self._changed.set()

    def idle(self, r: Resident) -> bool:
        return r.users == 0 and r.name not in self.waiting

    def unpin(self, name: str) -> None:
        resident = self.resident.get(name)
        if resident is not None:
            resident.users = max(resident.users - 1, 0)
            resident.last_used = time.monotonic()
            if resident.users == 0:
                self._changed.set()

    def victims(self, need: int, keep: str = "") -> list[str]:
        """Entries to unload (never ``keep``), in the policy's order, so that ``need`` more bytes fit;
        :class:`NoRoom` when the idle ones are not enough."""
        room = self.for_models
        if room is None:
            return []
        excess = self.held + need - room
        chosen: list[str] = []
        for r in sorted(self.resident.values(), key=self._order()):
            if excess <= 0:
                break
            if r.evictable and self.idle(r) and r.name != keep:
                chosen.append(r.name)
                excess -= r.cost
        if excess > 0:
            busy = sorted(r.name for r in self.resident.values() if not self.idle(r) or not r.evictable)
            raise NoRoom(f"the memory budget ({room / 2**20:.0f} MB for models, {self.baseline / 2**20:.0f} MB "
                         f"baseline) is held by models in use or eager ({', '.join(busy) or 'none'}); "
                         f"{need / 2**20:.0f} MB more needed")
        return chosen

    def _order(self) -> Callable[[Resident], tuple[float, float]]:
        """Sort key of the victims, first to go first."""
        if self.policy == "lru":
            return lambda r: (0.0, r.last_used)
        now = time.monotonic()
        return lambda r: (self.warmth(r.name, now), r.last_used)

    async def changed(self, timeout: float | None) -> bool:
        """Wait until a user leaves or an entry goes (True), or ``timeout`` passes (False)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True
