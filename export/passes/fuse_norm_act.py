"""Fuse written-out LayerNorm and GELU into the single ONNX ops.

Our models export ``nn.LayerNorm`` and ``nn.GELU`` as ``LayerNormalization``
and ``Gelu`` already (opset ≥ 20). Imported checkpoints whose code writes the
formulas out do not, and these passes put them back:

```
 LayerNorm:  x ─ ReduceMean ─┐
             x ──────────── Sub ─ d ─ Pow(2)|Mul(d,d) ─ ReduceMean ─ Add(ε) ─ Sqrt ─┐
                                 d ────────────────────────────────────────────── Div ─ Mul(γ) ─ Add(β)
             → LayerNormalization(x, γ, β, axis=-1, epsilon=ε)

 GELU:       x ─ Div(√2)|Mul(1/√2) ─ Erf ─ Add(1) ─┐
             x ──────────────────────────────── Mul ─ Mul(0.5)      (or Mul(x, 0.5) first)
             → Gelu(x)
```
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper
from transerve.export.passes.graph import GraphIndex, PassResult


def _scalar(index: GraphIndex, name: str) -> float | None:
    value = index.constant(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _other(node: onnx.NodeProto, name: str) -> str:
    return node.input[1] if node.input[0] == name else node.input[0]


def _reduces_last_axis(index: GraphIndex, node: onnx.NodeProto) -> bool:
    axes_attr = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    axes_value = index.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    axes = axes_attr if axes_attr is not None else (axes_value.tolist() if axes_value is not None else None)
    rank = index.ranks.get(node.input[0])
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def _match_layernorm(index: GraphIndex, div: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str, float] | None:
    """From the Div back to x; returns (matched nodes, x, ε)."""
    sub, sqrt = index.producer.get(div.input[0]), index.producer.get(div.input[1])
    if sub is None or sqrt is None or sub.op_type != "Sub" or sqrt.op_type != "Sqrt":
        return None
    mean = index.producer.get(sub.input[1])
    add_eps = index.producer.get(sqrt.input[0])
    if mean is None or mean.op_type != "ReduceMean" or mean.input[0] != sub.input[0] or add_eps is None:
        return None
    if add_eps.op_type != "Add":
        return None
    var = index.producer.get(add_eps.input[0])
    eps = _scalar(index, add_eps.input[1])
    square = index.producer.get(var.input[0]) if var is not None and var.op_type == "ReduceMean" else None
    if square is None or eps is None or not (_reduces_last_axis(index, mean) and _reduces_last_axis(index, var)):
        return None
    d = sub.output[0]
    squares = (square.op_type == "Pow" and _scalar(index, square.input[1]) == 2.0 and square.input[0] == d) or (
        square.op_type == "Mul" and list(square.input) == [d, d])
    return ([mean, sub, square, var, add_eps, sqrt, div], sub.input[0], eps) if squares else None


def fuse_layernorm(model: onnx.ModelProto) -> PassResult:
    result = PassResult("fuse_layernorm")
    index = GraphIndex(model)
    for div in [n for n in model.graph.node if n.op_type == "Div"]:
        matched = _match_layernorm(index, div)
        mul = index.only_consumer(div.output[0])
        add = index.only_consumer(mul.output[0]) if mul is not None and mul.op_type == "Mul" else None
        if matched is None or mul is None or add is None or add.op_type != "Add":
            continue
        nodes, x, eps = matched
        gamma, beta = _other(mul, div.output[0]), _other(add, mul.output[0])
        if index.constant(gamma) is None or index.constant(beta) is None:
            continue
        for node in [*nodes, mul]:
            index.remove(node)
        index.insert_after(add, helper.make_node("LayerNormalization", [x, gamma, beta], [add.output[0]], axis=-1,
                                                 epsilon=eps))
        index.remove(add)
        result.count("LayerNormalization")
    index.commit()
    return result


def _is_erf_arg(index: GraphIndex, node: onnx.NodeProto | None) -> str | None:
    """``x / √2`` or ``x · (1/√2)`` → x."""
    if node is None:
        return None
    c = _scalar(index, node.input[1])
    if node.op_type == "Div" and c is not None and math.isclose(c, math.sqrt(2), rel_tol=1e-4):
        return node.input[0]
    if node.op_type == "Mul" and c is not None and math.isclose(c, 1 / math.sqrt(2), rel_tol=1e-4):
        return node.input[0]
    return None


def fuse_gelu(model: onnx.ModelProto) -> PassResult:
    result = PassResult("fuse_gelu")
    index = GraphIndex(model)
    for erf in [n for n in model.graph.node if n.op_type == "Erf"]:
        scale = index.producer.get(erf.input[0])
        x = _is_erf_arg(index, scale)
        add = index.only_consumer(erf.output[0])
        if x is None or add is None or add.op_type != "Add" or _scalar(index, _other(add, erf.output[0])) != 1.0:
            continue
        mul = index.only_consumer(add.output[0])
        if mul is None or mul.op_type != "Mul":
            continue
        partner = index.producer.get(_other(mul, add.output[0]))
        half_first = (partner is not None and partner.op_type == "Mul" and x in partner.input
                      and np.isclose(_scalar(index, _other(partner, x)) or 0.0, 0.5))
        last = mul if half_first else index.only_consumer(mul.output[0])
        if not half_first and (_other(mul, add.output[0]) != x or last is None or last.op_type != "Mul"
                               or not np.isclose(_scalar(index, _other(last, mul.output[0])) or 0.0, 0.5)):
            continue
        matched = [scale, erf, add, mul] + ([partner] if half_first else [last])
        if half_first and index.only_consumer(partner.output[0]) is None:  # type: ignore[union-attr]
            continue
        for node in matched:
            index.remove(node)  # type: ignore[arg-type]
        index.insert_after(last, helper.make_node("Gelu", [x], [last.output[0]]))  # type: ignore[union-attr]
        result.count("Gelu")
    index.commit()
    return result
