"""transerve: export PyTorch Transformers to ONNX/TensorRT and serve them over gRPC."""

__version__ = "0.1.0"
