"""The int8 variant quantizes every MatMul weight, the tied output projection included.

A tied projection is ``MatMul(x, Transpose(embedding))``; constant folding skips a tensor as large as a real
vocabulary's embedding, so ``quantize_dynamic`` saw no constant weight and left the largest MatMul of a
decoder step in fp32. The graphs here are built in the test, with the weight behind a Transpose (and shared
with a Gather, as a tied embedding is).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from transerve.export.precision import fold_weight_transposes, quantize_int8

RNG = np.random.default_rng(15)


def tied_projection(vocab: int = 64, dim: int = 32) -> onnx.ModelProto:
    """ids → embedding rows (Gather), and x → x · embeddingᵀ (MatMul over a Transpose): one shared weight."""
    embedding = numpy_helper.from_array(RNG.standard_normal((vocab, dim)).astype(np.float32), "embedding")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embedding", "ids"], ["rows"]),
         helper.make_node("Transpose", ["embedding"], ["embedding_t"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "embedding_t"], ["logits"])],
        "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
                 helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dim])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", dim]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", vocab])], [embedding])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(None, feeds)]


FEEDS = {"ids": np.array([0, 5, 63]), "x": RNG.standard_normal((3, 32)).astype(np.float32)}


def test_folding_the_transpose_changes_no_output() -> None:
    model = tied_projection()
    expected = run(model, FEEDS)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_weight_transposes(folded) == 1
    assert "Transpose" not in {n.op_type for n in folded.graph.node}
    for got, want in zip(run(folded, FEEDS), expected, strict=True):
        np.testing.assert_array_equal(got, want)  # the same numbers, transposed ahead of time


def test_int8_variant_quantizes_the_tied_projection() -> None:
    model = tied_projection()
    rows, logits = run(model, FEEDS)
    quantized = quantize_int8(model)
    ops = [n.op_type for n in quantized.graph.node]
    assert "MatMul" not in ops and "MatMulInteger" in ops, ops
    q_rows, q_logits = run(quantized, FEEDS)
    np.testing.assert_array_equal(q_rows, rows)  # the embedding lookup stays fp32
    # int8 weights per channel and uint8 activations per tensor: error within 2 % of the logits' range
    assert np.abs(q_logits - logits).max() <= 0.02 * np.ptp(logits)
