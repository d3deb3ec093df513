"""Which models are resident, what each costs, and which to unload when a load would not fit the budget.

``serve --memory-budget`` bounds the process's memory: what it held before its first load (the runtime,
libraries, the RPC stack: the *baseline*) plus what the loaded models cost together. A model's cost is what
its load really
added to the process — resident memory measured before and after (weights, their runtime copies and
pre-packing, memory-mapped pages touched), not its file sizes — so the accounting holds for any runtime and
precision. Before an entry's first load its cost is estimated from its files (:func:`estimate_bytes`); after,
the measured figure counts. Loads happen one at a time, so each one's growth is its own.

When a load would exceed the budget, the least recently used *idle* lazy entry goes first: one with a request
in flight or waiting (a *user*, counted from the moment a request picks the model until its answer is sent) is
never a candidate, and neither is an eager entry. When nothing can go, the load waits for a user to finish.
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
from dataclasses import dataclass, field
from pathlib import Path

# an opus-mt-shaped fp32 entry measured 327 MB resident for 296 MB of weights (memory-mapped pages touched, plus
# ONNX Runtime's pre-packed MatMul weights and arenas): 1.1x; the estimate only decides a first load, the
# measured cost replaces it
WEIGHT_FACTOR = 1.25


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
    def __init__(self, budget: int | None) -> None:
        self.budget = budget
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
    def over_budget(self) -> bool:
        room = self.for_models
        return room is not None and self.resident_bytes > room

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

    def pin(self, name: str) -> None:
        resident = self.resident.get(name)
        if resident is not None:
            resident.users += 1
            resident.last_used = time.monotonic()

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
        """Entries to unload (never ``keep``), least recently used first, so that ``need`` more bytes fit;
        :class:`NoRoom` when the idle ones are not enough."""
        room = self.for_models
        if room is None:
            return []
        excess = self.resident_bytes + need - room
        chosen: list[str] = []
        for r in sorted(self.resident.values(), key=lambda r: r.last_used):
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

    async def changed(self, timeout: float | None) -> bool:
        """Wait until a user leaves or an entry goes (True), or ``timeout`` passes (False)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True
