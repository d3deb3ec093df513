"""Runtime backends: one small interface, three implementations.

A *graph runner* runs one graph of a repository entry with the signature of
``onnxruntime.InferenceSession.run`` — ``run(output_names | None, feeds) ->
list[np.ndarray]`` — so the decoding code written against ORT sessions
(``transerve.server.seq2seq``) drives every backend unchanged.

* ``onnxruntime`` — CPU by default; CUDA / TensorRT execution providers when
  onnxruntime-gpu provides them. Which precision variant it runs (and whether OpenVINO runs the bf16 one
  instead) is :mod:`transerve.server.precision`'s choice.
* ``tensorrt`` — native engines (``<graph>.plan`` from ``transerve engine build``), GPU only; CUDA buffers
  from cuda-python (:mod:`transerve.server.tensorrt_runner`), no torch.
* ``torch`` — the reference: the PyTorch checkpoint ``transerve export --torch-checkpoint`` wrote to
  ``<version>/torch``. The only backend that imports torch (and ``transerve.models``/``export``), lazily, so the
  base install (no ``export`` extra) serves everything else.

``auto`` picks tensorrt when every plan exists and TensorRT + a GPU are
present, else onnxruntime with the best provider it has, and logs why.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from transerve.server.openvino_runner import OpenVinoRunner
from transerve.server.precision import PrecisionError, PrecisionName, choose, read_variants
from transerve.server.private_weights import private_weights

log = logging.getLogger(__name__)

BackendName = Literal["auto", "onnxruntime", "tensorrt", "torch"]


class BackendError(RuntimeError):
    """The requested backend cannot run this entry here; the message says why."""


class GraphRunner(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class OrtRunner:
    """One ONNX Runtime session; with ``small_batches`` (a batch limit), also a one-thread session for the
    batch sizes where it measures faster (:mod:`transerve.server.small_batches`)."""

    def __init__(self, path: Path, threads: int, providers: list[str], spinning: bool = False,
                 small_batches: int = 0) -> None:
        import onnxruntime as ort
        from transerve.server.seq2seq import session_options

        def make_session(count: int) -> Any:
            return ort.InferenceSession(str(path), session_options(count, spinning=spinning), providers=providers)

        self.session = make_session(threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.single: Any = None
        self.single_up_to = 0  # batches of at most this many items run on ``single``
        if small_batches and threads > 1 and providers == ["CPUExecutionProvider"]:
            from transerve.server.small_batches import single_thread_session

            self.single, self.single_up_to = single_thread_session(path, self.session, make_session, small_batches)

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = list(output_names) if output_names else None
        if self.single is not None and len(feeds[self.input_names[0]]) <= self.single_up_to:
            return list(self.single.run(names, feeds))
        return list(self.session.run(names, feeds))


class TorchRunner:
    """The PyTorch reference behind the same interface (the graph wrappers the exporter traced)."""

    def __init__(self, module: Any, input_names: list[str], output_names: list[str], flat_lists: int,
                 leading: int = 2) -> None:
        self.module = module.eval()
        self.input_names, self.output_names = input_names, output_names
        self.flat_lists = flat_lists  # decoder steps: after `leading` tensors, two lists (past, cross) this long
        self.leading = leading

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names]
        with torch.inference_mode():
            if self.flat_lists:
                n, m = self.flat_lists, self.leading
                out = self.module(*args[:m], args[m:m + n], args[m + n:m + 2 * n])
                flat = [out[0], *out[1]]
            else:
                result = self.module(*args)
                flat = list(result) if isinstance(result, list | tuple) else [result]
        arrays = dict(zip(self.output_names, (t.numpy() for t in flat), strict=True))
        return [arrays[n] for n in (output_names or self.output_names)]


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


def ort_providers() -> tuple[list[str], str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        if provider in available:
            return [provider, "CPUExecutionProvider"], f"onnxruntime has {provider}"
    return ["CPUExecutionProvider"], "onnxruntime CPU (no GPU execution provider installed)"


def tensorrt_ready(vdir: Path, graphs: Sequence[str]) -> tuple[bool, str]:
    if importlib.util.find_spec("tensorrt") is None:
        return False, "TensorRT is not installed"
    missing = [g for g in graphs if not (vdir / f"{g}.plan").is_file()]
    if missing:
        return False, f"no engine for {missing} (run `transerve engine build`)"
    if importlib.util.find_spec("cuda") is None:
        return False, "cuda-python is not installed (pip install 'transerve[gpu]')"
    from transerve.server.tensorrt_runner import gpu_count

    if gpu_count() == 0:
        return False, "no CUDA GPU"
    return True, "TensorRT engines present for every graph"


@dataclass
class Runtime:
    """What serves an entry's version: the backend used, one runner per graph, and the precision chosen."""

    backend: str
    runners: dict[str, GraphRunner]
    precision: str = "fp32"
    reason: str = ""


