"""A served model must not change, or crash the server, when its files change on disk.

ONNX Runtime memory-maps an entry's ``weights.bin`` (one page-aligned file per precision, shared by the
graphs) and keeps reading the mapping while it serves: rewriting the file in place changes the weights under
a running model, and truncating it (``cp`` and ``>`` both do) killed the process with SIGBUS at the next
request — found by tests/test_faults.py. So sessions are created from a private copy of the version folder
in a temporary directory, which is deleted as soon as the sessions exist: the mappings keep the unlinked
copy alive, and no path leads to it any more, so nothing can change it. The pages stay file-backed (the
kernel may drop and re-read them, as with the original), the copy costs one sequential read and write per
load, and the disk it holds (in ``$TMPDIR``) is freed when the model is unloaded.

(Anonymous memory via ``memfd`` would avoid the disk, but ONNX Runtime resolves an external-data path to its
canonical form and refuses one that leaves the model's folder, which ``/proc/self/fd/N`` does.)
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

WEIGHT_SUFFIXES = (".bin", ".data")  # external-data files (weights.bin, the ONNX convention's *.data)
EXPORTED_WEIGHTS = re.compile(r"weights(?:\.([\w-]+))?\.bin")  # export's weights_filename(): one per precision


def unused_weights(vdir: Path, graphs: Iterable[str] | None) -> set[str]:
    """Exported weights files that none of ``graphs`` reads: ``X.onnx`` reads ``weights.bin``, ``X.int8.onnx``
    reads ``weights.int8.bin``. Files named otherwise are always copied (what they feed is not known)."""
    if graphs is None:
        return set()
    wanted = {".".join(Path(g).name.split(".")[1:-1]) for g in graphs}
    return {p.name for p in vdir.iterdir() if (m := EXPORTED_WEIGHTS.fullmatch(p.name)) and (m.group(1) or "")
            not in wanted}


@contextlib.contextmanager
def private_weights(vdir: Path, graphs: Iterable[str] | None = None) -> Iterator[Path]:
    """A folder with ``vdir``'s files, copied when it has external weights; valid until the context ends (load
    the sessions inside it). A folder without external weights is used as it is: its graphs are read whole.
    ``graphs``: the graph files that will load — a precision's weights file no graph of theirs reads
    (``weights.int8.bin`` beside fp32 graphs, by the exporter's naming) is not copied."""
    if not any(p.is_file() and p.suffix in WEIGHT_SUFFIXES for p in vdir.iterdir()):
        yield vdir
        return
    unused = unused_weights(vdir, graphs)
    with tempfile.TemporaryDirectory(prefix="transerve-load-") as tmp:
        for path in vdir.iterdir():
            if path.name in unused:
                continue
            if path.is_file():
                shutil.copyfile(path, Path(tmp) / path.name)
            else:
                (Path(tmp) / path.name).symlink_to(path.resolve())
        yield Path(tmp)
