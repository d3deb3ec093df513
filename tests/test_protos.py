"""The committed gRPC stubs are exactly what protos/*.proto generate."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="needs grpcio-tools (dev extra)")
def test_regenerating_stubs_changes_nothing(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "clients"))
    try:
        from generate_protos import OUT, generate
    finally:
        sys.path.pop(0)
    fresh = {p.name: p.read_text() for p in generate(tmp_path)}
    committed = {p.name: p.read_text() for p in OUT.glob("*_pb2*.py*")}
    assert fresh.keys() == committed.keys()
    for name, text in fresh.items():
        assert text == committed[name], f"{name} is stale: run `make protos`"


def test_services_are_wire_compatible_names() -> None:
    from transerve_client._proto import inference_pb2, transerve_pb2

    assert inference_pb2.DESCRIPTOR.package == "inference"
    methods = {m.name for m in inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    assert {"ModelInfer", "ModelStreamInfer", "ModelMetadata", "RepositoryIndex", "ModelStatistics"} <= methods
    request = inference_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert (request["model_name"].number, request["inputs"].number, request["raw_input_contents"].number) == (1, 5, 7)
    assert set(transerve_pb2.DESCRIPTOR.services_by_name) == {"Translator", "Classifier"}
