"""ONNX Runtime: session options and the CPU session factory (what export verification, the benchmarks and the
decoding loops use), the execution providers present, and :class:`OrtRunner`, the backend's graph runner."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def session_options(threads: int = 2, spinning: bool = True) -> Any:
    """``spinning=False`` for servers: ORT's worker threads stop spinning when a run ends instead of burning the
    cores that the gRPC and batching threads need between batches (offline loops keep the default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: ORT's initializer chatter is not for users
    if not spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


def make_session(path: Path | bytes, threads: int = 2) -> Any:
    """A CPU ``onnxruntime.InferenceSession`` from a file or serialized bytes."""
    import onnxruntime as ort

    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])


def ort_providers() -> tuple[list[str], str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        if provider in available:
            return [provider, "CPUExecutionProvider"], f"onnxruntime has {provider}"
    return ["CPUExecutionProvider"], "onnxruntime CPU (no GPU execution provider installed)"


class OrtRunner:
    """One ONNX Runtime session; with ``small_batches`` (a batch limit), also a one-thread session for the
    batch sizes where it measures faster (:mod:`transerve.server.backends.small_batches`)."""

    def __init__(self, path: Path, threads: int, providers: list[str], spinning: bool = False,
                 small_batches: int = 0, prepared: bool = False, save_to: Path | None = None) -> None:
        """``prepared``: ``path`` is a copy already optimised and prepacked for this CPU
        (:mod:`transerve.server.backends.prepared_graphs`), loaded as it is; ``save_to``: where the first
        session saves such a copy of itself."""
        import onnxruntime as ort

        def make_session(count: int, save: Path | None = None) -> Any:
            opts = session_options(count, spinning=spinning)
            if prepared:
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if save is not None:
                from transerve.server.backends.prepared_graphs import save_options

                opts.optimized_model_filepath = str(save)
                for key, value in save_options(save).items():
                    opts.add_session_config_entry(key, value)
            return ort.InferenceSession(str(path), opts, providers=providers)

        self.path, self.prepared = path, prepared
        self.session = make_session(threads, save_to)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.single: Any = None
        self.single_up_to = 0  # batches of at most this many items run on ``single``
        if small_batches and threads > 1 and providers == ["CPUExecutionProvider"]:
            from transerve.server.backends.small_batches import single_thread_session

            self.single, self.single_up_to = single_thread_session(path, self.session, make_session, small_batches)

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = list(output_names) if output_names else None
        if self.single is not None and len(feeds[self.input_names[0]]) <= self.single_up_to:
            return list(self.single.run(names, feeds))
        return list(self.session.run(names, feeds))

    def close(self) -> None:
        """Drop the sessions now (an unloaded model's weights are freed at once, not when the collector finds
        the model's reference cycles); a run after this fails."""
        self.session = self.single = None
