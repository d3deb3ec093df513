"""KServe v2 REST beside gRPC: a client no one here wrote (``tritonclient.http``), raw requests for every error
path, the spec's field names, and the OpenAPI document generated from the routes.

REST answers must be the gRPC answers: both run the same servicer (server/edge/rest.py), so logits are compared
exactly (the server serves fp32, so batching cannot move the last digits) and translations token for token.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as httpclient
from helpers import ServerProcess, running_server
from transerve.server.edge.rest import HTTP_STATUS, openapi_json
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client.codec import add_tensor, tensors_to_numpy

ROOT = Path(__file__).resolve().parent.parent
IMAGES = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def rest(small_repo: Path) -> Iterator[ServerProcess]:
    with running_server(small_repo, "--precision", "fp32", "--max-message-mb", "1") as proc:
        assert proc.http_port is not None, "".join(proc.output)
        yield proc


def grpc_infer(server: ServerProcess, model: str, name: str, array: np.ndarray) -> dict[str, np.ndarray]:
    request = pb.ModelInferRequest(model_name=model)
    add_tensor(request.inputs, request.raw_input_contents, name, array)
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    return tensors_to_numpy(reply.outputs, reply.raw_output_contents)


def call(server: ServerProcess, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def post_json(server: ServerProcess, path: str, doc: Any) -> tuple[int, Any]:
    status, _, body = call(server, "POST", path, json.dumps(doc).encode(), {"content-type": "application/json"})
    return status, json.loads(body)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http_classifies_like_grpc(rest: ServerProcess, binary: bool) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{rest.http_port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny-vit")
    assert client.get_server_metadata()["name"] == "transerve"
    meta = client.get_model_metadata("tiny-vit")
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 8, 8]}]
    assert meta["parameters"]["precision"] == "fp32"
    images = httpclient.InferInput("images", list(IMAGES.shape), "FP32")
    images.set_data_from_numpy(IMAGES, binary_data=binary)
    result = client.infer("tiny-vit", [images],
                          outputs=[httpclient.InferRequestedOutput("logits", binary_data=binary)])
    np.testing.assert_array_equal(result.as_numpy("logits"), grpc_infer(rest, "tiny-vit", "images", IMAGES)["logits"])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http_translates_bytes_like_grpc(rest: ServerProcess, binary: bool) -> None:
    texts = np.array([b"seven", b"twenty one", b"dreihundert"], dtype=np.object_)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{rest.http_port}")
    item = httpclient.InferInput("text", [3], "BYTES")
    item.set_data_from_numpy(texts, binary_data=binary)
    result = client.infer("tiny-mt", [item], outputs=[httpclient.InferRequestedOutput("translation",
                                                                                        binary_data=binary)])
    expected = grpc_infer(rest, "tiny-mt", "text", texts)["translation"]
    assert [bytes(t) if isinstance(t, bytes) else str(t).encode() for t in result.as_numpy("translation")] \
        == list(expected)


def test_json_fields_are_the_kserve_specs(rest: ServerProcess) -> None:
    status, _, body = call(rest, "GET", "/v2/models/tiny-vit/versions/1")
    assert status == 200 and set(json.loads(body)) == {"name", "versions", "platform", "inputs", "outputs",
                                                       "parameters"}
    doc = {"id": "r-1", "inputs": [{"name": "images", "shape": [1, 3, 8, 8], "datatype": "FP32",
                                    "data": IMAGES[:1].tolist()}]}  # nested row-major data is allowed
    status, reply = post_json(rest, "/v2/models/tiny-vit/infer", doc)
    assert status == 200 and set(reply) == {"model_name", "model_version", "id", "outputs"}
    assert reply["id"] == "r-1" and reply["model_name"] == "tiny-vit"
    (output,) = reply["outputs"]
    assert set(output) == {"name", "shape", "datatype", "data"} and output["shape"] == [1, 10]
    np.testing.assert_array_equal(np.array(output["data"], np.float32).reshape(1, 10),
                                  grpc_infer(rest, "tiny-vit", "images", IMAGES[:1])["logits"])
    status, _, body = call(rest, "GET", "/v2/health/live")
    assert status == 200 and json.loads(body) == {"live": True}
    status, index = post_json(rest, "/v2/repository/index", {})
    assert status == 200 and {m["name"] for m in index} == {"tiny-vit", "tiny-mt"}
    assert all(set(m) == {"name", "version", "state", "reason"} for m in index)


def image_doc(**changes: Any) -> dict[str, Any]:
    tensor = {"name": "images", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": IMAGES[:1].reshape(-1).tolist()}
    tensor.update(changes)
    return {"inputs": [tensor]}


BAD_BODIES: dict[str, tuple[bytes, dict[str, str], int, str]] = {
    "not json": (b"{nope", {}, 400, "body: not a JSON object"),
    "not an object": (b"[1, 2]", {}, 400, "body: must be a JSON object"),
    "no inputs": (b"{}", {}, 400, "inputs: required"),
    "few elements": (json.dumps(image_doc(data=[0.5] * 5)).encode(), {}, 400,
                     "inputs[0].data: 5 elements, the shape needs 192"),
    "ragged data": (json.dumps(image_doc(data=[[1.0], [1.0, 2.0]])).encode(), {}, 400, "inputs[0].data: not FP32"),
    "strings as floats": (json.dumps(image_doc(data=["a"] * 192)).encode(), {}, 400, "inputs[0].data: not FP32"),
    "unknown datatype": (json.dumps(image_doc(datatype="FLOAT")).encode(), {}, 400, "inputs[0].datatype: 'FLOAT'"),
    "negative shape": (json.dumps(image_doc(shape=[-1, 3, 8, 8])).encode(), {}, 400, "inputs[0].shape"),
    "too many elements": (json.dumps(image_doc(shape=[1 << 40, 3])).encode(), {}, 400,
                          "inputs[0].shape: 3298534883328 elements exceed the limit of"),
    "wrong input name": (json.dumps(image_doc(name="pixels")).encode(), {}, 400, "inputs: tiny-vit takes ['images']"),
    "wrong rank": (json.dumps(image_doc(shape=[192])).encode(), {}, 400, "inputs.images"),
    "unknown parameter": (json.dumps({**image_doc(), "parameters": {"beam": 2}}).encode(), {}, 400,
                          "parameters.beam: unknown parameter"),
    "binary past the body": (json.dumps(image_doc(data=None, parameters={"binary_data_size": 768})).encode(), {},
                             400, "inputs[0].parameters.binary_data_size"),
    "bad header length": (b"{}", {"Inference-Header-Content-Length": "x"}, 400,
                          "header inference-header-content-length: 'x'"),
    "header past the body": (b"{}", {"Inference-Header-Content-Length": "99"}, 400,
                             "header inference-header-content-length: 99 is outside"),
    "bytes after binary": (json.dumps(image_doc()).encode() + b"tail", {"Inference-Header-Content-Length":
                           str(len(json.dumps(image_doc())))}, 400, "body: 4 bytes after the last binary input"),
    "over the size limit": (b"{" + b" " * (1 << 20) + b"}", {}, 413, "body: 1048578 bytes exceed the limit of 1048576"),
    # the JSON parser recurses once a level: 200 000 levels were a 500 from its RecursionError
    "nested 200 000 deep": (b"[" * 200_000 + b"]" * 200_000, {}, 400, "body: JSON nested deeper than"),
    "nested deep in data": (b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": ' +
                            b"[" * 100_000 + b"]" * 100_000 + b"}]}", {}, 400, "body: JSON nested deeper than"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_requests_get_400_naming_the_field(rest: ServerProcess, case: str) -> None:
    body, headers, expected_status, expected_message = BAD_BODIES[case]
    status, reply_headers, reply = call(rest, "POST", "/v2/models/tiny-vit/infer", body, headers)
    assert status == expected_status, reply
    assert expected_message in json.loads(reply)["error"], reply
    assert reply_headers.get("x-request-id")  # errors carry the id the log line names
    # and the server is unharmed: the next request is answered
    assert post_json(rest, "/v2/models/tiny-vit/infer", image_doc())[0] == 200


def test_unknown_models_and_routes_get_404(rest: ServerProcess) -> None:
    for method, path in (("POST", "/v2/models/nope/infer"), ("GET", "/v2/models/nope"),
                         ("GET", "/v2/models/nope/ready"), ("GET", "/v2/models/tiny-vit/versions/7")):
        status, _, body = call(rest, method, path, b"{}" if method == "POST" else None)
        message = json.loads(body)["error"]
        assert status == 404 and ("'nope'" in message or "version" in message), body


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("GET", "/v2/nothing/here", 404), ("DELETE", "/v2/models/tiny-vit/infer", 405),
    ("POST", "/v2/repository/models/..%2F..%2Fetc/load", 404), ("PUT", "/v2/health/live", 405)])
def test_unknown_routes_and_methods_answer_in_the_kserve_error_format(rest: ServerProcess, method: str, path: str,
                                                                      expected: int) -> None:
    """Not FastAPI's {"detail": ...}: the same {"error": ...} and x-request-id as every other error."""
    status, headers, body = call(rest, method, path, b"{}" if method in ("POST", "PUT") else None,
                                 {"x-request-id": "route-check-1"})
    reply = json.loads(body)
    assert status == expected and list(reply) == ["error"], body
    assert reply["error"].startswith(f"{method} ") and headers["x-request-id"] == "route-check-1"
    if expected == 405:
        assert method not in headers["allow"] and headers["allow"], headers


