"""A graph runner made on its first use.

A translator's scoring graphs (``decoder_score``, ``decoder_align``) serve only requests that ask for scores
or alignments; creating their sessions at load cost a third of an opus-mt-sized model's load time, which a
lazily loaded entry's first request waits through. Made on first use instead, from a private copy of the
files as every session is (:mod:`private_weights`) — and refused if those files changed since the model
loaded, so a scoring graph never pairs with another version's decoder.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transerve.server.backends.runner import GraphRunner
from transerve.server.exceptions import BackendError


def stamps(paths: Sequence[Path]) -> dict[Path, tuple[int, int]]:
    """Size and modification time of each file that exists: what says a file is still the one loaded."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file()}


class LazyRunner:
    def __init__(self, make: Callable[[], GraphRunner], files: Sequence[Path]) -> None:
        self._make, self._files, self._stamps = make, list(files), stamps(files)
        self._runner: GraphRunner | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _get(self) -> GraphRunner:
        with self._lock:
            if self._runner is None:
                if self._closed:
                    raise BackendError(f"{self._files[0]}: the model was unloaded")
                if stamps(self._files) != self._stamps:
                    raise BackendError(f"{self._files[0]}: changed on disk since the model loaded; reload the "
                                       "model to use it")
                self._runner = self._make()
            return self._runner

    def close(self) -> None:
        with self._lock:
            close = getattr(self._runner, "close", None)
            if close is not None:
                close()
            self._runner, self._closed = None, True

    @property
    def made(self) -> bool:
        return self._runner is not None

    @property
    def input_names(self) -> list[str]:
        return self._get().input_names

    @property
    def output_names(self) -> list[str]:
        return self._get().output_names

    @property
    def session(self) -> Any:
        runner = self._get()
        return getattr(runner, "session", runner)

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._get().run(output_names, feeds)
