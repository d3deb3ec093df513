"""ONNX Runtime graphs optimised and prepacked once, then mapped by every later load of the same files.

Creating an opus-mt-sized translator's two CPU sessions costs about 0.7 s, most of it ONNX Runtime packing
the MatMul weights into its kernels' layout (measured on an AVX-512 EPYC: decoder 0.55 s, 0.23 s with
prepacking off — which makes every decode step slower). A lazily loaded entry that the memory budget evicts
pays that again at each reload, and under skewed traffic reloads are most of what the server does besides
decoding. ONNX Runtime can save the optimised graph with its prepacked weights in an external data file
(``session.save_external_prepacked_constant_initializers``); a session made from that copy maps the packed
weights instead of packing them again (decoder 0.25 s, encoder 0.08 s instead of 0.14 s).

Saving costs more than a plain load (the copy holds the original and the packed weights: 790 MB for a
296 MB fp32 opus-mt entry), so the graphs of a version are prepared the *second* time they load in this
process: a first load — a cold start — stays as fast as before, and an entry that is never evicted and
loaded again costs no disk.

The packed layout belongs to this CPU and this ONNX Runtime: both are in the key, with the size and
modification time of the graph and of each weights file, so a changed file, an upgraded runtime or another
machine's copy is never mapped. A folder on tmpfs is refused: files there are memory outside the budget.
Nothing but the server writes in the folder (it is created 0700); like the private copies of
:mod:`private_weights`, the copies are mapped, and must not be truncated while served.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from transerve.server.backends.cpu import cpu_signature
from transerve.server.backends.private_weights import WEIGHT_SUFFIXES, unused_weights

log = logging.getLogger(__name__)

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
READY = "ready"  # written last in a prepared folder: a folder without it was cut short and is ignored


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on, from ``/proc/mounts`` (the longest mount point above it)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "?"
    resolved, best = str(path.resolve()), ("", "?")
    for point, kind in mounts:
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best[0]):
            best = (point, kind)
    return best[1]


def graph_key(vdir: Path, filename: str) -> str:
    """What a prepared copy of ``vdir/filename`` is valid for: the files as they are now, this runtime and CPU."""
    import onnxruntime as ort

    unused = unused_weights(vdir, [filename])
    files = [vdir / filename, *sorted(p for p in vdir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                                      and p.name not in unused)]
    parts = [str(vdir.resolve()), filename, ort.__version__, cpu_signature()]
    parts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


@dataclass
class PreparedGraphs:
    """The folder of prepared copies and how often each graph's files have loaded in this process."""

    folder: Path | None
    loads: dict[str, int] = field(default_factory=dict)
    owned: bool = False  # a temporary folder of this process: removed by close()

    @classmethod
    def create(cls, folder: Path | None) -> PreparedGraphs:
        """In ``folder`` (made if missing); ``None``: a new temporary folder, removed when the server stops.
        Off (folder ``None`` inside) where the folder is on a memory filesystem."""
        owned = folder is None
        folder = Path(tempfile.mkdtemp(prefix="transerve-prepared-")) if folder is None else folder
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        kind = filesystem_type(folder)
        if kind in MEMORY_FILESYSTEMS:
            log.warning("prepared graphs off: %s is on %s, whose files would be memory outside the budget; "
                        "give --prepared-graphs a folder on disk", folder, kind)
            if owned:
                shutil.rmtree(folder, ignore_errors=True)
            return cls(None)
        return cls(folder, owned=owned)

    @classmethod
    def from_setting(cls, setting: str) -> PreparedGraphs | None:
        """``serve --prepared-graphs``: ``temp`` (a folder removed at exit), ``off``, or a folder kept across
        restarts."""
        if setting == "off":
            return None
        return cls.create(None if setting == "temp" else Path(setting))

    def ready(self, vdir: Path, filename: str) -> Path | None:
        """The prepared copy of ``vdir/filename`` to load, if there is one; counts the load."""
        if self.folder is None:
            return None
        key = graph_key(vdir, filename)
        self.loads[key] = self.loads.get(key, 0) + 1
        path = self.folder / key / filename
        return path if (self.folder / key / READY).is_file() else None

    def wanted(self, vdir: Path, filename: str) -> Path | None:
        """Where to save a prepared copy of ``vdir/filename`` while loading it: on its second load (after
        :meth:`ready` found none), else ``None``. The copy goes to a staging folder; :meth:`commit` moves it."""
        if self.folder is None:
            return None
        key = graph_key(vdir, filename)
        if self.loads.get(key, 0) < 2:
            return None
        staging = self.folder / f"{key}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        return staging / filename

    def commit(self, saved: Iterable[Path]) -> None:
        """Staging folders whose sessions were made: marked ready and moved into place."""
        for path in saved:
            staging = path.parent
            if not path.is_file():
                shutil.rmtree(staging, ignore_errors=True)
                continue
            (staging / READY).write_text("")
            final = staging.with_name(staging.name.removesuffix(".staging"))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)

    def bytes_on_disk(self) -> int:
        if self.folder is None:
            return 0
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())

    def close(self) -> None:
        if self.owned and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def save_options(target: Path) -> dict[str, str]:
    """Session config entries that save the optimised graph to ``target``, its weights and their packed
    forms in one external file beside it (page-aligned, so that they can be mapped)."""
    return {"session.optimized_model_external_initializers_file_name": f"{target.name}.bin",
            "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
            "session.save_external_prepacked_constant_initializers": "1"}
