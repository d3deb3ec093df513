"""Fold inference-mode BatchNormalization into neighbouring weights.

At inference BN is the per-channel affine map ``y = s·x + t`` with
``s = γ / √(var + ε)`` and ``t = β − s·μ``, so it disappears into a linear
layer on either side:

```
 backward (BN after the layer)            forward (BN before the layer)
   x ─ MatMul(W) ─ [Add(b)] ─ [Reshape] ─ BN      x ─ BN ─ [Reshape | Gather] ─ MatMul(W) ─ [Add(b)]
   x ─ Conv(W, b) ─ BN                            x ─ BN ─ [Reshape | Gather] ─ Gemm(W, b)
   W' = W·s (per output channel)                  W' = diag(s)·W   (per input channel)
   b' = s·b + t                                   b' = t·W + b
```

Each neighbourhood is one :class:`Variant` in ``VARIANTS``: its path written
as data (:class:`~transerve.export.passes.graph.Step`, matched by
``match_parent_path`` / ``match_child_path`` as ONNX Runtime's fusions do) and
a fold that absorbs ``s`` and ``t``. The chain between BN and the layer may
only hold reshapes (and, going forward, a Gather over a non-channel axis),
each with a single consumer, and the weights must be used by that layer alone. A BN that fits neither pattern
becomes an explicit per-channel ``Mul`` + ``Add`` and a warning names it, so
no ``BatchNormalization`` node is ever left behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper
from transerve.export.passes.graph import (
    GraphIndex,
    PassResult,
    Step,
    attribute,
    match_child_path,
    match_parent_path,
)

_PASS_THROUGH = ("Reshape", "Flatten")


def bn_affine(index: GraphIndex, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) of an inference BN whose parameters are constants."""
    params = [index.constant(name) for name in bn.input[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)  # type: ignore[arg-type]
    eps = attribute(bn, "epsilon", 1e-5)
    s = gamma / np.sqrt(var + eps)
    return s, beta - s * mean


def _is_token_gather(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Gather that picks along an axis other than the last (the channel axis for [.., C] data)."""
    if node.op_type != "Gather":
        return False
    rank = index.ranks.get(node.input[0])
    axis = attribute(node, "axis", 0)
    return rank is not None and axis % rank != rank - 1


def _gemm_plain(index: GraphIndex, node: onnx.NodeProto) -> bool:
    return attribute(node, "transA", 0) == 0 and attribute(node, "alpha", 1.0) == attribute(node, "beta", 1.0) == 1.0


RESHAPES = Step(_PASS_THROUGH, 0, repeat=True)
RESHAPES_OR_TOKEN_GATHER = Step((*_PASS_THROUGH, "Gather"), 0, repeat=True,
                                when=lambda index, node: node.op_type != "Gather" or _is_token_gather(index, node))
Fold = Callable[[GraphIndex, onnx.NodeProto, np.ndarray, np.ndarray, list[onnx.NodeProto]], bool]


@dataclass(frozen=True)
class Variant:
    """One foldable neighbourhood: the path from the BN to the layer, and how the layer absorbs ``s``, ``t``.
    ``fold`` gets the matched nodes (nearest the BN first) and may still refuse on shapes (returns False)."""

    key: str
    forward: bool  # the BN feeds the layer (else the layer feeds the BN)
    path: tuple[Step, ...]
    fold: Fold


def _layer(nodes: list[onnx.NodeProto]) -> onnx.NodeProto:
    return nodes[-1]


def _private_weight(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    return index.constant(node.input[1]) if index.is_private(node.input[1]) else None


def _fold_into_conv(index: GraphIndex, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray,
                    nodes: list[onnx.NodeProto]) -> bool:
    """``x ─ Conv(W, b) ─ [reshapes] ─ BN``: W' = W·s per output channel, b' = s·b + t."""
    conv = _layer(nodes)
    w = _private_weight(index, conv)
    if w is None or w.shape[0] != s.shape[0]:
        return False
    index.set_constant(conv.input[1], w * s.reshape(-1, *([1] * (w.ndim - 1))))
    bias = index.constant(conv.input[2]) if len(conv.input) > 2 else np.zeros_like(s)
    if len(conv.input) > 2 and index.is_private(conv.input[2]):
        index.set_constant(conv.input[2], bias * s + t)
    else:
        conv.input[2:] = [index.add_constant((bias * s + t).astype(np.float32), "folded_bias")]
    return _drop(index, bn)


def _fold_into_matmul_add(index: GraphIndex, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray,
                          nodes: list[onnx.NodeProto]) -> bool:
    """``x ─ MatMul(W) ─ Add(b) ─ [reshapes] ─ BN``: W' = W·s, b' = s·b + t."""
    add, matmul = nodes[-2], nodes[-1]
    bias_name = next((i for i in add.input if index.is_private(i)), None)
    w = _private_weight(index, matmul)
    bias = index.constant(bias_name) if bias_name is not None else None
    if w is None or bias is None or w.shape[-1] != s.shape[0] or bias.shape[-1:] != s.shape:
        return False
    index.set_constant(matmul.input[1], w * s)
    index.set_constant(bias_name, bias * s + t)  # type: ignore[arg-type]
    return _drop(index, bn)


def _fold_into_matmul(index: GraphIndex, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray,
                      nodes: list[onnx.NodeProto]) -> bool:
    """``x ─ MatMul(W) ─ [reshapes] ─ BN``: W' = W·s, and BN's shift becomes an Add."""
    matmul = _layer(nodes)
    w = _private_weight(index, matmul)
    if w is None or w.shape[-1] != s.shape[0]:
        return False
    index.set_constant(matmul.input[1], w * s)
    index.insert_after(bn, helper.make_node("Add", [bn.input[0], index.add_constant(t.astype(np.float32),
                                                                                     "folded_bias")], [bn.output[0]]))
    index.remove(bn)
    return True


def _fold_forward_matmul(index: GraphIndex, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray,
                         nodes: list[onnx.NodeProto]) -> bool:
    """``x ─ BN ─ [reshapes | token Gather] ─ MatMul(W) ─ [Add(b)]``: W' = diag(s)·W, b' = t·W + b."""
    matmul = _layer(nodes)
    w = _private_weight(index, matmul)
    if w is None or w.ndim != 2 or w.shape[0] != s.shape[0]:
        return False
    index.set_constant(matmul.input[1], w * s[:, None])
    shift = t @ w
    add = index.only_consumer(matmul.output[0])
    bias_name = next((i for i in add.input if index.is_private(i)), None) if add is not None else None
    if add is not None and add.op_type == "Add" and bias_name is not None:
        index.set_constant(bias_name, index.constant(bias_name) + shift)  # type: ignore[operator]
    else:
        out = index.fresh_name("folded_bn_shift")
        new_add = helper.make_node("Add", [out, index.add_constant(shift.astype(np.float32), "folded_bias")],
                                   [matmul.output[0]])
        matmul.output[0] = out
        index.producer[out] = matmul
        index.insert_after(matmul, new_add)
    return _drop(index, bn)


def _fold_forward_gemm(index: GraphIndex, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray,
                       nodes: list[onnx.NodeProto]) -> bool:
    """``x ─ BN ─ [reshapes | token Gather] ─ Gemm(W, b)`` (transB either way): as MatMul, into Gemm's C."""
    gemm = _layer(nodes)
    w = _private_weight(index, gemm)
    trans_b = attribute(gemm, "transB", 0)
    if w is None or w.ndim != 2 or (w.shape[1] if trans_b else w.shape[0]) != s.shape[0]:
        return False
    w_in_out = w.T if trans_b else w
    index.set_constant(gemm.input[1], (w_in_out * s[:, None]).T if trans_b else w_in_out * s[:, None])
    shift = t @ w_in_out
    if len(gemm.input) > 2 and index.is_private(gemm.input[2]):
        index.set_constant(gemm.input[2], index.constant(gemm.input[2]) + shift)  # type: ignore[operator]
    else:
        gemm.input[2:] = [index.add_constant(shift.astype(np.float32), "folded_bias")]
    return _drop(index, bn)


def _drop(index: GraphIndex, bn: onnx.NodeProto) -> bool:
    """The BN is absorbed: its consumers read its input."""
    index.rewire(bn.output[0], bn.input[0])
    index.remove(bn)
    return True


# Tried in order; the first whose path matches and whose fold accepts the shapes wins.
VARIANTS = (
    Variant("into_conv", False, (RESHAPES, Step(("Conv",))), _fold_into_conv),
    Variant("into_matmul", False, (RESHAPES, Step(("Add",), None), Step(("MatMul",))), _fold_into_matmul_add),
    Variant("into_matmul", False, (RESHAPES, Step(("MatMul",))), _fold_into_matmul),
    Variant("forward_into_matmul", True, (RESHAPES_OR_TOKEN_GATHER, Step(("MatMul",))), _fold_forward_matmul),
    Variant("forward_into_gemm", True, (RESHAPES_OR_TOKEN_GATHER, Step(("Gemm",), when=_gemm_plain)),
            _fold_forward_gemm),
)


def _fold(index: GraphIndex, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray, result: PassResult) -> bool:
    for variant in VARIANTS:
        nodes = (match_child_path(index, bn.output[0], variant.path) if variant.forward
                 else match_parent_path(index, bn.input[0], variant.path))
        if nodes and variant.fold(index, bn, s, t, nodes):
            result.count(variant.key)
            return True
    return False


def _replace_with_mul_add(index: GraphIndex, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray,
                          result: PassResult) -> None:
    """The fallback: per-channel Mul + Add on axis 1 (the axis BN normalises)."""
    rank = index.ranks.get(bn.input[0], 2)
    shape = (-1, *([1] * (rank - 2)))
    scaled = index.fresh_name("bn_scaled")
    mul = helper.make_node("Mul", [bn.input[0], index.add_constant(s.reshape(shape).astype(np.float32), "bn_scale")],
                           [scaled])
    add = helper.make_node("Add", [scaled, index.add_constant(t.reshape(shape).astype(np.float32), "bn_shift")],
                           [bn.output[0]])
    index.insert_after(bn, mul)
    index.insert_after(bn, add)
    index.remove(bn)
    result.count("to_mul_add")
    result.warnings.append(f"BatchNormalization {bn.name or bn.output[0]!r} has no foldable Conv/MatMul/Gemm "
                           "neighbour; replaced by a per-channel Mul+Add")


def fold_batchnorm(model: onnx.ModelProto) -> PassResult:
    """Fold every BatchNormalization; the result counts where each one went."""
    result = PassResult("fold_batchnorm")
    index = GraphIndex(model)
    for bn in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
        affine = bn_affine(index, bn)
        if affine is None or len(bn.output) > 1:
            result.warnings.append(f"BatchNormalization {bn.name or bn.output[0]!r} is in training mode or has "
                                   "non-constant statistics; left as is")
            continue
        s, t = affine
        if not _fold(index, bn, s, t, result):
            _replace_with_mul_add(index, bn, s, t, result)
    index.commit()
    return result
