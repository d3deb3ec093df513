"""The model repository as the server sees it: which entries exist, which are loaded, which is default.

An entry that fails to load is marked ``UNAVAILABLE`` with its reason; it
never stops the server or the other models.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from transerve.server.backends.precision import PrecisionName
from transerve.server.backends.prepared_graphs import PreparedGraphs
from transerve.server.backends.runtime import BackendName, load_runners
from transerve.server.engine.classifier import ClassifierModel
from transerve.server.engine.entry_names import ENTRY_NAME, check_entry_name, inside
from transerve.server.engine.loaded_model import Limits, LoadedModel
from transerve.server.engine.metrics import Metrics
from transerve.server.engine.model_config import ModelConfig, latest_version, load_model_config
from transerve.server.engine.pools import started_pool
from transerve.server.engine.residency import EvictionPolicy, NoRoom, Residency, process_rss, release_memory
from transerve.server.engine.translator import TranslatorModel
from transerve.server.exceptions import (
    BackendError,
    ConfigError,
    DeadlineExceeded,
    ModelLoading,
    ModelNotFound,
    QueueFull,
)

log = logging.getLogger(__name__)


LOAD_ATTEMPTS = 3
ROOM_WAIT_S = 30.0  # a load waits at most this long for models in use to free the memory it needs
IMAGE_DECODE_THREADS = 2  # JPEG/PNG decoding and resizing; libjpeg and PIL release the GIL
@dataclass
class EntryState:
    name: str
    version: str = ""
    state: str = "UNAVAILABLE"  # READY | UNAVAILABLE | LOADING | AVAILABLE (lazy: loads on its first request)
    reason: str = ""
    failed: bool = False  # the last load attempt failed (a reload that failed leaves the old version READY)


class ModelManager:
    def __init__(self, repo: Path, backend: BackendName, metrics: Metrics, limits: Limits, threads: int = 2,
                 spinning: bool = False, precision: PrecisionName | None = None, memory_budget: int | None = None,
                 rss: Callable[[], int] = process_rss, prepared: PreparedGraphs | None = None,
                 eviction: EvictionPolicy = "lru") -> None:
        self.repo, self.backend, self.metrics, self.limits, self.threads = repo, backend, metrics, limits, threads
        self.spinning = spinning
        self.precision = precision  # `serve --precision`: overrides every entry's config.yaml
        self.models: dict[str, LoadedModel] = {}
        self.states: dict[str, EntryState] = {}
        self.starting = True  # until the first load_all ends: an absent model may be one still to load
        self.image_pool = started_pool(IMAGE_DECODE_THREADS, "image-decode")
        self.configs: dict[str, ModelConfig] = {}  # every entry's config.yaml, read at start (routing, lazy)
        self.residency = Residency(memory_budget, eviction, rss)
        self._loads: dict[str, asyncio.Task[EntryState]] = {}  # lazy loads under way: one per entry
        self._load_lock = asyncio.Lock()  # one load at a time: its RSS growth is its own
        self._rss = rss  # what a load's cost is measured with (tests count instead)
        self.prepared = prepared  # optimised, prepacked copies of graphs that load again (evicted lazy entries)
        self.too_large: set[str] = set()  # entries refused at start: larger than the whole budget
        self._shrinking: asyncio.Task[None] | None = None
        self._frozen: set[str] = set()  # models loaded at start, whose objects gc.freeze() put out of reach
        metrics.memory_budget_bytes.set(memory_budget or 0)
        metrics.resident_models.set_function(lambda: len(self.models))
        metrics.resident_bytes.set_function(lambda: self.residency.resident_bytes)

    def entry_names(self) -> list[str]:
        """The repository's entries; one that is a symlink leading out of the repository is skipped."""
        if not self.repo.is_dir():
            return []
        names = []
        for p in sorted(self.repo.iterdir()):
            if not (p / "config.yaml").is_file():
                continue
            if not inside(p, self.repo):
                log.warning("repository entry %s leads out of the repository (%s): skipped", p.name, p.resolve())
                continue
            names.append(p.name)
        return names

    def entry(self, name: str) -> Path:
        """The entry directory for a client-given name, refusing anything that is not a plain entry name."""
        check_entry_name(name)
        entry = self.repo / name
        if not (entry / "config.yaml").is_file() or not inside(entry, self.repo):
            raise ModelNotFound(f"model {name!r} is not in the repository")
        return entry

    async def load_all(self) -> None:
        """Read every entry's config; load the eager ones (in name order), mark the lazy ones AVAILABLE."""
        self.residency.baseline = self._rss() if self.residency.budget is not None else 0
        try:
            for name in self.entry_names():
                if self._read_config(name) is None:
                    continue
                if self.configs[name].load == "lazy":
                    self.states[name] = EntryState(name, state="AVAILABLE", reason="loads on its first request")
                else:
                    await self.load(name)
        finally:
            self.starting = False

    def freeze_startup_objects(self) -> None:
        """For the process that owns the server, after :meth:`load_all`: what is alive now lives as long as the
        server, so it is moved out of the collector's passes (:func:`gc.freeze`) and the full collection after
        each unload scans only what came later — 0.17 s with the event loop stopped, before, in a process
        serving opus-mt-sized entries."""
        gc.collect()  # garbage of the start itself is not kept for ever
        gc.freeze()
        self._frozen = set(self.models)

    def _read_config(self, name: str) -> ModelConfig | None:
        """The entry's config (kept in ``configs``), or None with the entry UNAVAILABLE: unreadable, or larger
        than the whole memory budget."""
        entry = self.repo / name
        try:
            config = self.configs[name] = load_model_config(entry)
            vdir = entry / str(config.version) if config.version else latest_version(entry)
            cost = self.residency.expected_cost(name, vdir)
        except (ConfigError, OSError) as e:
            self._failed(name, str(e))
            return None
        if self.residency.too_large(cost):
            self.too_large.add(name)
            self._failed(name, f"needs about {cost / 2**20:.0f} MB, more than the whole memory budget leaves "
                               f"models ({self.residency.for_models / 2**20:.0f} MB of --memory-budget "  # type: ignore[operator]
                               f"{self.residency.budget / 2**20:.0f} MB, the rest the process's baseline)")  # type: ignore[operator]
            return None
        return config

    async def load(self, name: str, warm: bool = True, deadline: float | None = None) -> EntryState:
        """(Re)load one entry, after unloading idle lazy ones if the budget asks; the old instance, if any, is
        drained after the new one is ready. One load at a time: what it adds to the RSS is its cost."""
        entry = self.entry(name)
        async with self._load_lock:
            try:
                await self._make_room(name, entry, deadline)
            except NoRoom as e:
                self.metrics.model_loads.labels(name, "failed").inc()
                raise QueueFull(f"model {name!r} cannot load now: {e}") from None
            self.states[name] = EntryState(name, state="LOADING")
            before, start = self._rss(), time.perf_counter()
            state = await self._load_now(name, entry, warm)
            self.metrics.model_loads.labels(name, "failed" if state.failed else "ok").inc()
            if not state.failed:
                self.metrics.model_load_seconds.labels(name).observe(time.perf_counter() - start)
                self.metrics.model_evictions.labels(name)  # exported at 0 from its first load on
                lazy = self.configs.get(name) is not None and self.configs[name].load == "lazy"
                self.residency.add(name, max(self._rss() - before, 0), evictable=lazy)
                await self._over_budget(name)  # it cost more than expected
            return state

    async def _over_budget(self, name: str) -> None:
        """Unload idle entries, one at a time, until ``name`` — in, and costing what it did — fits."""
        while True:
            try:
                victims = self.residency.victims(0, keep=name)
            except NoRoom as e:  # the busy ones will be idle later; the next load makes room again
                log.warning("model %s: over the memory budget until models in use are idle (%s)", name, e)
                return
            if not victims:
                return
            await self._evict(victims[:1], name)

    async def _evict(self, victims: list[str], name: str) -> None:
        """Unload ``victims``, chosen idle just before: no await between the choice and the first one's
        removal, so no request can have picked it up meanwhile."""
        for victim in victims:
            log.info("model %s unloaded to make room for %s (memory budget)", victim, name)
            self.metrics.model_evictions.labels(victim).inc()
            await self.unload(victim, grace=0, reason="unloaded to make room (memory budget); loads on its next "
                                                      "request")

    async def _make_room(self, name: str, entry: Path, deadline: float | None) -> None:
        """Unload idle lazy entries (the eviction policy's choice) until ``name``'s expected cost fits the
        budget, waiting (until ``deadline``) while every candidate has users."""
        if name in self.models or self.residency.budget is None:
            return  # a reload: the new version replaces the old one's cost
        config = self.configs.get(name) or load_model_config(entry)
        vdir = entry / str(config.version) if config.version else latest_version(entry)
        need = self.residency.expected_cost(name, vdir)
        deadline = min(deadline or math.inf, time.monotonic() + ROOM_WAIT_S)
        while True:  # one entry at a time: the choice is made again after each await (users come and go)
            try:
                victims = self.residency.victims(need)
            except NoRoom:
                left = deadline - time.monotonic()
                if left <= 0 or not await self.residency.changed(left):
                    raise
                continue
            if not victims:
                return
            await self._evict(victims[:1], name)

    async def _load_now(self, name: str, entry: Path, warm: bool) -> EntryState:
        state = self.states[name]
        try:
            model = await asyncio.to_thread(self._build, entry)
            await model.start(warm)
        except (ConfigError, BackendError) as e:
            return self._failed(name, str(e))
        except Exception as e:  # a runtime refusing the graph (corrupt ONNX …) must not stop the server
            return self._failed(name, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
        old = self.models.get(name)
        self.models[name], self.configs[name] = model, model.config
        model.observe(self.metrics)
        state.version, state.state, state.reason = model.version, "READY", ""
        log.info("model %s version %s ready on %s, precision %s", name, model.version, model.backend,
                 model.precision)
        if old is not None:
            await old.aclose(grace=30)
        return state

    def _failed(self, name: str, reason: str) -> EntryState:
        """A load that failed: the entry is UNAVAILABLE — unless a loaded version is serving, which goes on
        serving (files changed on disk under a served model do not take it down)."""
        old = self.models.get(name)
        if old is None:
            log.error("model %s unavailable: %s", name, reason)
            state = EntryState(name, "", "UNAVAILABLE", reason, failed=True)
        else:
            log.error("model %s: reload failed, still serving version %s: %s", name, old.version, reason)
            state = EntryState(name, old.version, "READY", f"reload failed, serving version {old.version}: {reason}",
                               failed=True)
        self.states[name] = state
        return state

    def _build(self, entry: Path) -> LoadedModel:
        config = load_model_config(entry)
        vdir = entry / str(config.version) if config.version else latest_version(entry)
        outside = [p.name for p in [vdir, *vdir.iterdir()] if not inside(p, self.repo)]
        if outside:
            raise ConfigError(f"{entry.name}: {outside} lead out of the repository (symlinks); refusing to load")
        backend = config.backend if self.backend == "auto" and config.backend != "onnxruntime" else self.backend
        small_batches = config.max_batch_size if config.task in ("classify", "tensor") else 0  # plain compute
        aux = None if config.scoring is None else {"decoder_score": config.scoring.file}
        if config.scoring is not None and config.scoring.align_file:
            aux = {**(aux or {}), "decoder_align": config.scoring.align_file}
        runtime = load_runners(backend, vdir, config.files, self.threads,  # type: ignore[arg-type]
                               self.spinning, self.precision or config.precision, small_batches, aux,
                               self.prepared)
        model: LoadedModel
        if config.task == "tensor":
            from transerve.server.engine.tensor_model import TensorModel

            model = TensorModel(config, vdir.name, runtime.backend, runtime.runners, self.metrics.on_batch)
        elif config.task == "classify":
            model = ClassifierModel(config, vdir.name, runtime.backend, runtime.runners, entry, self.metrics.on_batch,
                                    self.image_pool, self.limits)
        else:
            model = TranslatorModel(config, vdir.name, runtime.backend, runtime.runners, entry,
                                    self.metrics.on_batch, self.limits, self.metrics)
        model.precision, model.precision_reason = runtime.precision, runtime.reason
        return model

    async def unload(self, name: str, grace: float = 30, reason: str = "unloaded") -> None:
        check_entry_name(name)
        model = self.models.pop(name, None)
        if model is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        lazy = name in self.configs and self.configs[name].load == "lazy"
        self.states[name] = EntryState(name, model.version, "AVAILABLE" if lazy else "UNAVAILABLE", reason)
        self.residency.remove(name)
        await model.aclose(grace)
        before = self._rss()
        model.release()  # the sessions go now, whatever still refers to the model
        del model
        release_memory(unfreeze=name in self._frozen)
        self._frozen.discard(name)
        self.residency.freed(name, before - self._rss())

    @contextlib.asynccontextmanager
    async def use(self, name: str, version: str = "", task: str | None = None, deadline: float | None = None
                  ) -> AsyncIterator[LoadedModel]:
        """The model for a request, loaded first if it is a lazy entry not loaded now, and kept loaded (never
        evicted) until the request ends."""
        if name in self.configs:  # entries only: names clients make up must not grow the table
            self.residency.asked(name)
        for _ in range(LOAD_ATTEMPTS):  # loaded, then unloaded again before this request could pin it: rare
            if not name or name in self.models or not self._lazy(name):
                break
            await self._wait_for_load(name, deadline)
        model = self.get(name, version, task)
        self.residency.pin(model.name)
        try:
            yield model
        finally:
            self.residency.unpin(model.name)
            if self.residency.over_budget and not self._shrinking:
                self._shrinking = asyncio.create_task(self._shrink())

    async def _shrink(self) -> None:
        """Over the budget (a load cost more than expected while the others were busy): unload idle entries
        now that one became idle."""
        try:
            async with self._load_lock:
                await self._over_budget("")
        finally:
            self._shrinking = None

    def _lazy(self, name: str) -> bool:
        config = self.configs.get(name)
        return (config is not None and config.load == "lazy" and name not in self.too_large
                and ENTRY_NAME.fullmatch(name) is not None)

    async def _wait_for_load(self, name: str, deadline: float | None) -> None:
        """Join the entry's load under way, or start it; at most the entry's ``max_queue_size`` requests wait."""
        limit = self.configs[name].batching.max_queue_size
        if self.residency.waiting.get(name, 0) >= limit:
            raise QueueFull(f"model {name!r} is loading and {limit} requests already wait for it (max_queue_size)")
        task = self._loads.get(name)
        if task is None:
            # the load is every waiter's, not the first one's: it waits for room up to ROOM_WAIT_S, each waiter
            # up to its own deadline
            task = self._loads[name] = asyncio.create_task(self.load(name, warm=False))
            task.add_done_callback(lambda _: self._loads.pop(name, None))
        self.residency.wait(name)  # until it pins the model: a loaded entry with waiters is never a victim
        try:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            state = await asyncio.wait_for(asyncio.shield(task), left)
        except TimeoutError:
            raise DeadlineExceeded(f"deadline passed while model {name!r} loaded") from None
        finally:
            self.residency.done_waiting(name)
        if state.failed:
            raise ModelNotFound(f"model {name!r} is not available ({state.reason})")

    def get(self, name: str, version: str = "", task: str | None = None) -> LoadedModel:
        """A loaded model by name (empty name: the default for ``task``)."""
        if not name:
            return self.default_for(task or "")
        model = self.models.get(name)
        if model is None:
            if self._still_loading(name):
                raise ModelLoading(f"model {name!r} is loading; retry shortly")
            reason = self.states.get(name, EntryState(name, reason="not in the repository")).reason
            raise ModelNotFound(f"model {name!r} is not available ({reason or 'not loaded'})")
        if version and version != model.version:
            raise ModelNotFound(f"model {name!r} has no version {version!r} loaded (serving {model.version})")
        if task and model.config.task != task:
            raise ModelNotFound(f"model {name!r} is a {model.config.task} model, not {task}")
        return model

    def default_for(self, task: str) -> LoadedModel:
        candidates = [m for m in self.models.values() if m.config.task == task]
        marked = [m for m in candidates if m.config.default]
        if len(marked) == 1 or len(candidates) == 1:
            return (marked or candidates)[0]
        if not candidates and (self.starting or any(s.state == "LOADING" for s in self.states.values())):
            raise ModelLoading(f"no {task} model is loaded yet: the repository is loading; retry shortly")
        if not candidates:
            raise ModelNotFound(f"no {task} model is loaded")
        raise ModelNotFound(f"several {task} models are loaded and none is marked default: name one of "
                            f"{sorted(m.name for m in candidates)}")

    def servable(self) -> list[str]:
        """Entries that answer requests: loaded, or lazy (loaded on demand — also while a load is under way, and
        after one failed: the next request tries again)."""
        return sorted({*self.models, *(n for n in self.configs if self._lazy(n))})

    def servable_configs(self) -> list[tuple[str, ModelConfig]]:
        return [(name, self.configs[name]) for name in self.servable() if name in self.configs]

    def _still_loading(self, name: str) -> bool:
        """Loading now, or waiting for the server's first load (an entry of that name is on disk)."""
        state = self.states.get(name)
        if state is not None:
            return state.state == "LOADING"
        return self.starting and bool(ENTRY_NAME.fullmatch(name)) and (self.repo / name / "config.yaml").is_file()

    async def aclose(self, grace: float) -> None:
        await asyncio.gather(*(m.aclose(grace) for m in self.models.values()))
        self.image_pool.shutdown(wait=True)
        if self.prepared is not None:
            self.prepared.close()
