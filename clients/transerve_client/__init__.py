"""transerve-client: the light client distribution (grpcio, protobuf, numpy — never torch).

This release holds the packaging only; the SDK, CLI and load-test tool are
specified in DESIGN.md ("Clients") and tracked as their own issue.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
