"""Bring-your-own ONNX (``task: tensor``): ``transerve repo add`` reads the graph's tensors, the server validates
requests against them and batches over a dynamic first axis. Graphs are built here with ``onnx.helper``; every
answer is checked against numpy computing the same formula (exact: the ops are elementwise, casts and argmax).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import yaml
from helpers import ServerProcess, running_server
from onnx import TensorProto, helper
from transerve.cli import app
from transerve.server.backends.sessions import make_session
from transerve.server.engine.model_config import ModelConfig
from transerve.server.engine.tensor_model import TensorModel
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client.codec import add_tensor, tensors_to_numpy
from typer.testing import CliRunner


def mixed_graph(path: Path) -> None:
    """x FP32 [N, 4], n INT64 [N, 4], h FP16 [N, 2] → y = x + float(n), k = argmax(x, 1) INT64 [N], h2 = 2h FP16."""
    two = helper.make_tensor("two", TensorProto.FLOAT16, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "nf"], ["y"]),
         helper.make_node("ArgMax", ["x"], ["k"], axis=1, keepdims=0), helper.make_node("Mul", ["h", "two"], ["h2"])],
        "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("n", TensorProto.INT64, ["N", 4]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("k", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("h2", TensorProto.FLOAT16, ["N", 2])], initializer=[two])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))


def fixed_graph(path: Path) -> None:
    """x FP32 [2, 3] → y = relu(x): a graph whose batch is fixed."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))


def expected(x: np.ndarray, n: np.ndarray, h: np.ndarray) -> dict[str, np.ndarray]:
    return {"y": x + n.astype(np.float32), "k": x.argmax(1).astype(np.int64), "h2": h * np.float16(2)}


def mixed_inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((rows, 4)).astype(np.float32), "n": rng.integers(-5, 5, (rows, 4)),
            "h": rng.standard_normal((rows, 2)).astype(np.float16)}


@pytest.fixture(scope="module")
def tensor_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("byo")
    mixed_graph(folder / "mixed.onnx")
    fixed_graph(folder / "fixed.onnx")
    repo = folder / "repo"
    for args in (["mixed.onnx"], ["fixed.onnx", "--name", "fixed-batch"]):
        result = CliRunner().invoke(app, ["repo", "add", str(folder / args[0]), "--repo", str(repo), *args[1:]])
        assert result.exit_code == 0, result.output
    return repo


@pytest.fixture(scope="module")
def served(tensor_repo: Path) -> Iterator[ServerProcess]:
    with running_server(tensor_repo) as proc:
        yield proc


def test_repo_add_reads_the_graphs_tensors(tensor_repo: Path) -> None:
    mixed = yaml.safe_load((tensor_repo / "mixed" / "config.yaml").read_text())
    assert mixed["task"] == "tensor" and mixed["max_batch_size"] == 64
    assert mixed["inputs"] == [{"name": "x", "datatype": "FP32", "dims": [-1, 4]},
                               {"name": "n", "datatype": "INT64", "dims": [-1, 4]},
                               {"name": "h", "datatype": "FP16", "dims": [-1, 2]}]
    assert [o["datatype"] for o in mixed["outputs"]] == ["FP32", "INT64", "FP16"]
    fixed = yaml.safe_load((tensor_repo / "fixed-batch" / "config.yaml").read_text())
    assert fixed["max_batch_size"] == 1 and fixed["inputs"][0]["dims"] == [2, 3]
    assert (tensor_repo / "mixed" / "1" / "model.onnx").is_file()


def test_repo_add_refuses_what_is_not_onnx(tmp_path: Path) -> None:
    (tmp_path / "notes.onnx").write_text("not a model")
    result = CliRunner().invoke(app, ["repo", "add", str(tmp_path / "notes.onnx"), "--repo", str(tmp_path / "r")])
    assert result.exit_code == 2 and "not a loadable ONNX model" in result.output
    assert len(result.output.strip().splitlines()) <= 2 and "Traceback" not in result.output  # one line (wrapped)
    assert not (tmp_path / "r").exists()
    fixed_graph(tmp_path / "fixed.onnx")
    result = CliRunner().invoke(app, ["repo", "add", str(tmp_path / "fixed.onnx"), "--repo", str(tmp_path / "r"),
                                      "--max-batch-size", "8"])
    assert result.exit_code == 2 and "first dimension is fixed" in result.output


