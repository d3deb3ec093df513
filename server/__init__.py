"""The gRPC inference server (see DESIGN.md, "Server")."""
