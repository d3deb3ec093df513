"""Parity of an exported graph with its PyTorch source, on random and on real inputs.

Tolerances: fp32 logits within ``FP32_TOLERANCE`` max-abs; translator greedy
tokens identical. Reduced-precision variants report their error and task
accuracy instead of being held to the fp32 bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np
import onnxruntime as ort
import torch
from transerve.generation import GenerationRules
from transerve.models.transformer import Seq2SeqTransformer
from transerve.models.vit import ViT
from transerve.server.engine.seq2seq import OrtSeq2Seq, pad_ids

FP32_TOLERANCE: Final = 1e-4


def run_vit(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


@torch.no_grad()
def torch_logits(model: ViT, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([model(torch.from_numpy(images[i:i + batch_size])).numpy()
                           for i in range(0, len(images), batch_size)])


def verify_vit(model: ViT, session: ort.InferenceSession, images: np.ndarray | None,
               labels: np.ndarray | None) -> dict[str, Any]:
    """Random-input and real-input parity, and accuracy of both on the real inputs."""
    cfg = model.config
    rng = np.random.default_rng(0)
    random_images = rng.standard_normal((8, cfg.in_chans, cfg.image_size, cfg.image_size)).astype(np.float32)
    random_diff = float(np.abs(run_vit(session, random_images) - torch_logits(model, random_images)).max())
    parity: dict[str, Any] = {"random_max_abs_diff": random_diff, "max_abs_diff": random_diff,
                              "tokens_equal": None}
    accuracy: dict[str, Any] = {}
    if images is not None and labels is not None:
        onnx_out, torch_out = run_vit(session, images), torch_logits(model, images)
        parity["real_max_abs_diff"] = float(np.abs(onnx_out - torch_out).max())
        parity["max_abs_diff"] = max(random_diff, parity["real_max_abs_diff"])
        accuracy = {"metric": "test_accuracy", "examples": len(labels),
                    "pytorch": float((torch_out.argmax(-1) == labels).mean()),
                    "onnx": float((onnx_out.argmax(-1) == labels).mean())}
    return {"parity": parity, "accuracy": accuracy}


@torch.no_grad()
def translator_logit_diff(model: Seq2SeqTransformer, seq2seq: OrtSeq2Seq, steps: int = 4) -> float:
    """Encoder K/V and teacher-forced decoder-step logits, ORT vs PyTorch, on random ragged sources."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    rows = [[*torch.randint(4, cfg.vocab_size, (n,), generator=g).tolist(), cfg.eos_id] for n in (3, 9, 6, 1)]
    ids, mask = pad_ids(rows, cfg.pad_id)
    keep = torch.from_numpy(mask).bool()
    cross_t = model.memory_kv(model.encode(torch.from_numpy(ids), keep))
    cross = seq2seq.encode(ids, mask)
    diff = max(float(np.abs(c - t.numpy()).max()) for c, t in zip(cross, [x for kv in cross_t for x in kv],
                                                                  strict=True))
    tokens = torch.randint(4, cfg.vocab_size, (len(rows), steps), generator=g)
    tokens[:, 0] = cfg.bos_id
    past, past_t = seq2seq.empty_cache(len(rows)), None
    for t in range(steps):
        logits, past = seq2seq.step(tokens[:, t].numpy(), mask, past, cross)
        logits_t, past_t = model.decode(tokens[:, t:t + 1], cross_t, keep, past_t)
        diff = max(diff, float(np.abs(logits - logits_t[:, -1].numpy()).max()))
    return diff


def verify_translator(model: Seq2SeqTransformer, seq2seq: OrtSeq2Seq, sources: Sequence[Sequence[int]],
                      references: Sequence[str] | None, decode: Callable[[list[list[int]]], list[str]],
                      max_new_tokens: int, batch_size: int = 128, rules: GenerationRules | None = None
                      ) -> dict[str, Any]:
    """Logit parity, greedy-token equality with PyTorch (both under the model's generation rules), and exact
    match against references."""
    from transerve.models.decoding import translate_ids

    cfg = model.config
    onnx_out: list[list[int]] = []
    torch_out: list[list[int]] = []
    for i in range(0, len(sources), batch_size):
        ids, mask = pad_ids(sources[i:i + batch_size], cfg.pad_id)
        onnx_out += seq2seq.generate(ids, mask, max_new_tokens)
        torch_out += translate_ids(model, torch.from_numpy(ids), torch.from_numpy(mask).bool(), max_new_tokens,
                                   rules=rules or GenerationRules())
    parity = {"max_abs_diff": translator_logit_diff(model, seq2seq),
              "tokens_equal": onnx_out == torch_out,
              "sequences_compared": len(sources),
              "sequences_differing": sum(a != b for a, b in zip(onnx_out, torch_out, strict=True))}
    accuracy: dict[str, Any] = {}
    if references is not None:
        refs = list(references)
        accuracy = {"metric": "exact_match", "examples": len(refs),
                    "pytorch": float(np.mean([a == b for a, b in zip(decode(torch_out), refs, strict=True)])),
                    "onnx": float(np.mean([a == b for a, b in zip(decode(onnx_out), refs, strict=True)]))}
    return {"parity": parity, "accuracy": accuracy}
