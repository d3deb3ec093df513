"""Reduced-precision variants: int8 (ONNX Runtime dynamic quantization, for CPU) and fp16 (for GPU).

int8 quantizes the weights of every MatMul/Gemm per output channel (QInt8)
and the activations per tensor at run time (QUInt8, which is what ORT's
AVX2 kernels want on a CPU without VNNI). Attention, LayerNorm and Softmax
stay fp32.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
from transerve.export.passes.graph import attribute


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Give every MatMul/Gemm whose weight is ``Transpose(initializer)`` a pre-transposed initializer of its own;
    returns how many. ``quantize_dynamic`` quantizes only constant weights, and constant folding skips tensors
    over its size limit — so a tied output projection (``MatMul(x, Transpose(embedding))``, 58 101 × 512 for an
    opus-mt checkpoint, about 58 % of a decoder step's multiply-adds) stayed fp32 in the int8 variant. Only
    the int8 variant does this: there the copy is int8, a quarter of the embedding it duplicates."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    folded: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        source = producers.get(node.input[1])
        if source is None or source.op_type != "Transpose" or source.input[0] not in initializers:
            continue
        if node.input[1] not in folded:
            weight = numpy_helper.to_array(initializers[source.input[0]])
            perm = attribute(source, "perm")
            name = f"{node.input[1]}__transposed"
            model.graph.initializer.append(numpy_helper.from_array(weight.transpose(perm), name))
            folded[node.input[1]] = name
        node.input[1] = folded[node.input[1]]
    still_used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    kept = [n for n in model.graph.node if n.op_type != "Transpose" or any(o in still_used for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(folded)


def quantize_int8(model: onnx.ModelProto, per_channel: bool = True) -> onnx.ModelProto:
    """ORT dynamic int8 (QInt8 weights) of every MatMul/Gemm, transposed constant weights folded first.
    ``per_channel``: one weight scale per output column (more accurate) or one per tensor (faster on some
    CPUs): the export measures both (:data:`transerve.export.variants.INT8_FORMS`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint on the root logger every call
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        clean = onnx.ModelProto()
        clean.CopyFrom(model)
        clean.graph.ClearField("value_info")  # the exporter's shape hints can contradict its own Gemm outputs
        fold_weight_transposes(clean)
        onnx.save_model(clean, str(src))
        try:
            quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            root.setLevel(level)
        return onnx.load_model(str(dst))


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute, fp32 inputs/outputs (callers keep their dtypes)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
