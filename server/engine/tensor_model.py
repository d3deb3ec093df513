"""Bring your own ONNX model: ``task: tensor`` entries, served through KServe ModelInfer (gRPC and REST).

Inputs and outputs are the graph's own (names, datatypes, shapes with ``-1`` for dynamic dimensions), read
by :func:`describe_graph` when ``transerve repo add`` writes the entry. Requests are validated against them
at the edge — datatype, rank, every fixed dimension, the same batch on every input — and batched over the
first axis when the graph's first dimension is dynamic on every input and output (else each request runs
alone, ``max_batch_size: 1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from transerve.server.backends.runner import GraphRunner
from transerve.server.engine.loaded_model import LoadedModel
from transerve.server.engine.model_config import ModelConfig, TensorSpec
from transerve.server.exceptions import RequestError
from transerve_client.codec import DTYPES

# ONNX Runtime's type strings → KServe datatypes
ONNX_DATATYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
                  "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
                  "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
                  "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL", "tensor(string)": "BYTES"}


def describe_graph(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The graph's inputs and outputs as config.yaml tensors; raises ValueError naming what ONNX Runtime
    could not load or a datatype KServe cannot carry."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for every kind of bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: not a loadable ONNX model ({first[:200]})") from None

    def tensors(nodes: Any, kind: str) -> list[dict[str, Any]]:
        found = []
        for node in nodes:
            if node.type not in ONNX_DATATYPES:
                raise ValueError(f"{path}: {kind} {node.name!r} is {node.type}, which KServe tensors cannot carry")
            dims = [d if isinstance(d, int) and d >= 0 else -1 for d in node.shape]
            found.append({"name": node.name, "datatype": ONNX_DATATYPES[node.type], "dims": dims})
        return found

    return tensors(session.get_inputs(), "input"), tensors(session.get_outputs(), "output")


def batches_on_first_axis(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> bool:
    """Whether requests can be concatenated: a dynamic first dimension on every input and output."""
    return all(t["dims"] and t["dims"][0] == -1 for t in [*inputs, *outputs])


class TensorModel(LoadedModel):
    computes_inline = True
    def __init__(self, config: ModelConfig, version: str, backend: str, runners: dict[str, GraphRunner],
                 on_batch: Any) -> None:
        super().__init__(config, version, backend, runners, on_batch)
        specs = [t.model_dump() for t in (*config.inputs, *config.outputs)]
        self.batched = config.max_batch_size > 1 and batches_on_first_axis(specs, [])
        self.output_names = [t.name for t in config.outputs]

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Inputs in the graph's datatypes and shapes; with the batch size they carry (1 when unbatched)."""
        batch = None
        for spec in self.config.inputs:
            array, where = inputs[spec.name], f"inputs.{spec.name}"
            check_spec(array, spec, where)
            if self.batched:
                if batch is not None and array.shape[0] != batch:
                    raise RequestError(f"{where}: batch of {array.shape[0]}, other inputs have {batch}")
                batch = array.shape[0]
        if batch is not None and not 1 <= batch <= self.config.max_batch_size:
            raise RequestError(f"inputs: batch of {batch}, the limit is 1 to {self.config.max_batch_size}")
        return inputs, batch or 1

    async def infer(self, inputs: dict[str, np.ndarray], deadline: float | None) -> dict[str, np.ndarray]:
        feeds, size = self.check_inputs(inputs)
        result: dict[str, np.ndarray] = await self.batcher.submit(feeds, size=size if self.batched else 1,
                                                                  deadline=deadline)
        return result

    def _run_batch(self, payloads: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        runner = self.runners["model"]
        if len(payloads) == 1:
            return [dict(zip(self.output_names, runner.run(self.output_names, payloads[0]), strict=True))]
        feeds = {name: np.concatenate([p[name] for p in payloads]) for name in payloads[0]}
        outputs = runner.run(self.output_names, feeds)
        cuts = np.cumsum([len(next(iter(p.values()))) for p in payloads])[:-1]
        pieces = [np.split(o, cuts) for o in outputs]
        return [{name: pieces[k][i] for k, name in enumerate(self.output_names)} for i in range(len(payloads))]

    async def warm_up(self) -> None:
        await self.infer({t.name: zeros(t) for t in self.config.inputs}, None)


def check_spec(array: np.ndarray, spec: TensorSpec, where: str) -> None:
    expected = DTYPES[spec.datatype]
    if array.dtype != expected and not (spec.datatype == "BYTES" and array.dtype == np.object_):
        raise RequestError(f"{where}: datatype {array.dtype} does not match the model's {spec.datatype}")
    if array.ndim != len(spec.dims) or any(d != -1 and d != n for d, n in zip(spec.dims, array.shape, strict=True)):
        raise RequestError(f"{where}: shape {list(array.shape)} does not match {spec.dims} (-1: any size)")
    if array.size == 0:
        raise RequestError(f"{where}: shape {list(array.shape)} holds no element")


def zeros(spec: TensorSpec) -> np.ndarray:
    """The smallest valid input: 1 for every dynamic dimension (the warm-up request)."""
    shape = [1 if d == -1 else d for d in spec.dims]
    if spec.datatype == "BYTES":
        return np.full(shape, b"", dtype=np.object_)
    return np.zeros(shape, DTYPES[spec.datatype])