def load_runners(backend: BackendName, vdir: Path, files: dict[str, str], threads: int = 2,
                 spinning: bool = False, precision: PrecisionName = "auto", small_batches: int = 0) -> Runtime:
    """The runtime for an entry's version folder: TensorRT engines where they and a GPU exist (``auto``), the
    torch reference when asked for, else the precision variant :func:`transerve.server.precision.choose`
    picks (ONNX Runtime, or OpenVINO for bf16). ``small_batches``: the batch limit of a model whose graphs
    take a one-thread session for small batches where that measures faster (0: none)."""
    if backend in ("auto", "tensorrt"):
        ready, why = tensorrt_ready(vdir, list(files))
        if ready:
            log.info("%s: backend tensorrt (%s)", vdir, why)
            from transerve.server.tensorrt_runner import TensorRTRunner

            return Runtime("tensorrt", {g: TensorRTRunner(vdir / f"{g}.plan") for g in files}, "engine", why)
        if backend == "tensorrt":
            raise BackendError(f"{vdir}: backend tensorrt unavailable: {why}")
        log.info("%s: not tensorrt: %s", vdir, why)
    if backend == "torch":
        return Runtime("torch", torch_runners(vdir, files), "fp32", "backend torch asked for")
    try:
        choice = choose(precision, files, read_variants(vdir))
    except PrecisionError as e:
        raise BackendError(f"{vdir}: {e}") from None
    for filename in choice.files.values():
        if not (vdir / filename).is_file():
            raise BackendError(f"{vdir / filename}: missing")
    log.info("%s: precision %s on %s: %s", vdir, choice.precision, choice.runtime, choice.reason)
    with private_weights(vdir) as folder:  # weights copied: files changing on disk cannot reach a served model
        if choice.runtime == "openvino":
            runners: dict[str, GraphRunner] = {g: OpenVinoRunner(folder / f, threads, "bf16")
                                               for g, f in choice.files.items()}
            return Runtime("openvino", runners, choice.precision, choice.reason)
        providers, why = ort_providers()
        log.info("%s: backend onnxruntime (%s)", vdir, why)
        runners = {g: OrtRunner(folder / f, threads, providers, spinning, small_batches)
                   for g, f in choice.files.items()}
        return Runtime("onnxruntime", runners, choice.precision, choice.reason)


def torch_runners(vdir: Path, files: dict[str, str]) -> dict[str, GraphRunner]:
    if importlib.util.find_spec("torch") is None:
        raise BackendError("backend torch needs PyTorch: pip install 'transerve[export]'")
    from transerve.export.graphs import DecoderStepGraph, EncoderGraph, RaggedDecoderStepGraph, kv_names
    from transerve.models.checkpoint import CheckpointError, load_checkpoint

    try:
        model, _ = load_checkpoint(vdir / "torch")
    except CheckpointError as e:
        raise BackendError(f"backend torch needs the PyTorch checkpoint the export writes: {e}") from None
    if "model" in files:
        return {"model": TorchRunner(model, ["images"], ["logits"], 0)}
    layers = model.config.num_decoder_layers
    caches = [*kv_names("past", layers), *kv_names("cross", layers)]
    outputs = ["logits", *kv_names("present", layers)]
    runners: dict[str, GraphRunner] = {
        "encoder": TorchRunner(EncoderGraph(model), ["input_ids", "attention_mask"], kv_names("cross", layers), 0)}
    if "decoder_step_ragged" in files:  # the one step both scheduler modes run
        runners["decoder_step_ragged"] = TorchRunner(
            RaggedDecoderStepGraph(model), ["input_ids", "positions", "attention_mask", "past_mask", *caches],
            outputs, 2 * layers, leading=4)
    else:
        runners["decoder_step"] = TorchRunner(DecoderStepGraph(model), ["input_ids", "attention_mask", *caches],
                                              outputs, 2 * layers)
    return runners
