"""torch → ONNX export and graph passes (see DESIGN.md, "Export")."""
