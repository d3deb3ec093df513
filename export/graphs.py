"""torch → ONNX: the graphs the server runs.

* ViT → ``model.onnx``: ``images [N, 3, H, W] → logits [N, classes]``, traced from
  ``ViT.forward_class_token`` (the last block computed for the class token only).
* Translator → ``encoder.onnx``: ``input_ids, attention_mask [N, S] →
  cross_k_i, cross_v_i [N, H, S, D]`` — the cross-attention K/V of every
  decoder layer, computed once per source, so no decoder step repeats them;
  and ``decoder_step_ragged.onnx``: ``input_ids, positions [N], attention_mask
  [N, S], past_mask [N, P], past_k_i/past_v_i [N, H, P, D] (P ≥ 1),
  cross_k_i/cross_v_i → logits [N, V], present_k_i/present_v_i [N, H, P + 1, D]``
  — rows at different lengths for continuous batching, and a uniform batch
  (one masked slot to start) for request-level batching, so the decoder is
  stored once. ``export_translator`` still makes the plain ``decoder_step``
  (no positions, no cache mask) for comparisons. ``decoder_score.onnx``:
  teacher forcing for scores and word alignment — ``input_ids, target_ids
  [N, T]`` (T ≥ 2), ``attention_mask``, cross K/V → ``token_log_probs [N, T]``
  (each target token's log-probability) and ``cross_attention [N, L, T, S]``
  (every layer's cross-attention weights, averaged over heads); ``decoder_align.onnx``: the alignment layer's
  cross-attention alone, from the layers up to it (no output projection).

Opset 23, deliberately: torch's exporter turns each
``F.scaled_dot_product_attention`` into one ONNX ``Attention`` node, which
ONNX Runtime 1.31 runs natively on CPU and TensorRT ≥ 10.14 parses, and it
keeps ``LayerNormalization`` and ``Gelu`` as single ops. At opset ≤ 20 the
same call is lowered to MatMul→Softmax→MatMul with Shape/Slice/Reshape glue,
which measured ~25 % slower on ORT CPU for the digits ViT (bench/RESULTS.md).
The TensorRT target rebuilds that lowered form where it needs it
(``fuse_attention(target="tensorrt-legacy")``).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import onnx
import torch
from torch import Tensor, nn
from torch.export import Dim
from transerve.models.attention import KVCache
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.models.vit import ViT

log = logging.getLogger(__name__)

OPSET: Final = 23
MAX_BATCH: Final = 4096


def _export(module: nn.Module, args: tuple, dynamic_shapes: dict, input_names: list[str],
            output_names: list[str], opset: int = OPSET) -> onnx.ModelProto:
    """Dynamo export to one self-contained ModelProto (weights inline, not external data)."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision ops
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's axis-renaming chatter
        program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=opset,
                                    dynamic_shapes=dynamic_shapes, input_names=input_names,
                                    output_names=output_names, verbose=False)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    with tempfile.TemporaryDirectory() as tmp:  # the in-memory proto may point at lazily held tensors
        path = Path(tmp) / "model.onnx"
        program.save(str(path), external_data=False)
        return onnx.load_model(str(path))