def test_repository_control_is_refused_without_admin_tokens(rest: ServerProcess) -> None:
    status, reply = post_json(rest, "/v2/repository/models/tiny-vit/unload", {})
    assert status == 403 and "--admin-token-file" in reply["error"]


def test_shedding_and_deadlines_map_to_kserve_statuses() -> None:
    assert HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED] == 429
    assert HTTP_STATUS[grpc.StatusCode.UNAVAILABLE] == 503
    assert HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404 and HTTP_STATUS[grpc.StatusCode.INVALID_ARGUMENT] == 400


def test_openapi_is_served_generated_and_shipped(rest: ServerProcess) -> None:
    status, _, body = call(rest, "GET", "/v2/openapi.json")
    served = json.loads(body)
    assert status == 200 and served["openapi"].startswith("3.")
    assert {"/v2/health/ready", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer",
            "/v2/repository/index"} <= set(served["paths"])
    infer = served["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/InferenceRequest")
    schemas = set(served["components"]["schemas"])
    assert {"InferenceRequest", "RequestInput", "InferenceResponse", "ErrorBody"} <= schemas
    shipped = (ROOT / "protos" / "openapi.json").read_text()
    assert json.loads(shipped) == served == json.loads(openapi_json()), \
        "protos/openapi.json is stale: run `make openapi`"


