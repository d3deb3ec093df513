"""Our exported ONNX run by OpenVINO's CPU plugin — the way to bf16 compute on x86.

ONNX Runtime's CPU provider has no bf16 kernels on x86, so AVX512-BF16 and AMX tiles are reachable only
through another runtime. OpenVINO reads the same ``*.onnx`` (and its ``weights.bin``) and, with the
``bf16`` inference-precision hint, runs matrix multiplies in bf16 on CPUs that have it. A graph is served
this way only after it passed its parity gate on OpenVINO (``transerve.server.backends.precision``): OpenVINO
2026.4 was seen computing wrong decoder logits with cached positions, even in f32.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

OpenVinoPrecision = Literal["bf16", "f32"]


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


class OpenVinoRunner:
    """One compiled graph; ``run`` has ``InferenceSession.run``'s signature (:mod:`transerve.server.backends.runner`).

    An infer request holds its own buffers and is not safe to share between threads, and the batcher may
    run several instances of a model at once: each worker thread gets its own request."""

    def __init__(self, path: Path, threads: int, precision: OpenVinoPrecision) -> None:
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        self.compiled: Any = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.precision = precision
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]
        self._local = threading.local()

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = self._request()
        request.infer({name: np.ascontiguousarray(array) for name, array in feeds.items()})
        wanted = list(output_names) if output_names else self.output_names
        # copies: the request reuses its output buffers on the next run
        return [np.array(request.get_tensor(name).data) for name in wanted]
