"""The backends: graph runners for ONNX Runtime, OpenVINO, TensorRT and torch, their sessions, the precision
choice, CPU flags and private weight copies. Imports only :mod:`transerve.server.exceptions` of the server."""
