"""Faults in the server's own world: broken model files, a backend that throws, files changing under a served
model, a server killed outright. Each against real server processes on loopback.
"""

from __future__ import annotations

import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import yaml
from conftest import export_random_translator
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import running_server, start_server
from onnx import TensorProto, helper, numpy_helper
from reliability import record_figures
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def vit_request(pixel: float = 0.5, model: str = "tiny-vit") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 8, 8])
    request.raw_input_contents.append(np.full((1, 3, 8, 8), pixel, "<f4").tobytes())
    return request


def copy_entry(repo: Path, source: Path, name: str) -> Path:
    """A copy of entry ``source`` under ``name`` (its config renamed too)."""
    entry = repo / name
    shutil.copytree(source, entry)
    config = yaml.safe_load((entry / "config.yaml").read_text())
    config["name"] = name
    (entry / "config.yaml").write_text(yaml.safe_dump(config))
    return entry


# each breaks one copy of an entry: (entry copied, what is done to it, a word the reason must contain)
BREAKAGES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "vit-truncated-graph": ("tiny-vit", lambda e: (e / "1" / "model.onnx").write_bytes(
        (e / "1" / "model.onnx").read_bytes()[:200]), "model.onnx"),
    "vit-missing-graph": ("tiny-vit", lambda e: (e / "1" / "model.onnx").unlink(), "model.onnx"),
    "vit-no-version": ("tiny-vit", lambda e: shutil.rmtree(e / "1"), "version"),
    "vit-bad-yaml": ("tiny-vit", lambda e: (e / "config.yaml").write_text("name: [unclosed\n"), "YAML"),
    "vit-bad-field": ("tiny-vit", lambda e: (e / "config.yaml").write_text(
        (e / "config.yaml").read_text().replace("max_batch_size: 64", "max_batch_size: -3")), "max_batch_size"),
    "mt-missing-encoder": ("tiny-mt", lambda e: (e / "1" / "encoder.onnx").unlink(), "encoder.onnx"),
    "mt-missing-tokenizer": ("tiny-mt", lambda e: (e / "tokenizer.json").unlink(), "tokenizer"),
    "mt-corrupt-tokenizer": ("tiny-mt", lambda e: (e / "tokenizer.json").write_text("{not json"), "tokenizer"),
}


