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

The patterns are data — paths of :class:`~transerve.export.passes.graph.Step` walked by ``match_parent_path`` /
``match_child_path`` from an anchor node (the Div, the Erf), as BatchNorm folding's ``VARIANTS`` — and each
matcher adds only what a path cannot say: that two paths meet in the same value.
"""

from __future__ import annotations

import math

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


def _scalar(index: GraphIndex, name: str) -> float | None:
    value = index.constant(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _has_scalar(index: GraphIndex, node: onnx.NodeProto, target: float) -> bool:
    return any(math.isclose(_scalar(index, i) or math.inf, target, rel_tol=1e-4) for i in node.input)


def _has_constant(index: GraphIndex, node: onnx.NodeProto) -> bool:
    return any(index.constant(i) is not None for i in node.input)


def _other(node: onnx.NodeProto, name: str) -> str:
    return node.input[1] if node.input[0] == name else node.input[0]


def _reduces_last_axis(index: GraphIndex, node: onnx.NodeProto) -> bool:
    axes = attribute(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        axes = None if value is None else value.tolist()
    rank = index.ranks.get(node.input[0])
    return axes is not None and len(axes) == 1 and axes[0] in (-1, None if rank is None else rank - 1)


def _squares(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """``Pow(d, 2)`` or ``Mul(d, d)``."""
    if node.op_type == "Pow":
        return _scalar(index, node.input[1]) == 2.0
    return node.input[0] == node.input[1]


def _divides_by_sqrt2(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """``x / √2`` or ``x · (1/√2)`` (the constant second)."""
    c = _scalar(index, node.input[1])
    target = math.sqrt(2) if node.op_type == "Div" else 1 / math.sqrt(2)
    return c is not None and math.isclose(c, target, rel_tol=1e-4)


# LayerNorm, from its Div: the centred input (d = x − mean), the spread (√(mean(d²) + ε)), and the affine after it
LAYERNORM_CENTRED = (Step(("Sub",), 1, shared=True), Step(("ReduceMean",), 0, when=_reduces_last_axis))
LAYERNORM_SPREAD = (Step(("Sqrt",)), Step(("Add",), 0, when=lambda ix, n: _scalar(ix, n.input[1]) is not None),
                    Step(("ReduceMean",), 0, when=_reduces_last_axis), Step(("Pow", "Mul"), 0, when=_squares))
LAYERNORM_AFFINE = (Step(("Mul",), None, when=_has_constant), Step(("Add",), None, when=_has_constant))

# GELU, from its Erf: the scaled input before it, and after it either ½ last or ½ applied to x first
GELU_ERF_INPUT = (Step(("Div", "Mul"), 0, when=_divides_by_sqrt2),)
GELU_HALF_LAST = (Step(("Add",), None, when=lambda ix, n: _has_scalar(ix, n, 1.0)), Step(("Mul",), None),
                  Step(("Mul",), None, when=lambda ix, n: _has_scalar(ix, n, 0.5)))
GELU_HALF_FIRST = GELU_HALF_LAST[:2]
GELU_HALF_OF_X = (Step(("Mul",), None, when=lambda ix, n: _has_scalar(ix, n, 0.5)),)


def _match_layernorm(index: GraphIndex, div: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    """The matched nodes (the final Add last) and the LayerNormalization that replaces them."""
    centred = match_parent_path(index, div.input[0], LAYERNORM_CENTRED)
    spread = match_parent_path(index, div.input[1], LAYERNORM_SPREAD)
    affine = match_child_path(index, div.output[0], LAYERNORM_AFFINE)
    if not (centred and spread and affine):
        return None
    (sub, mean), (sqrt, add_eps, var, square), (mul, add) = centred, spread, affine
    x, d = sub.input[0], sub.output[0]
    if mean.input[0] != x or square.input[0] != d:  # the two paths must start from the same x and d
        return None
    gamma, beta = _other(mul, div.output[0]), _other(add, mul.output[0])
    fused = helper.make_node("LayerNormalization", [x, gamma, beta], [add.output[0]], axis=-1,
                             epsilon=_scalar(index, add_eps.input[1]))
    return [mean, sub, square, var, add_eps, sqrt, div, mul, add], fused


def _match_gelu(index: GraphIndex, erf: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    """The matched nodes (the last Mul last) and the Gelu that replaces them."""
    scaled = match_parent_path(index, erf.input[0], GELU_ERF_INPUT)
    if not scaled:
        return None
    x = scaled[0].input[0]
    after = match_child_path(index, erf.output[0], GELU_HALF_LAST)
    if after and _other(after[1], after[0].output[0]) == x:
        return [*scaled, erf, *after], helper.make_node("Gelu", [x], [after[-1].output[0]])
    after = match_child_path(index, erf.output[0], GELU_HALF_FIRST)
    half = after and match_parent_path(index, _other(after[1], after[0].output[0]), GELU_HALF_OF_X)
    if after and half and x in half[0].input:
        return [*scaled, erf, *after, *half], helper.make_node("Gelu", [x], [after[-1].output[0]])
    return None


def _fuse(model: onnx.ModelProto, name: str, anchor: str, match: object) -> PassResult:
    """Replace every match around an ``anchor`` node; the fused node takes the last matched node's place."""
    result, index = PassResult(name), GraphIndex(model)
    for node in [n for n in model.graph.node if n.op_type == anchor]:
        found = match(index, node)  # type: ignore[operator]
        if found is None:
            continue
        nodes, fused = found
        last = next(n for n in nodes if n.output[0] == fused.output[0])
        for matched in nodes:
            if matched is not last:
                index.remove(matched)
        index.insert_after(last, fused)
        index.remove(last)
        result.count(fused.op_type)
    index.commit()
    return result


def fuse_layernorm(model: onnx.ModelProto) -> PassResult:
    return _fuse(model, "fuse_layernorm", "Div", _match_layernorm)


def fuse_gelu(model: onnx.ModelProto) -> PassResult:
    return _fuse(model, "fuse_gelu", "Erf", _match_gelu)
