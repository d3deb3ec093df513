"""A TensorRT 10 engine behind the graph-runner interface, with CUDA memory from cuda-python — no torch.

The serving runtime never imports a training framework (DESIGN.md), so device buffers, copies and the
stream come from NVIDIA's ``cuda-python`` runtime bindings (the ``gpu`` extra), the same calls TensorRT's
own Python samples make. Device buffers are kept per tensor and grown when a call needs more, so steady-state
calls allocate nothing; copies and the engine run on one stream, synchronised once per call.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def cuda_runtime() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime`` from 12.6, ``cuda.cudart`` before)."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return importlib.import_module("cuda.cudart")


def _checked(result: Any) -> Any:
    """cuda-python calls return ``(error, *values)``: raise on an error, return the value(s)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if getattr(error, "value", error) != 0:  # cudaError_t.cudaSuccess
        raise RuntimeError(f"CUDA error {error}")
    return values[0] if len(values) == 1 else values


def gpu_count() -> int:
    """CUDA devices visible here (0 when cuda-python or the driver is missing)."""
    try:
        return int(_checked(cuda_runtime().cudaGetDeviceCount()))
    except (ImportError, RuntimeError):
        return 0


class TensorRTRunner:
    """``run(output_names, feeds)`` over one deserialized engine; dynamic shapes are set per call."""

    def __init__(self, plan: Path) -> None:
        import tensorrt as trt
        from transerve.server.exceptions import BackendError

        self.cudart = cuda_runtime()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BackendError(f"{plan}: TensorRT could not load this engine (built by another version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.stream = _checked(self.cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}  # name → (device pointer, capacity in bytes)

    def _device(self, name: str, nbytes: int) -> int:
        pointer, capacity = self.buffers.get(name, (0, 0))
        if nbytes > capacity:
            if pointer:
                _checked(self.cudart.cudaFree(pointer))
            capacity = max(nbytes, capacity * 3 // 2, 256)
            pointer = int(_checked(self.cudart.cudaMalloc(capacity)))
            self.buffers[name] = (pointer, capacity)
        return pointer

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        hosts = {n: np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self.input_names}
        for name, host in hosts.items():
            pointer = self._device(name, host.nbytes)
            _checked(cudart.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes, h2d, self.stream))
            self.context.set_input_shape(name, tuple(host.shape))
            self.context.set_tensor_address(name, pointer)
        outputs = {}
        for name in self.output_names:
            out = np.empty(tuple(self.context.get_tensor_shape(name)), self.dtypes[name])
            outputs[name] = out
            self.context.set_tensor_address(name, self._device(name, out.nbytes))
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execution failed")
        for name, out in outputs.items():
            _checked(cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[name][0], out.nbytes, d2h, self.stream))
        _checked(cudart.cudaStreamSynchronize(self.stream))  # the host arrays are complete after this
        return [outputs[n] for n in (output_names or self.output_names)]


__all__ = ["TensorRTRunner", "cuda_runtime", "gpu_count"]
