"""Each graph pass alone, against an independent reference (numpy formula or PyTorch eager).

Tolerances: fp32, 1e-5 max-abs unless stated.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from transerve.export.graphs import export_translator, export_vit
from transerve.export.passes import (
    cleanup,
    count_attention,
    fold_batchnorm,
    fuse_attention,
    fuse_gelu,
    fuse_layernorm,
    op_counts,
)
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.models.vit import ViT, ViTConfig
from transerve.server.backends.sessions import make_session

TOL = 1e-5
RNG = np.random.default_rng(0)


def run(model: onnx.ModelProto, **feeds: np.ndarray) -> list[np.ndarray]:
    return make_session(model.SerializeToString()).run(None, feeds)


def make(nodes: list, inputs: list, outputs: list, inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def bn_params(c: int) -> dict[str, np.ndarray]:
    return {"g": RNG.uniform(0.5, 2, c), "b": RNG.normal(size=c), "m": RNG.normal(size=c), "v": RNG.uniform(0.5, 2, c)}


def bn_formula(x: np.ndarray, p: dict[str, np.ndarray], axis: int = 1) -> np.ndarray:
    shape = [1] * x.ndim
    shape[axis] = -1
    g, b, m, v = (p[k].reshape(shape) for k in "gbmv")
    return g * (x - m) / np.sqrt(v + 1e-5) + b


def tensor(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def bn_node(x: str, y: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, "g", "b", "m", "v"], [y], epsilon=1e-5)


def test_bn_after_matmul_add_is_folded_into_weights() -> None:
    w, bias, p = RNG.normal(size=(6, 4)), RNG.normal(size=4), bn_params(4)
    model = make([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "bias"], ["hb"]),
                  bn_node("hb", "y")], [tensor("x", [3, 6])], [tensor("y", [3, 4])], {"w": w, "bias": bias, **p})
    x = RNG.normal(size=(3, 6)).astype(np.float32)
    result = fold_batchnorm(model)
    assert result.changed == {"into_matmul": 1} and op_counts(model).get("BatchNormalization", 0) == 0
    np.testing.assert_allclose(run(model, x=x)[0], bn_formula(x @ w + bias, p), atol=TOL, rtol=TOL)


def test_bn_after_conv_is_folded() -> None:
    w, p = RNG.normal(size=(5, 3, 3, 3)), bn_params(5)
    model = make([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "y")],
                 [tensor("x", [2, 3, 6, 6])], [tensor("y", [2, 5, 6, 6])], {"w": w, **p})
    x = RNG.normal(size=(2, 3, 6, 6)).astype(np.float32)
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w.astype(np.float32)), padding=1).numpy()
    assert fold_batchnorm(model).changed == {"into_conv": 1}
    np.testing.assert_allclose(run(model, x=x)[0], bn_formula(conv, p), atol=1e-4, rtol=1e-4)


def test_bn_before_matmul_is_folded_forward_through_reshape() -> None:
    w, bias, p = RNG.normal(size=(4, 3)), RNG.normal(size=3), bn_params(4)
    shape = numpy_helper.from_array(np.array([2, 5, 4], dtype=np.int64), "shape")
    model = make([bn_node("x", "n"), helper.make_node("Reshape", ["n", "shape"], ["r"]),
                  helper.make_node("MatMul", ["r", "w"], ["h"]), helper.make_node("Add", ["h", "bias"], ["y"])],
                 [tensor("x", [10, 4])], [tensor("y", [2, 5, 3])], {"w": w, "bias": bias, **p})
    model.graph.initializer.append(shape)
    x = RNG.normal(size=(10, 4)).astype(np.float32)
    assert fold_batchnorm(model).changed == {"forward_into_matmul": 1}
    np.testing.assert_allclose(run(model, x=x)[0], (bn_formula(x, p) @ w + bias).reshape(2, 5, 3), atol=TOL,
                               rtol=TOL)


def test_bn_after_a_bias_free_matmul_becomes_its_bias() -> None:
    w, p = RNG.normal(size=(6, 4)), bn_params(4)
    model = make([helper.make_node("MatMul", ["x", "w"], ["h"]), bn_node("h", "y")], [tensor("x", [3, 6])],
                 [tensor("y", [3, 4])], {"w": w, **p})
    x = RNG.normal(size=(3, 6)).astype(np.float32)
    assert fold_batchnorm(model).changed == {"into_matmul": 1}
    assert op_counts(model) == {"Add": 1, "MatMul": 1}
    np.testing.assert_allclose(run(model, x=x)[0], bn_formula(x @ w, p), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_before_gemm_is_folded_forward(trans_b: int) -> None:
    w, c, p = RNG.normal(size=(4, 3)), RNG.normal(size=3), bn_params(4)
    stored = w.T if trans_b else w
    model = make([bn_node("x", "n"), helper.make_node("Gemm", ["n", "w", "c"], ["y"], transB=trans_b)],
                 [tensor("x", [5, 4])], [tensor("y", [5, 3])], {"w": stored, "c": c, **p})
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    assert fold_batchnorm(model).changed == {"forward_into_gemm": 1}
    assert op_counts(model) == {"Gemm": 1}
    np.testing.assert_allclose(run(model, x=x)[0], bn_formula(x, p) @ w + c, atol=TOL, rtol=TOL)


def test_unfoldable_bn_becomes_mul_add_with_a_warning() -> None:
    p = bn_params(4)
    model = make([bn_node("x", "y")], [tensor("x", [3, 4])], [tensor("y", [3, 4])], p)
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    result = fold_batchnorm(model)
    assert result.changed == {"to_mul_add": 1} and "BatchNormalization" in result.warnings[0]
    assert op_counts(model) == {"Add": 1, "Mul": 1}
    np.testing.assert_allclose(run(model, x=x)[0], bn_formula(x, p), atol=TOL, rtol=TOL)


def tiny_vit(norm: str = "batch") -> ViT:
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=4, dim=16, depth=2, num_heads=2, norm=norm)).train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            model(torch.randn(8, 3, 8, 8) * 2 + 0.5)
    return model.eval()


def test_vit_bn_folds_completely_and_matches_pytorch() -> None:
    model = tiny_vit()
    proto = export_vit(model)
    assert op_counts(proto)["BatchNormalization"] > 0
    result = fold_batchnorm(proto)
    assert "BatchNormalization" not in op_counts(proto) and not result.warnings
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(run(proto, images=x.numpy())[0], model(x).numpy(), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt-legacy"])
def test_fuse_attention_on_vit(target: str) -> None:
    model = tiny_vit("layer")
    proto = export_vit(model)
    assert count_attention(proto) == 2
    result = fuse_attention(proto, target, expected=2)  # type: ignore[arg-type]
    counts = op_counts(proto)
    if target == "onnxruntime":
        assert result.changed["heads_folded"] == 2 and counts["Attention"] == 2
        assert counts.get("Transpose", 0) == 1  # only the patch flatten's; heads no longer split by hand
    else:
        assert "Attention" not in counts and counts["Softmax"] == 2 and result.changed["lowered"] == 2
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(run(proto, images=x.numpy())[0], model(x).numpy(), atol=TOL, rtol=TOL)


def test_lowered_attention_keeps_padding_mask() -> None:
    """The translator encoder (boolean padding mask) lowered for TensorRT still matches PyTorch."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(TransformerConfig(vocab_size=30, d_model=16, num_heads=2, num_encoder_layers=2,
                                                 num_decoder_layers=1, ffn_dim=32, dropout=0.0)).eval()
    encoder, _ = export_translator(model)
    fuse_attention(encoder, "tensorrt-legacy", expected=2)
    assert count_attention(encoder) == 0
    ids = np.array([[5, 6, 7, 2], [8, 2, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        kv = model.memory_kv(model.encode(torch.from_numpy(ids), torch.from_numpy(mask).bool()))
    got = run(encoder, input_ids=ids, attention_mask=mask)
    for a, b in zip(got, [t for pair in kv for t in pair], strict=True):
        np.testing.assert_allclose(a, b.numpy(), atol=TOL, rtol=TOL)


def test_incomplete_fusion_is_an_error() -> None:
    proto = export_vit(tiny_vit("layer"))
    with pytest.raises(ValueError, match="2 of 3 attention blocks"):
        fuse_attention(proto, "onnxruntime", expected=3)


class WrittenOut(nn.Module):
    """LayerNorm and GELU written as formulas, the way some imported checkpoints do."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - x.mean(-1, keepdim=True)
        y = d / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gamma + self.beta
        return 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))


def test_layernorm_and_gelu_fusion_match_eager() -> None:
    module = WrittenOut().eval()
    x = torch.randn(2, 5, 8)
    program = torch.onnx.export(module, (x,), dynamo=True, opset_version=23, verbose=False,
                                dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=64)}})
    proto = program.model_proto
    assert "LayerNormalization" not in op_counts(proto) and "Erf" in op_counts(proto)
    assert fuse_layernorm(proto).changed == {"LayerNormalization": 1}
    assert fuse_gelu(proto).changed == {"Gelu": 1}
    cleanup(proto)
    assert op_counts(proto) == {"Gelu": 1, "LayerNormalization": 1}
    with torch.no_grad():
        np.testing.assert_allclose(run(proto, x=x.numpy())[0], module(x).numpy(), atol=TOL, rtol=TOL)


def test_cleanup_folds_constants_and_drops_dead_nodes() -> None:
    model = make([helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Mul", ["x", "ab"], ["y"]),
                  helper.make_node("Neg", ["x"], ["unused"])],
                 [tensor("x", [3])], [tensor("y", [3])], {"a": np.ones(3), "b": np.full(3, 2.0), "dead": np.ones(9)})
    result = cleanup(model)
    assert op_counts(model) == {"Mul": 1}
    assert result.changed == {"folded_Add": 1, "dead_nodes": 1, "unused_initializers": 3}
    np.testing.assert_allclose(run(model, x=np.arange(3, dtype=np.float32))[0], [0.0, 3.0, 6.0])


def test_lowering_a_heads_folded_graph_matches_pytorch() -> None:
    """TensorRT < 10.14 gets entries exported for onnxruntime: 3-D Attention is split back into heads."""
    model = tiny_vit("layer")
    proto = export_vit(model)
    fuse_attention(proto, "onnxruntime", expected=2)
    assert fuse_attention(proto, "tensorrt-legacy", expected=2).changed["lowered"] == 2
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(run(proto, images=x.numpy())[0], model(x).numpy(), atol=TOL, rtol=TOL)
