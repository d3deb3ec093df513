"""Graph passes over ``onnx.ModelProto``; each returns a :class:`PassResult` saying what it changed."""

from __future__ import annotations

import onnx
from transerve.export.passes.cleanup import cleanup
from transerve.export.passes.fold_batchnorm import fold_batchnorm
from transerve.export.passes.fuse_attention import Target, count_attention, fuse_attention
from transerve.export.passes.fuse_norm_act import fuse_gelu, fuse_layernorm
from transerve.export.passes.graph import PassResult, op_counts


class PassError(ValueError):
    """A pass that must fully apply left something behind."""


def optimize(model: onnx.ModelProto, target: Target, expected_attention: int) -> list[PassResult]:
    """Run every pass in order, in place; fail loudly when BN folding or attention fusion is incomplete."""
    results = [fold_batchnorm(model), fuse_layernorm(model), fuse_gelu(model)]
    try:
        results.append(fuse_attention(model, target, expected_attention))
    except ValueError as e:
        raise PassError(str(e)) from None
    results.append(cleanup(model))
    left = op_counts(model).get("BatchNormalization", 0)
    if left:
        raise PassError(f"fold_batchnorm left {left} BatchNormalization node(s): {results[0].warnings}")
    return results


__all__ = ["PassError", "PassResult", "Target", "cleanup", "count_attention", "fold_batchnorm", "fuse_attention",
           "fuse_gelu", "fuse_layernorm", "op_counts", "optimize"]
