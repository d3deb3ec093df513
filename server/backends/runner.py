"""The one interface every backend implements: a *graph runner* runs one graph of a repository entry with the
signature of ``onnxruntime.InferenceSession.run`` — ``run(output_names | None, feeds) -> list[np.ndarray]`` — so
the decoding code written against ORT sessions (:mod:`transerve.server.engine.seq2seq`) drives every backend
unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class GraphRunner(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def run_into(runner: Any, feeds: dict[str, np.ndarray], bound: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run with the ``bound`` outputs written into the caller's arrays (exact shape, C-contiguous); returns the
    other outputs. ONNX Runtime writes them in place through IOBinding — no per-run allocation for them —
    other backends copy into them."""
    session = getattr(runner, "session", runner)
    if hasattr(session, "io_binding"):
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, array in bound.items():
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        free = [o.name for o in session.get_outputs() if o.name not in bound]
        for name in free:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        values = binding.get_outputs()[len(bound):]
        return {name: value.numpy() for name, value in zip(free, values, strict=True)}
    results = dict(zip(runner.output_names, runner.run(None, feeds), strict=True))
    for name, array in bound.items():
        np.copyto(array, results.pop(name))
    return results
