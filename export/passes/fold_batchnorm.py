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

The chain between BN and the layer may only hold reshapes (and, going
forward, a Gather over a non-channel axis), each with a single consumer, and
the weights must be used by that layer alone. A BN that fits neither pattern
becomes an explicit per-channel ``Mul`` + ``Add`` and a warning names it, so
no ``BatchNormalization`` node is ever left behind.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from transerve.export.passes.graph import GraphIndex, PassResult

_PASS_THROUGH = ("Reshape", "Flatten")


def bn_affine(index: GraphIndex, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) of an inference BN whose parameters are constants."""
    params = [index.constant(name) for name in bn.input[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)  # type: ignore[arg-type]
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    s = gamma / np.sqrt(var + eps)
    return s, beta - s * mean


def _fold_backward(index: GraphIndex, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray,
                   result: PassResult) -> bool:
    """BN after Conv / MatMul(+Add), possibly through reshapes."""
    name, add = bn.input[0], None
    node = index.producer.get(name)
    while node is not None and node.op_type in _PASS_THROUGH and index.only_consumer(name) is not None:
        name = node.input[0]
        node = index.producer.get(name)
    if node is None or index.only_consumer(name) is None:
        return False
    if node.op_type == "Add":
        bias_name = next((i for i in node.input if index.is_private(i)), None)
        add, producer_name = node, next((i for i in node.input if i != bias_name), "")
        node = index.producer.get(producer_name)
        if bias_name is None or node is None or index.only_consumer(producer_name) is None:
            return False
        bias = index.constant(bias_name)
        if bias is None or bias.shape[-1:] != s.shape:
            return False
    if node.op_type == "Conv" and add is None and index.is_private(node.input[1]):
        w = index.constant(node.input[1])
        if w is None or w.shape[0] != s.shape[0]:
            return False
        index.set_constant(node.input[1], w * s.reshape(-1, *([1] * (w.ndim - 1))))
        bias = index.constant(node.input[2]) if len(node.input) > 2 else np.zeros_like(s)
        if len(node.input) > 2 and index.is_private(node.input[2]):
            index.set_constant(node.input[2], bias * s + t)
        else:
            node.input[2:] = [index.add_constant((bias * s + t).astype(np.float32), "folded_bias")]
        result.count("into_conv")
    elif node.op_type == "MatMul" and index.is_private(node.input[1]):
        w = index.constant(node.input[1])
        if w is None or w.shape[-1] != s.shape[0]:
            return False
        index.set_constant(node.input[1], w * s)
        if add is not None:
            bias_name = next(i for i in add.input if index.is_private(i))
            index.set_constant(bias_name, index.constant(bias_name) * s + t)  # type: ignore[operator]
        else:  # no bias yet: BN's shift becomes one
            return _replace_with_add(index, bn, t, result, "into_matmul")
        result.count("into_matmul")
    else:
        return False
    index.rewire(bn.output[0], bn.input[0])
    index.remove(bn)
    return True


def _fold_forward(index: GraphIndex, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray,
                  result: PassResult) -> bool:
    """BN whose only use, through reshapes or a token Gather, is the data input of MatMul/Gemm."""
    name = bn.output[0]
    node = index.only_consumer(name)
    while node is not None and (node.op_type in _PASS_THROUGH or _is_token_gather(index, node)):
        if node.input[0] != name:
            return False
        name = node.output[0]
        node = index.only_consumer(name)
    if node is None or node.input[0] != name or not index.is_private(node.input[1]):
        return False
    w = index.constant(node.input[1])
    if w is None:
        return False
    if node.op_type == "MatMul" and w.ndim == 2 and w.shape[0] == s.shape[0]:
        index.set_constant(node.input[1], w * s[:, None])
        shift = t @ w
        add = index.only_consumer(node.output[0])
        bias_name = next((i for i in add.input if index.is_private(i)), None) if add is not None else None
        if add is not None and add.op_type == "Add" and bias_name is not None:
            index.set_constant(bias_name, index.constant(bias_name) + shift)  # type: ignore[operator]
        else:
            out = index.fresh_name("folded_bn_shift")
            new_add = helper.make_node("Add", [out, index.add_constant(shift.astype(np.float32), "folded_bias")],
                                       [node.output[0]])
            node.output[0] = out
            index.producer[out] = node
            index.insert_after(node, new_add)
    elif node.op_type == "Gemm" and _gemm_plain(node) and w.ndim == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        if (w.shape[1] if trans_b else w.shape[0]) != s.shape[0]:
            return False
        w_in_out = w.T if trans_b else w
        index.set_constant(node.input[1], (w_in_out * s[:, None]).T if trans_b else w_in_out * s[:, None])
        shift = t @ w_in_out
        if len(node.input) > 2 and index.is_private(node.input[2]):
            index.set_constant(node.input[2], index.constant(node.input[2]) + shift)  # type: ignore[operator]
        else:
            node.input[2:] = [index.add_constant(shift.astype(np.float32), "folded_bias")]
    else:
        return False
    result.count(f"forward_into_{node.op_type.lower()}")
    index.rewire(bn.output[0], bn.input[0])
    index.remove(bn)
    return True


def _gemm_plain(node: onnx.NodeProto) -> bool:
    attrs = {a.name: a for a in node.attribute}
    return ("transA" not in attrs or attrs["transA"].i == 0) and all(
        k not in attrs or attrs[k].f == 1.0 for k in ("alpha", "beta"))


def _is_token_gather(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Gather that picks along an axis other than the last (the channel axis for [.., C] data)."""
    if node.op_type != "Gather":
        return False
    rank = index.ranks.get(node.input[0])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return rank is not None and axis % rank != rank - 1


def _replace_with_add(index: GraphIndex, bn: onnx.NodeProto, t: np.ndarray, result: PassResult, key: str) -> bool:
    index.insert_after(bn, helper.make_node("Add", [bn.input[0], index.add_constant(t.astype(np.float32),
                                                                                     "folded_bias")], [bn.output[0]]))
    index.remove(bn)
    result.count(key)
    return True


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
        if not (_fold_backward(index, bn, s, t, result) or _fold_forward(index, bn, s, t, result)):
            _replace_with_mul_add(index, bn, s, t, result)
    index.commit()
    return result