class ClassTokenGraph(nn.Module):
    """The ViT as served: ``forward_class_token`` (the last block only for the token the head reads)."""

    def __init__(self, model: ViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.forward_class_token(images)


def export_vit(model: ViT, opset: int = OPSET, class_token_only: bool = True) -> onnx.ModelProto:
    """``opset`` other than 23 is for comparisons (bench/): the passes expect opset 23. ``class_token_only``
    exports ``ViT.forward_class_token`` — the same logits with ~5/6 of the last block's work skipped;
    False exports ``forward`` as written (the benchmark's plain-exporter pipelines)."""
    cfg = model.config
    images = torch.randn(2, cfg.in_chans, cfg.image_size, cfg.image_size)  # batch ≥ 2: torch specialises 0 and 1
    batch = Dim("batch", min=1, max=MAX_BATCH)
    graph = ClassTokenGraph(model) if class_token_only else model
    return _export(graph, (images,), {"images": {0: batch}}, ["images"], ["logits"], opset)


class EncoderGraph(nn.Module):
    """Source ids → every decoder layer's cross-attention K/V."""

    def __init__(self, model: Seq2SeqTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        memory = self.model.encode(input_ids, attention_mask.bool())
        return [t for kv in self.model.memory_kv(memory) for t in kv]


class DecoderStepGraph(nn.Module):
    """One decoder step with the self-attention cache in and out."""

    def __init__(self, model: Seq2SeqTransformer) -> None:
        super().__init__()
        self.model = model
        self.layers = model.config.num_decoder_layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor, past: list[Tensor],
                cross: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        past_kv: list[KVCache] = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        cross_kv: list[KVCache] = [(cross[2 * i], cross[2 * i + 1]) for i in range(self.layers)]
        logits, present = self.model.decode(input_ids, cross_kv, attention_mask.bool(), past_kv)
        return logits[:, -1], [t for kv in present for t in kv]


class RaggedDecoderStepGraph(nn.Module):
    """One step for rows at different lengths (continuous batching): per-row positions and a cache mask."""

    def __init__(self, model: Seq2SeqTransformer) -> None:
        super().__init__()
        self.model = model
        self.layers = model.config.num_decoder_layers

    def forward(self, input_ids: Tensor, positions: Tensor, attention_mask: Tensor, past_mask: Tensor,
                past: list[Tensor], cross: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        past_kv: list[KVCache] = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        cross_kv: list[KVCache] = [(cross[2 * i], cross[2 * i + 1]) for i in range(self.layers)]
        logits, present = self.model.decode_step_ragged(input_ids, positions, cross_kv, attention_mask.bool(),
                                                        past_kv, past_mask.bool())
        return logits, [t for kv in present for t in kv]


class ScoreGraph(nn.Module):
    """Teacher forcing over a finished translation: each target token's log-probability and where every layer's
    cross-attention looked — one parallel pass, not a decode."""

    def __init__(self, model: Seq2SeqTransformer) -> None:
        super().__init__()
        self.model = model
        self.layers = model.config.num_decoder_layers

    def forward(self, input_ids: Tensor, target_ids: Tensor, attention_mask: Tensor,
                cross: list[Tensor]) -> tuple[Tensor, Tensor]:
        cross_kv: list[KVCache] = [(cross[2 * i], cross[2 * i + 1]) for i in range(self.layers)]
        weights: list[Tensor] = []
        logits, _ = self.model.decode(input_ids, cross_kv, attention_mask.bool(), None, weights)
        log_probs = logits.log_softmax(dim=-1).gather(-1, target_ids[..., None])[..., 0]  # [N, T]
        return log_probs, torch.stack([w.mean(dim=1) for w in weights], dim=1)  # [N, L, T, S]


class AlignGraph(nn.Module):
    """Teacher forcing through the alignment layer only: its cross-attention, averaged over heads."""

    def __init__(self, model: Seq2SeqTransformer, layer: int) -> None:
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, input_ids: Tensor, attention_mask: Tensor, cross: list[Tensor]) -> Tensor:
        cross_kv: list[KVCache] = [(cross[2 * i], cross[2 * i + 1]) for i in range(self.layer + 1)]
        return self.model.cross_attention(input_ids, cross_kv, attention_mask.bool(), self.layer).mean(dim=1)


@dataclass
class _StepExample:
    """What both decoder-step exports share: example caches (batch 2, source 5, cache 3) and dynamic dims."""

    layers: int
    batch: Dim
    src: Dim
    past: Dim
    caches: tuple[list[Tensor], list[Tensor]]  # (past, cross) K/V, flattened as kv_names orders them
    cache_shapes: dict[str, list[dict[int, Dim]]]


def _step_example(cfg: TransformerConfig, past_min: int) -> _StepExample:
    layers, heads, head_dim = cfg.num_decoder_layers, cfg.num_heads, cfg.d_model // cfg.num_heads
    batch = Dim("batch", min=1, max=MAX_BATCH)
    src = Dim("src_len", min=1, max=cfg.max_len)
    past = Dim("past_len", min=past_min, max=cfg.max_len - 1)
    caches = ([torch.randn(2, heads, 3, head_dim) for _ in range(2 * layers)],
              [torch.randn(2, heads, 5, head_dim) for _ in range(2 * layers)])
    shapes = {"past": [{0: batch, 2: past}] * (2 * layers), "cross": [{0: batch, 2: src}] * (2 * layers)}
    return _StepExample(layers, batch, src, past, caches, shapes)


def export_ragged_step(model: Seq2SeqTransformer, opset: int = OPSET) -> onnx.ModelProto:
    """``decoder_step_ragged``: ``input_ids, positions [N]``, ``attention_mask [N, S]``, ``past_mask [N, P]``,
    past/cross K/V → ``logits [N, V]``, present K/V ``[N, H, P + 1, D]`` — the step a continuous-batching
    scheduler runs over sequences of different lengths."""
    cfg = model.config
    ex = _step_example(cfg, past_min=1)
    args = (torch.randint(4, cfg.vocab_size, (2,)), torch.tensor([3, 1]), torch.ones(2, 5, dtype=torch.long),
            torch.ones(2, 3, dtype=torch.long), *ex.caches)
    shapes = {"input_ids": {0: ex.batch}, "positions": {0: ex.batch}, "attention_mask": {0: ex.batch, 1: ex.src},
              "past_mask": {0: ex.batch, 1: ex.past}, **ex.cache_shapes}
    return _export(RaggedDecoderStepGraph(model.eval()), args, shapes,
                   ["input_ids", "positions", "attention_mask", "past_mask", *kv_names("past", ex.layers),
                    *kv_names("cross", ex.layers)], ["logits", *kv_names("present", ex.layers)], opset)


def export_score(model: Seq2SeqTransformer, opset: int = OPSET) -> onnx.ModelProto:
    """``decoder_score`` (see the module's docstring): T ≥ 2, since a one-token decode takes the cache-free path
    with no causal mask — the scorer pads a one-token target with one more position."""
    cfg = model.config
    ex = _step_example(cfg, past_min=0)
    tgt = Dim("tgt_len", min=2, max=cfg.max_len)
    ids, targets = torch.randint(4, cfg.vocab_size, (2, 4)), torch.randint(4, cfg.vocab_size, (2, 4))
    shapes = {"input_ids": {0: ex.batch, 1: tgt}, "target_ids": {0: ex.batch, 1: tgt},
              "attention_mask": {0: ex.batch, 1: ex.src}, "cross": ex.cache_shapes["cross"]}
    return _export(ScoreGraph(model.eval()), (ids, targets, torch.ones(2, 5, dtype=torch.long), ex.caches[1]),
                   shapes, ["input_ids", "target_ids", "attention_mask", *kv_names("cross", ex.layers)],
                   ["token_log_probs", "cross_attention"], opset)


def export_align(model: Seq2SeqTransformer, layer: int, opset: int = OPSET) -> onnx.ModelProto:
    """``decoder_align``: ``input_ids [N, T]`` (T ≥ 2), ``attention_mask``, the cross K/V of layers ``0 … layer``
    → ``cross_attention [N, T, S]`` — word alignment without the layers above or the output projection (the
    larger part of a translator's decoder cost)."""
    cfg = model.config
    ex = _step_example(cfg, past_min=0)
    tgt = Dim("tgt_len", min=2, max=cfg.max_len)
    names = kv_names("cross", layer + 1)
    shapes = {"input_ids": {0: ex.batch, 1: tgt}, "attention_mask": {0: ex.batch, 1: ex.src},
              "cross": ex.cache_shapes["cross"][:len(names)]}
    return _export(AlignGraph(model.eval(), layer), (torch.randint(4, cfg.vocab_size, (2, 4)),
                                                     torch.ones(2, 5, dtype=torch.long), ex.caches[1][:len(names)]),
                   shapes, ["input_ids", "attention_mask", *names], ["cross_attention"], opset)


def kv_names(prefix: str, layers: int) -> list[str]:
    """``prefix_k_0, prefix_v_0, prefix_k_1, …`` — the flattened cache order."""
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in ("k", "v")]


def export_encoder(model: Seq2SeqTransformer, opset: int = OPSET) -> onnx.ModelProto:
    """``encoder`` with dynamic batch and source length (opset: as export_vit)."""
    cfg = model.config
    ex = _step_example(cfg, past_min=0)
    ids = torch.randint(4, cfg.vocab_size, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    return _export(EncoderGraph(model.eval()), (ids, mask),
                   {"input_ids": {0: ex.batch, 1: ex.src}, "attention_mask": {0: ex.batch, 1: ex.src}},
                   ["input_ids", "attention_mask"], kv_names("cross", ex.layers), opset)


def export_translator(model: Seq2SeqTransformer, opset: int = OPSET) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(encoder, decoder_step) with dynamic batch, source length and cache length: the plain step (no positions,
    no cache mask), for comparisons in bench/ and tests; repositories carry ``decoder_step_ragged`` only."""
    cfg = model.config
    ex = _step_example(cfg, past_min=0)
    ids = torch.randint(4, cfg.vocab_size, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    encoder = export_encoder(model, opset)
    step_shapes = {"input_ids": {0: ex.batch}, "attention_mask": {0: ex.batch, 1: ex.src}, **ex.cache_shapes}
    decoder = _export(DecoderStepGraph(model), (ids[:, :1], mask, *ex.caches), step_shapes,
                      ["input_ids", "attention_mask", *kv_names("past", ex.layers), *kv_names("cross", ex.layers)],
                      ["logits", *kv_names("present", ex.layers)], opset)
    return encoder, decoder