def test_broken_files_fail_only_their_model(small_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(small_repo, repo)
    for name, (source, breakage, _) in BREAKAGES.items():
        breakage(copy_entry(repo, small_repo / source, name))
    with running_server(repo) as server, grpc.insecure_channel(server.address) as channel:
        kserve, health = pb_grpc.GRPCInferenceServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        index = {m.name: m for m in kserve.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        assert index["tiny-vit"].state == index["tiny-mt"].state == "READY"
        for name, (_, _, word) in BREAKAGES.items():
            assert index[name].state == "UNAVAILABLE", name
            assert word.lower() in index[name].reason.lower(), (name, index[name].reason)
            assert not kserve.ModelReady(pb.ModelReadyRequest(name=name)).ready
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == NOT_SERVING
            with pytest.raises(grpc.RpcError) as refused:
                kserve.ModelInfer(vit_request(model=name))
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND and name in refused.value.details()
        assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING  # the rest serve
        assert kserve.ModelInfer(vit_request()).outputs[0].name == "logits"
        assert tpb_grpc.TranslatorStub(channel).Translate(tpb.TranslateRequest(texts=["seven"])).translations
    record_figures("faults.broken_files", broken_entries=len(BREAKAGES), healthy_entries=2)


def fail_on_bright_pixels(model_file: Path) -> None:
    """Make the graph throw inside ONNX Runtime when any pixel exceeds 50: a Gather whose index becomes 1
    (out of bounds) then, its result added (as 0) to the logits. Ordinary inputs are answered unchanged."""
    model = onnx.load(str(model_file))
    graph = model.graph
    graph.node[-1].output[0] = "logits_raw"
    graph.initializer.extend([numpy_helper.from_array(np.zeros(1, np.float32), "fault_data"),
                              numpy_helper.from_array(np.array(50.0, np.float32), "fault_threshold")])
    graph.node.extend([
        helper.make_node("ReduceMax", ["images"], ["fault_max"], keepdims=0),
        helper.make_node("Greater", ["fault_max", "fault_threshold"], ["fault_bright"]),
        helper.make_node("Cast", ["fault_bright"], ["fault_index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["fault_data", "fault_index"], ["fault_zero"]),
        helper.make_node("Add", ["logits_raw", "fault_zero"], ["logits"]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(model_file))


def test_backend_exception_fails_only_its_batch(small_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(small_repo, repo)
    fail_on_bright_pixels(repo / "tiny-vit" / "1" / "model.onnx")
    with running_server(repo) as server, grpc.insecure_channel(server.address) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        good = kserve.ModelInfer(vit_request()).raw_output_contents[0]
        with pytest.raises(grpc.RpcError) as failed:
            kserve.ModelInfer(vit_request(pixel=1000.0))
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        request_id = re.search(r"request id (\w+)", failed.value.details() or "")
        assert request_id, failed.value.details()
        assert dict(failed.value.trailing_metadata())["x-request-id"] == request_id.group(1)
        assert kserve.ModelInfer(vit_request()).raw_output_contents[0] == good  # the next batch works
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == SERVING
    log = "".join(server.output)
    assert request_id.group(1) in log and "Gather" in log  # logged under its id, with the backend's error


def test_files_changed_on_disk_keep_the_loaded_version_until_a_reload(small_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(small_repo, repo)
    admin = tmp_path / "admin-tokens"
    admin.write_text("admin-secret\n")
    token = (("authorization", "Bearer admin-secret"),)
    with (running_server(repo, "--admin-token-file", str(admin)) as server,
          grpc.insecure_channel(server.address) as channel):
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        translator = tpb_grpc.TranslatorStub(channel)
        logits = kserve.ModelInfer(vit_request()).raw_output_contents[0]
        tokens = translator.Translate(tpb.TranslateRequest(texts=["seven"])).translations[0].tokens
        # overwritten in place (as `cp` does), deleted, and a config that no longer parses
        (repo / "tiny-vit" / "1" / "model.onnx").write_bytes(b"\0" * 100)
        (repo / "tiny-mt" / "tokenizer.json").unlink()
        (repo / "tiny-mt" / "config.yaml").write_text("task: [\n")
        for _ in range(20):
            assert kserve.ModelInfer(vit_request()).raw_output_contents[0] == logits
            assert translator.Translate(tpb.TranslateRequest(texts=["seven"])).translations[0].tokens == tokens
        # an explicit reload of the broken files fails with the cause, and the loaded version goes on serving
        with pytest.raises(grpc.RpcError) as reload:
            kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny-vit"), metadata=token)
        assert reload.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "failed to load" in \
            reload.value.details()
        assert kserve.ModelInfer(vit_request()).raw_output_contents[0] == logits
        assert kserve.ModelReady(pb.ModelReadyRequest(name="tiny-vit")).ready
        index = {m.name: m for m in kserve.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        assert index["tiny-vit"].state == "READY" and "reload failed" in index["tiny-vit"].reason
        # good files again: the reload takes them
        shutil.copy(small_repo / "tiny-vit" / "1" / "model.onnx", repo / "tiny-vit" / "1" / "model.onnx")
        kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny-vit"), metadata=token)
        index = {m.name: m for m in kserve.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        assert index["tiny-vit"].state == "READY" and index["tiny-vit"].reason == ""
        assert kserve.ModelInfer(vit_request()).raw_output_contents[0] == logits


def test_sigkill_then_restart_serves_the_same_answers(small_repo: Path) -> None:
    server = start_server(small_repo)
    port = server.port

    def answers(address: str) -> tuple[bytes, list[str]]:
        with grpc.insecure_channel(address) as channel:
            logits = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(vit_request()).raw_output_contents[0]
            stream = [m.piece for m in tpb_grpc.TranslatorStub(channel).TranslateStream(
                tpb.TranslateStreamRequest(text="one hundred and seven"))]
            return logits, stream

    before = answers(server.address)
    server.process.send_signal(signal.SIGKILL)
    assert server.process.wait(10) == -signal.SIGKILL
    # the same port: nothing of the killed process holds it
    with running_server(small_repo, port=port) as restarted:
        assert restarted.port == port and answers(restarted.address) == before


@pytest.fixture(scope="module")
def weights_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A translator wide enough (d_model 512) that its embedding lives in the entry's memory-mapped weights.bin."""
    import torch

    repo = tmp_path_factory.mktemp("weights-repo")
    torch.manual_seed(2)
    export_random_translator(repo, "wide-mt", max_new_tokens=16, d_model=512, torch_checkpoint=False)
    assert (repo / "wide-mt" / "1" / "weights.bin").stat().st_size > 1 << 20
    return repo


@pytest.mark.parametrize("change", ["overwritten", "truncated"])
def test_weights_file_changed_under_a_served_model(weights_repo: Path, tmp_path: Path, change: str) -> None:
    """Was SIGBUS (the server died) when the memory-mapped weights.bin was truncated under it."""
    repo = tmp_path / "repo"
    shutil.copytree(weights_repo, repo)
    with running_server(repo) as server, grpc.insecure_channel(server.address) as channel:
        translator = tpb_grpc.TranslatorStub(channel)

        def translate() -> list[tuple[int, str]]:
            request = tpb.TranslateRequest(texts=["seven", "one hundred and seven"])
            return [(t.tokens, t.text) for t in translator.Translate(request).translations]

        before = translate()
        weights = repo / "wide-mt" / "1" / "weights.bin"
        weights.write_bytes(b"\x7f" * weights.stat().st_size if change == "overwritten" else b"")
        for _ in range(5):
            assert translate() == before
