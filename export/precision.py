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


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint on the root logger every call
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        clean = onnx.ModelProto()
        clean.CopyFrom(model)
        clean.graph.ClearField("value_info")  # the exporter's shape hints can contradict its own Gemm outputs
        onnx.save_model(clean, str(src))
        try:
            quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            root.setLevel(level)
        return onnx.load_model(str(dst))


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute, fp32 inputs/outputs (callers keep their dtypes)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
