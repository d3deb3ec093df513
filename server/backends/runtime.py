"""Runtime backends: one small interface, three implementations.

A *graph runner* runs one graph of a repository entry with the signature of
``onnxruntime.InferenceSession.run`` — ``run(output_names | None, feeds) ->
list[np.ndarray]`` — so the decoding code written against ORT sessions
(``transerve.server.engine.seq2seq``) drives every backend unchanged.

* ``onnxruntime`` — CPU by default; CUDA / TensorRT execution providers when
  onnxruntime-gpu provides them. Which precision variant it runs (and whether OpenVINO runs the bf16 one
  instead) is :mod:`transerve.server.backends.precision`'s choice.
* ``tensorrt`` — native engines (``<graph>.plan`` from ``transerve engine build``), GPU only; CUDA buffers
  from cuda-python (:mod:`transerve.server.backends.tensorrt_runner`), no torch.
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
from typing import Literal

from transerve.server.backends.lazy_runner import LazyRunner
from transerve.server.backends.openvino_runner import OpenVinoRunner
from transerve.server.backends.precision import PrecisionName, choose, read_variants
from transerve.server.backends.prepared_graphs import PreparedGraphs
from transerve.server.backends.private_weights import private_weights
from transerve.server.backends.runner import GraphRunner
from transerve.server.backends.sessions import OrtRunner, ort_providers
from transerve.server.exceptions import BackendError, PrecisionError

log = logging.getLogger(__name__)

BackendName = Literal["auto", "onnxruntime", "tensorrt", "torch"]


def tensorrt_ready(vdir: Path, graphs: Sequence[str]) -> tuple[bool, str]:
    if importlib.util.find_spec("tensorrt") is None:
        return False, "TensorRT is not installed"
    missing = [g for g in graphs if not (vdir / f"{g}.plan").is_file()]
    if missing:
        return False, f"no engine for {missing} (run `transerve engine build`)"
    if importlib.util.find_spec("cuda") is None:
        return False, "cuda-python is not installed (pip install 'transerve[gpu]')"
    from transerve.server.backends.tensorrt_runner import gpu_count

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
                 spinning: bool = False, precision: PrecisionName = "auto", small_batches: int = 0,
                 aux: dict[str, str] | None = None, prepared: PreparedGraphs | None = None) -> Runtime:
    """The runtime for an entry's version folder: TensorRT engines where they and a GPU exist (``auto``), the
    torch reference when asked for, else the precision variant :func:`transerve.server.backends.precision.choose`
    picks (ONNX Runtime, or OpenVINO for bf16). ``small_batches``: the batch limit of a model whose graphs
    take a one-thread session for small batches where that measures faster (0: none). ``aux``: graphs that run
    on ONNX Runtime's CPU provider in fp32 whatever serves the rest (a translator's scoring graph), added to the
    runners under their names. ``prepared``: where ONNX Runtime CPU sessions keep and find their optimised,
    prepacked copies (:mod:`transerve.server.backends.prepared_graphs`)."""
    aux = aux or {}
    for filename in aux.values():
        if not (vdir / filename).is_file():
            raise BackendError(f"{vdir / filename}: missing")
    if backend in ("auto", "tensorrt"):
        ready, why = tensorrt_ready(vdir, list(files))
        if ready:
            log.info("%s: backend tensorrt (%s)", vdir, why)
            from transerve.server.backends.tensorrt_runner import TensorRTRunner

            engines: dict[str, GraphRunner] = {g: TensorRTRunner(vdir / f"{g}.plan") for g in files}
            return Runtime("tensorrt", {**engines, **_aux_runners(vdir, aux, threads)}, "engine", why)
        if backend == "tensorrt":
            raise BackendError(f"{vdir}: backend tensorrt unavailable: {why}")
        log.info("%s: not tensorrt: %s", vdir, why)
    if backend == "torch":
        from transerve.server.backends.torch_backend import torch_runners

        return Runtime("torch", {**torch_runners(vdir, files), **_aux_runners(vdir, aux, threads)}, "fp32",
                       "backend torch asked for")
    try:
        choice = choose(precision, files, read_variants(vdir))
    except PrecisionError as e:
        raise BackendError(f"{vdir}: {e}") from None
    for filename in choice.files.values():
        if not (vdir / filename).is_file():
            raise BackendError(f"{vdir / filename}: missing")
    log.info("%s: precision %s on %s: %s", vdir, choice.precision, choice.runtime, choice.reason)
    if choice.runtime == "openvino":
        with private_weights(vdir, choice.files.values()) as folder:  # copied: files changing cannot reach it
            runners: dict[str, GraphRunner] = {g: OpenVinoRunner(folder / f, threads, "bf16")
                                               for g, f in choice.files.items()}
        return Runtime("openvino", {**runners, **_aux_runners(vdir, aux, threads)}, choice.precision,
                       choice.reason)
    providers, why = ort_providers()
    log.info("%s: backend onnxruntime (%s)", vdir, why)
    cpu_only = providers == ["CPUExecutionProvider"]
    runners = _ort_runners(vdir, choice.files, threads, providers, spinning, small_batches,
                           prepared if cpu_only else None)
    return Runtime("onnxruntime", {**runners, **_aux_runners(vdir, aux, threads)}, choice.precision, choice.reason)


def _ort_runners(vdir: Path, files: dict[str, str], threads: int, providers: list[str], spinning: bool,
                 small_batches: int, prepared: PreparedGraphs | None) -> dict[str, GraphRunner]:
    """Sessions from the prepared copies of ``files`` where every one has one, else from a private copy of
    the folder (saving prepared copies on a graph's second load)."""
    found = {g: prepared.ready(vdir, f) for g, f in files.items()} if prepared is not None else {}
    copies = {g: path for g, path in found.items() if path is not None}
    if files and len(copies) == len(files):
        log.info("%s: sessions from prepared graphs", vdir)
        return {g: OrtRunner(path, threads, providers, spinning, small_batches, prepared=True)
                for g, path in copies.items()}
    with private_weights(vdir, files.values()) as folder:  # copied: files changing on disk cannot reach it
        saves = {g: prepared.wanted(vdir, f) if prepared is not None else None for g, f in files.items()}
        runners: dict[str, GraphRunner] = {g: OrtRunner(folder / f, threads, providers, spinning, small_batches,
                                                        save_to=saves[g]) for g, f in files.items()}
    if prepared is not None:
        prepared.commit(p for p in saves.values() if p is not None)
    return runners


def _aux_runners(vdir: Path, aux: dict[str, str], threads: int) -> dict[str, GraphRunner]:
    """``aux``'s graphs on ONNX Runtime's CPU provider, each made on its first use (:mod:`lazy_runner`) from a
    private copy of what it reads."""
    def make(filename: str) -> GraphRunner:
        with private_weights(vdir, [filename]) as folder:
            return OrtRunner(folder / filename, threads, ["CPUExecutionProvider"])

    return {g: LazyRunner(lambda f=f: make(f), [vdir / f, vdir / "weights.bin"])  # type: ignore[misc]
            for g, f in aux.items()}
