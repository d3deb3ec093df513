"""Put every attention block into the form its runtime runs fastest.

The opset-23 export already gives one ONNX ``Attention`` node per
``scaled_dot_product_attention`` call, in its 4-D form, surrounded by the
head split/merge the model wrote out:

```
 x_q ─ Reshape[B,T,H,D] ─ Transpose(0,2,1,3) ─┐
 x_k ─ Reshape[B,S,H,D] ─ Transpose(0,2,1,3) ─┼─ Attention ─ Transpose(0,2,1,3) ─ Reshape[B,T,C] ─ y
 x_v ─ Reshape[B,S,H,D] ─ Transpose(0,2,1,3) ─┘
```

Targets:

* ``onnxruntime`` / ``standard`` — :func:`fold_heads` drops those eight
  layout nodes and uses the 3-D form ``Attention(x_q, x_k, x_v,
  q_num_heads=H, kv_num_heads=H) → y`` where all three inputs are split this
  way (encoders, ViT); attention over a KV cache or over precomputed cross K/V
  keeps the 4-D form, which is already one node.
* ``tensorrt-legacy`` — TensorRT before 10.14 cannot parse ``Attention``;
  :func:`lower_attention` rewrites each node into the pattern TensorRT's MHA
  fusion matches: ``MatMul(Q·D^-¼, Kᵀ·D^-¼) → [mask] → Softmax → MatMul(V)``,
  with Q and K pre-scaled (a ``Div`` after the MatMul breaks its match).

Either way the pass reports how many attention blocks there are in fused
form, and the exporter fails when that is fewer than the model has.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import helper
from transerve.export.passes.graph import GraphIndex, PassResult, attribute

Target = Literal["onnxruntime", "standard", "tensorrt-legacy"]
HEAD_PERM = [0, 2, 1, 3]


def count_attention(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx"))


def _head_split(index: GraphIndex, name: str) -> tuple[str, int, list[onnx.NodeProto]] | None:
    """``name`` = Transpose(0,2,1,3)(Reshape(x, [_, _, H, D])) used once → (x, H, the two nodes)."""
    transpose = index.producer.get(name)
    if transpose is None or transpose.op_type != "Transpose" or index.only_consumer(name) is None:
        return None
    perm = attribute(transpose, "perm")
    reshape = index.producer.get(transpose.input[0])
    if perm is None or perm != HEAD_PERM or reshape is None or reshape.op_type != "Reshape":
        return None
    shape = index.constant(reshape.input[1])
    if shape is None or shape.shape != (4,) or shape[2] <= 0 or index.only_consumer(reshape.output[0]) is None:
        return None
    return reshape.input[0], int(shape[2]), [reshape, transpose]


def _head_merge(index: GraphIndex, name: str) -> tuple[str, list[onnx.NodeProto]] | None:
    """``name`` → Transpose(0,2,1,3) → Reshape to 3-D, each used once → (final output, the two nodes)."""
    transpose = index.only_consumer(name)
    if transpose is None or transpose.op_type != "Transpose":
        return None
    perm = attribute(transpose, "perm")
    reshape = index.only_consumer(transpose.output[0])
    if perm is None or perm != HEAD_PERM or reshape is None or reshape.op_type != "Reshape":
        return None
    shape = index.constant(reshape.input[1])
    if shape is None or shape.shape != (3,):
        return None
    return reshape.output[0], [transpose, reshape]


def fold_heads(model: onnx.ModelProto, result: PassResult) -> None:
    """4-D Attention with written-out head split/merge → 3-D Attention with head-count attributes."""
    index = GraphIndex(model)
    for node in [n for n in model.graph.node if n.op_type == "Attention" and len(n.output) == 1]:
        splits = [_head_split(index, name) for name in node.input[:3]]
        merge = _head_merge(index, node.output[0])
        if any(s is None for s in splits) or merge is None or len({s[1] for s in splits if s}) != 1:
            continue
        heads = splits[0][1]  # type: ignore[index]
        for split in splits:
            for layout_node in split[2]:  # type: ignore[index]
                index.remove(layout_node)
        for layout_node in merge[1]:
            index.remove(layout_node)
        node.input[:3] = [s[0] for s in splits]  # type: ignore[index]
        node.output[0] = merge[0]
        node.attribute.extend([helper.make_attribute("q_num_heads", heads),
                               helper.make_attribute("kv_num_heads", heads)])
        result.count("heads_folded")
    index.commit()


def lower_attention(model: onnx.ModelProto, result: PassResult) -> None:
    """Each Attention → MatMul(Q·c, Kᵀ·c) → [mask] → Softmax → MatMul(V), c = D^-¼ (3-D forms split heads first)."""
    index = GraphIndex(model)
    for node in [n for n in model.graph.node if n.op_type == "Attention"]:
        heads = attribute(node, "q_num_heads")
        q_shape = index.shapes.get(node.input[0])
        head_dim = None if not q_shape or q_shape[-1] is None else q_shape[-1] // (heads or 1)
        if len(node.output) > 1 or head_dim is None:
            result.warnings.append(f"Attention {node.name!r}: cache outputs or unknown head size; kept")
            continue
        scale = attribute(node, "scale")
        c = np.float32((scale or 1.0 / np.sqrt(head_dim)) ** 0.5)
        c_name = index.add_constant(np.array(c, dtype=np.float32), "attn_prescale")
        n = index.fresh_name(node.name or "attn")
        new: list[onnx.NodeProto] = []
        q, k, v = (_split_heads(index, name, heads, f"{n}_{t}4", new) if heads else name
                   for name, t in zip(node.input[:3], "qkv", strict=True))
        out = f"{n}_out4" if heads else node.output[0]
        new += [helper.make_node("Mul", [q, c_name], [f"{n}_q"]),
                helper.make_node("Transpose", [k], [f"{n}_kt"], perm=[0, 1, 3, 2]),
                helper.make_node("Mul", [f"{n}_kt", c_name], [f"{n}_k"]),
                helper.make_node("MatMul", [f"{n}_q", f"{n}_k"], [f"{n}_scores"])]
        scores = f"{n}_scores"
        if len(node.input) > 3 and node.input[3]:
            new.append(_mask_node(index, node.input[3], scores, f"{n}_masked"))
            scores = f"{n}_masked"
        new += [helper.make_node("Softmax", [scores], [f"{n}_weights"], axis=-1),
                helper.make_node("MatMul", [f"{n}_weights", v], [out])]
        if heads:  # [B, H, T, D] → [B, T, H·D]
            merge = index.add_constant(np.array([0, 0, -1], dtype=np.int64), "merge_shape")
            new += [helper.make_node("Transpose", [out], [f"{n}_merged"], perm=HEAD_PERM),
                    helper.make_node("Reshape", [f"{n}_merged", merge], [node.output[0]])]
        for added in new:
            index.insert_after(node, added)
        index.remove(node)
        result.count("lowered")
    index.commit()


def _split_heads(index: GraphIndex, name: str, heads: int, out: str, new: list[onnx.NodeProto]) -> str:
    """[B, T, H·D] → [B, H, T, D], appending the two nodes to ``new``."""
    shape = index.add_constant(np.array([0, 0, heads, -1], dtype=np.int64), "split_shape")
    new += [helper.make_node("Reshape", [name, shape], [f"{out}_r"]),
            helper.make_node("Transpose", [f"{out}_r"], [out], perm=HEAD_PERM)]
    return out


def _mask_node(index: GraphIndex, mask: str, scores: str, out: str) -> onnx.NodeProto:
    """Boolean masks select −inf; float masks are additive biases (both as the Attention spec says)."""
    elem = next((v.type.tensor_type.elem_type for v in [*index.graph.input, *index.graph.value_info]
                 if v.name == mask), None)
    producer = index.producer.get(mask)
    is_bool = elem == onnx.TensorProto.BOOL or (producer is not None and producer.op_type in ("Cast", "Unsqueeze")
                                                 and _is_bool_chain(index, mask))
    if is_bool:
        ninf = index.add_constant(np.array(-np.inf, dtype=np.float32), "neg_inf")
        return helper.make_node("Where", [mask, scores, ninf], [out])
    return helper.make_node("Add", [scores, mask], [out])


def _is_bool_chain(index: GraphIndex, name: str) -> bool:
    node = index.producer.get(name)
    while node is not None and node.op_type == "Unsqueeze":
        node = index.producer.get(node.input[0])
    if node is None:
        return False
    return node.op_type == "Cast" and attribute(node, "to") == onnx.TensorProto.BOOL


def fuse_attention(model: onnx.ModelProto, target: Target, expected: int | None = None) -> PassResult:
    """Rewrite attention for ``target``; ``expected`` attention blocks must all end up fused (or lowered)."""
    result = PassResult("fuse_attention")
    if target == "tensorrt-legacy":
        lower_attention(model, result)
        done = result.changed.get("lowered", 0)
    else:
        fold_heads(model, result)
        done = count_attention(model)
    result.changed["attention_blocks"] = done
    if expected is not None and done != expected:
        raise ValueError(f"fuse_attention({target}): {done} of {expected} attention blocks handled; "
                         f"the rest did not match the expected pattern")
    return result
