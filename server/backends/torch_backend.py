"""The ``torch`` backend: the PyTorch reference behind the runner interface, from the checkpoint ``transerve export
--torch-checkpoint`` wrote to ``<version>/torch``. The one server module that imports torch, ``transerve.models``
and ``transerve.export`` — lazily, inside the functions — so the base install serves every other backend (the
import contracts in pyproject.toml name these imports as the allowed exception)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transerve.server.backends.runner import GraphRunner
from transerve.server.exceptions import BackendError


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


def torch_runners(vdir: Path, files: dict[str, str]) -> dict[str, GraphRunner]:
    if importlib.util.find_spec("torch") is None:
        raise BackendError("backend torch needs PyTorch: pip install 'transerve[export]'")
    from transerve.export.graphs import DecoderStepGraph, EncoderGraph, RaggedDecoderStepGraph, kv_names
    from transerve.models.checkpoint import CheckpointError, load_checkpoint

    model: Any  # a ViT or a Seq2SeqTransformer, told apart by the entry's graphs
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
