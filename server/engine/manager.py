"""The model repository as the server sees it: which entries exist, which are loaded, which is default.

An entry that fails to load is marked ``UNAVAILABLE`` with its reason; it
never stops the server or the other models.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from transerve.server.backends.precision import PrecisionName
from transerve.server.backends.runtime import BackendName, load_runners
from transerve.server.engine.classifier import ClassifierModel
from transerve.server.engine.loaded_model import Limits, LoadedModel
from transerve.server.engine.metrics import Metrics
from transerve.server.engine.model_config import latest_version, load_model_config
from transerve.server.engine.pools import started_pool
from transerve.server.engine.translator import TranslatorModel
from transerve.server.exceptions import (
    BackendError,
    ConfigError,
    ModelLoading,
    ModelNotFound,
    RequestError,
)

log = logging.getLogger(__name__)


# A repository entry is a directory name, never a path: no separators, no "..", no NUL, no percent-escapes.
IMAGE_DECODE_THREADS = 2  # JPEG/PNG decoding and resizing; libjpeg and PIL release the GIL
ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` still lies under ``root`` once every symlink is followed."""
    return path.resolve().is_relative_to(root.resolve())


@dataclass
class EntryState:
    name: str
    version: str = ""
    state: str = "UNAVAILABLE"  # READY | UNAVAILABLE | LOADING
    reason: str = ""
    failed: bool = False  # the last load attempt failed (a reload that failed leaves the old version READY)


def check_entry_name(name: str) -> None:
    if not ENTRY_NAME.fullmatch(name):
        raise RequestError(f"model_name: {name!r} is not a repository entry name (1 to 128 letters, digits, "
                           "'.', '_' or '-', starting with a letter or digit; no path)")


class ModelManager:
    def __init__(self, repo: Path, backend: BackendName, metrics: Metrics, limits: Limits, threads: int = 2,
                 spinning: bool = False, precision: PrecisionName | None = None) -> None:
        self.repo, self.backend, self.metrics, self.limits, self.threads = repo, backend, metrics, limits, threads
        self.spinning = spinning
        self.precision = precision  # `serve --precision`: overrides every entry's config.yaml
        self.models: dict[str, LoadedModel] = {}
        self.states: dict[str, EntryState] = {}
        self.starting = True  # until the first load_all ends: an absent model may be one still to load
        self.image_pool = started_pool(IMAGE_DECODE_THREADS, "image-decode")

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
        try:
            for name in self.entry_names():
                await self.load(name)
        finally:
            self.starting = False

    async def load(self, name: str) -> EntryState:
        """(Re)load one entry; the old instance, if any, is drained after the new one is ready."""
        entry = self.entry(name)
        state = self.states[name] = EntryState(name, state="LOADING")
        try:
            model = await asyncio.to_thread(self._build, entry)
            await model.start()
        except (ConfigError, BackendError) as e:
            return self._failed(name, str(e))
        except Exception as e:  # a runtime refusing the graph (corrupt ONNX …) must not stop the server
            return self._failed(name, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
        old = self.models.get(name)
        self.models[name] = model
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
                               self.spinning, self.precision or config.precision, small_batches, aux)
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

    async def unload(self, name: str, grace: float = 30) -> None:
        check_entry_name(name)
        model = self.models.pop(name, None)
        if model is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        self.states[name] = EntryState(name, model.version, "UNAVAILABLE", "unloaded")
        await model.aclose(grace)

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

    def _still_loading(self, name: str) -> bool:
        """Loading now, or waiting for the server's first load (an entry of that name is on disk)."""
        state = self.states.get(name)
        if state is not None:
            return state.state == "LOADING"
        return self.starting and bool(ENTRY_NAME.fullmatch(name)) and (self.repo / name / "config.yaml").is_file()

    async def aclose(self, grace: float) -> None:
        await asyncio.gather(*(m.aclose(grace) for m in self.models.values()))
        self.image_pool.shutdown(wait=True)
