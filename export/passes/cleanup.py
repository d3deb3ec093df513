"""Constant folding and dead-node removal — ours, small, and run after every rewriting pass.

torch's exporter already runs onnxscript's optimizer on the raw graph; these
two clean up after *our* passes: weights folded by ``fold_batchnorm`` leave
unused BN parameters, ``fuse_attention`` leaves unused shape constants, and a
rewrite can leave a subgraph whose inputs are all constants.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from transerve.export.passes.graph import GraphIndex, PassResult

# Ops whose value depends on nothing but their inputs, cheap to evaluate once.
_FOLDABLE = {"Add", "Sub", "Mul", "Div", "Sqrt", "Pow", "Neg", "Reciprocal", "Cast", "Reshape", "Transpose",
             "Unsqueeze", "Squeeze", "Concat", "Gather", "Slice", "Shape", "Identity", "Constant", "Range"}
_MAX_FOLDED_ELEMENTS = 1 << 22


def fold_constants(model: onnx.ModelProto, result: PassResult) -> None:
    """Evaluate nodes whose inputs are all constants and store their outputs as initializers."""
    index = GraphIndex(model)
    for node in model.graph.node:
        if node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx") or not node.output:
            continue
        if node.op_type == "Constant" and index.consumers.get(node.output[0]) is None:
            continue
        inputs = [index.constant(name) if name else None for name in node.input]
        if any(v is None for v, name in zip(inputs, node.input, strict=True) if name):
            continue
        values = _evaluate(model, node, [v for v in inputs if v is not None])
        if values is None or any(v.size > _MAX_FOLDED_ELEMENTS for v in values):
            continue
        for name, value in zip(node.output, values, strict=True):
            if name in index.graph_outputs:
                break
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
            index.initializers[name] = model.graph.initializer[-1]
        else:
            index.remove(node)
            result.count(f"folded_{node.op_type}")
    index.commit()


def _evaluate(model: onnx.ModelProto, node: onnx.NodeProto, inputs: list[np.ndarray]) -> list[np.ndarray] | None:
    names = [n for n in node.input if n]
    graph = helper.make_graph(
        [node], "fold", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                         for n, v in zip(names, inputs, strict=True)],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output])
    try:
        tiny = helper.make_model(graph, opset_imports=list(model.opset_import))
        return [np.asarray(v) for v in ReferenceEvaluator(tiny).run(None, dict(zip(names, inputs, strict=True)))]
    except Exception:  # not foldable here (unsupported by the reference runtime): leave it to the runtime
        return None


def remove_dead_nodes(model: onnx.ModelProto, result: PassResult) -> None:
    """Drop nodes no graph output depends on, then initializers nothing reads."""
    graph = model.graph
    live = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(out in live for out in node.output):
            kept.append(node)
            live.update(i for i in node.input if i)
            live.update(_subgraph_inputs(node))
        else:
            result.count("dead_nodes")
    if len(kept) != len(graph.node):
        nodes = [_copy(n) for n in reversed(kept)]
        graph.ClearField("node")
        graph.node.extend(nodes)
    unused = [t.name for t in graph.initializer if t.name not in live]
    if unused:
        keep = [_copy_tensor(t) for t in graph.initializer if t.name in live]
        graph.ClearField("initializer")
        graph.initializer.extend(keep)
        result.count("unused_initializers", len(unused))


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for n in g.node:
                names.update(n.input)
    return names


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _copy_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    out = onnx.TensorProto()
    out.CopyFrom(t)
    return out


def cleanup(model: onnx.ModelProto) -> PassResult:
    result = PassResult("cleanup")
    fold_constants(model, result)
    remove_dead_nodes(model, result)
    # The exporter's shape annotations describe the graph before our rewrites; stale ones
    # break later shape inference (the quantizer's), so drop them — they are hints only.
    model.graph.ClearField("value_info")
    return result