def infer(stub: pb_grpc.GRPCInferenceServiceStub, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    request = pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        add_tensor(request.inputs, request.raw_input_contents, name, array)
    reply = stub.ModelInfer(request)
    return tensors_to_numpy(reply.outputs, reply.raw_output_contents)


def test_served_answers_match_the_formula(served: ServerProcess) -> None:
    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        inputs = mixed_inputs(3, 0)
        got = infer(stub, "mixed", inputs)
        for name, value in expected(**inputs).items():
            np.testing.assert_array_equal(got[name], value)
            assert got[name].dtype == value.dtype
        x = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], np.float32)
        np.testing.assert_array_equal(infer(stub, "fixed-batch", {"x": x})["y"], np.maximum(x, 0))
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="mixed"))
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == \
            [("x", "FP32", [-1, 4]), ("n", "INT64", [-1, 4]), ("h", "FP16", [-1, 2])]


def test_concurrent_requests_are_batched_and_split_back(served: ServerProcess) -> None:
    async def run() -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def one(i: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
                inputs = mixed_inputs(1 + i % 3, i)
                request = pb.ModelInferRequest(model_name="mixed")
                for name, array in inputs.items():
                    add_tensor(request.inputs, request.raw_input_contents, name, array)
                reply = await stub.ModelInfer(request)
                return inputs, tensors_to_numpy(reply.outputs, reply.raw_output_contents)

            return await asyncio.gather(*(one(i) for i in range(48)))

    for inputs, got in asyncio.run(run()):
        for name, value in expected(**inputs).items():
            np.testing.assert_array_equal(got[name], value)


def test_a_batch_is_split_back_in_order(tensor_repo: Path) -> None:
    """The batch path itself, without relying on timing to form a batch: three payloads in one call."""
    config = ModelConfig.model_validate(yaml.safe_load((tensor_repo / "mixed" / "config.yaml").read_text()))
    model = TensorModel(config, "1", "onnxruntime", {"model": make_session(tensor_repo / "mixed" / "1" /
                                                                           "model.onnx")}, lambda *a: None)
    payloads = [mixed_inputs(rows, seed) for seed, rows in enumerate((2, 1, 3))]
    for inputs, got in zip(payloads, model._run_batch(payloads), strict=True):
        for name, value in expected(**inputs).items():
            np.testing.assert_array_equal(got[name], value)


BAD = {
    "float64 for FP32": ({**mixed_inputs(1, 0), "x": np.zeros((1, 4))}, "inputs.x: datatype float64 does not match"),
    "fixed dim": ({**mixed_inputs(1, 0), "x": np.zeros((1, 5), np.float32)}, "inputs.x: shape [1, 5] does not match"),
    "rank": ({**mixed_inputs(1, 0), "x": np.zeros((4,), np.float32)}, "inputs.x: shape [4] does not match"),
    "batch mismatch": ({**mixed_inputs(2, 0), "n": np.zeros((3, 4), np.int64)}, "inputs.n: batch of 3"),
    "over max batch": (mixed_inputs(65, 0), "batch of 65, the limit is 1 to 64"),
    "missing input": ({"x": np.zeros((1, 4), np.float32)}, "inputs: mixed takes ['x', 'n', 'h']"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_requests_are_validated_against_the_graph(served: ServerProcess, case: str) -> None:
    inputs, message = BAD[case]
    with grpc.insecure_channel(served.address) as channel, pytest.raises(grpc.RpcError) as info:
        infer(pb_grpc.GRPCInferenceServiceStub(channel), "mixed", inputs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (info.value.details() or "")


def test_rest_serves_tensor_models_with_fp16_and_int64(served: ServerProcess) -> None:
    import http.client

    inputs = mixed_inputs(2, 3)
    doc = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": {"x": "FP32", "n": "INT64", "h": "FP16"}[k],
                       "data": v.reshape(-1).tolist()} for k, v in inputs.items()]}
    connection = http.client.HTTPConnection("127.0.0.1", served.http_port, timeout=30)
    connection.request("POST", "/v2/models/mixed/infer", json.dumps(doc), {"content-type": "application/json"})
    reply = json.loads(connection.getresponse().read())
    connection.close()
    outputs = {o["name"]: o for o in reply["outputs"]}
    for name, value in expected(**inputs).items():
        assert outputs[name]["shape"] == list(value.shape)
        np.testing.assert_array_equal(np.array(outputs[name]["data"], value.dtype).reshape(value.shape), value)