def test_document_options_over_rest(rest: ServerProcess) -> None:
    """``glossary`` as a JSON list, ``format``, ``scores`` and ``alignments`` (the ``sentences`` output: one JSON
    list per text) — the TranslateOptions fields, as KServe parameters."""
    def infer(text: str, **parameters: Any) -> tuple[int, Any]:
        return post_json(rest, "/v2/models/tiny-mt/infer", {"parameters": {"max_new_tokens": 16, **parameters},
                         "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]})

    status, reply = infer("seven", glossary=[{"source": "seven", "target": "sieben"}])
    assert status == 200 and "sieben" in reply["outputs"][0]["data"][0]
    status, reply = infer("<p>seven <b>hundred</b></p>", format="html")
    assert status == 200 and reply["outputs"][0]["data"][0].startswith("<p>")
    status, reply = infer("seven. nine", scores=True, alignments=True)
    outputs = {o["name"]: o["data"][0] for o in reply["outputs"]}
    sentences = json.loads(outputs["sentences"])
    assert status == 200 and [s["source"] for s in sentences] == [[0, 6], [7, 11]]
    assert all(s["mean_log_prob"] < 0 < s["min_token_prob"] <= 1 for s in sentences)
    status, reply = infer("seven", glossary=[{"source": "seven"}])
    assert status == 400 and "parameters.glossary[0]" in reply["error"]
