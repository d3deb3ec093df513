"""A real server process on a loopback port, exercised over plain gRPC (generated stubs, no SDK)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import ServerProcess, metrics_text, offline_text, png_bytes, sentence_budget
from PIL import Image
from transerve.preprocessing import ImagePreprocessing
from transerve.server.backends.sessions import make_session
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc
from transerve_client.codec import decode_bytes, encode_bytes

TEXTS = ["three hundred and forty-two", "seven", "one thousand and one"]


@pytest.fixture(scope="module")
def channel(server: ServerProcess):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def kserve(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def image_request(images: np.ndarray, raw: bool = True, model: str = "tiny-vit") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="req-1")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=list(images.shape))
    if raw:
        request.raw_input_contents.append(images.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(images.reshape(-1).tolist())
    return request


def offline_logits(repo: Path, images: np.ndarray) -> np.ndarray:
    return make_session(repo / "tiny-vit" / "1" / "model.onnx").run(None, {"images": images})[0]


def offline_translations(repo: Path, texts: list[str]) -> list[str]:
    return [offline_text(repo, "tiny-mt", text, sentence_budget(repo, "tiny-mt", text)) for text in texts]


def test_health_and_server_metadata(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tiny-vit", "tiny-mt", "inference.GRPCInferenceService", "transerve.v1.Translator"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    stub = kserve(channel)
    assert stub.ServerLive(pb.ServerLiveRequest()).live and stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "transerve"
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny-vit")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="tiny-vit", version="7")).ready


def test_model_metadata_describes_real_tensors(channel: grpc.Channel) -> None:
    meta = kserve(channel).ModelMetadata(pb.ModelMetadataRequest(name="tiny-vit"))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("images", "FP32", [-1, 3, 8, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("logits", "FP32", [-1, 10])]
    assert meta.versions == ["1"] and meta.platform == "onnxruntime_onnx"


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_model_infer_classifier_matches_offline(channel: grpc.Channel, small_repo: Path, raw: bool) -> None:
    images = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    response = kserve(channel).ModelInfer(image_request(images, raw))
    assert response.id == "req-1" and response.outputs[0].name == "logits"
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
    np.testing.assert_allclose(logits, offline_logits(small_repo, images), atol=1e-5)


def test_model_infer_translator_bytes(channel: grpc.Channel, small_repo: Path) -> None:
    request = pb.ModelInferRequest(model_name="tiny-mt")
    request.inputs.add(name="text", datatype="BYTES", shape=[len(TEXTS)])
    request.raw_input_contents.append(encode_bytes(TEXTS))
    response = kserve(channel).ModelInfer(request)
    out = decode_bytes(response.raw_output_contents[0], len(TEXTS), "translation")
    assert [o.decode() for o in out] == offline_translations(small_repo, TEXTS)


def test_translate_matches_offline(channel: grpc.Channel, small_repo: Path) -> None:
    response = tpb_grpc.TranslatorStub(channel).Translate(tpb.TranslateRequest(texts=TEXTS))
    assert response.model == "tiny-mt"  # the default translator
    assert [t.text for t in response.translations] == offline_translations(small_repo, TEXTS)


def test_classify_encoded_images_of_any_mode_and_tensors(channel: grpc.Channel, small_repo: Path) -> None:
    pixels = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    expected = offline_logits(small_repo, ImagePreprocessing(size=8).apply([Image.fromarray(pixels)]))[0]
    images = [tpb.Image(encoded=png_bytes(pixels, mode)) for mode in ("L", "RGB", "RGBA")]
    tensor = ImagePreprocessing(size=8).apply_one(Image.fromarray(pixels))
    images.append(tpb.Image(tensor=tpb.Tensor(shape=[3, 8, 8], data=tensor.astype("<f4").tobytes())))
    response = tpb_grpc.ClassifierStub(channel).Classify(tpb.ClassifyRequest(images=images, top_k=3))
    best = int(np.argmax(expected))
    for result in response.results:
        assert len(result.predictions) == 3
        assert result.predictions[0].index == best and result.predictions[0].label == f"class-{best}"
        scores = [p.score for p in result.predictions]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


BAD_REQUESTS = {
    "unknown model": (lambda: pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    "wrong shape": (lambda: image_request(np.zeros((1, 3, 9, 9), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
                    "inputs.images: shape [1, 3, 9, 9]"),
    "raw size": (lambda: _truncated(), grpc.StatusCode.INVALID_ARGUMENT, "needs 768"),
    "bad datatype": (lambda: _datatype("FLOAT32"), grpc.StatusCode.INVALID_ARGUMENT, "datatype 'FLOAT32'"),
    "batch too big": (lambda: image_request(np.zeros((65, 3, 8, 8), np.float32)),
                      grpc.StatusCode.INVALID_ARGUMENT, "limit is 64"),
    "no model name": (lambda: pb.ModelInferRequest(), grpc.StatusCode.INVALID_ARGUMENT, "model_name"),
}


def _truncated() -> pb.ModelInferRequest:
    request = image_request(np.zeros((1, 3, 8, 8), np.float32))
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    return request


def _datatype(name: str) -> pb.ModelInferRequest:
    request = image_request(np.zeros((1, 3, 8, 8), np.float32))
    request.inputs[0].datatype = name
    return request


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_infer_requests_name_field_and_limit(channel: grpc.Channel, case: str) -> None:
    build, code, words = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        kserve(channel).ModelInfer(build())
    assert info.value.code() == code and words in info.value.details()


@pytest.mark.parametrize(("request_", "words"), [
    (tpb.ClassifyRequest(images=[tpb.Image(encoded=b"not an image")]), "images[0]: not a decodable image"),
    (tpb.ClassifyRequest(images=[]), "images: 0 images"),
    (tpb.ClassifyRequest(images=[tpb.Image(tensor=tpb.Tensor(shape=[3, 8, 8], data=b"x"))]), "images[0].tensor"),
    (tpb.ClassifyRequest(model="tiny-mt", images=[tpb.Image(encoded=b"x")]), "not classify"),
])
def test_bad_classify_requests(channel: grpc.Channel, request_: tpb.ClassifyRequest, words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        tpb_grpc.ClassifierStub(channel).Classify(request_)
    assert words in info.value.details()
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


WHOLE = tpb.TranslateOptions(segmentation=tpb.SEGMENTATION_WHOLE)


@pytest.mark.parametrize(("request_", "words"), [
    (tpb.TranslateRequest(texts=["x" * 5000], options=WHOLE), "texts[0]: 5000 characters exceed the limit of 4096"),
    (tpb.TranslateRequest(texts=["x" * 100_001]), "texts[0]: 100001 characters exceed max_document_chars 100000"),
    (tpb.TranslateRequest(texts=["seven"], options=tpb.TranslateOptions(max_new_tokens=999)),
     "max_new_tokens: 999 exceeds the model's limit of 47 (max_new_tokens_limit)"),
    (tpb.TranslateRequest(texts=[" ".join(["seven"] * 60)], options=WHOLE), "tokens exceed max_input_tokens 47"),
    (tpb.TranslateRequest(texts=["seven"], options=tpb.TranslateOptions(segmentation=7)),
     "options.segmentation: 7 is not a Segmentation value"),
    (tpb.TranslateRequest(texts=[]), "texts: 0 texts"),
])
def test_bad_translate_requests(channel: grpc.Channel, request_: tpb.TranslateRequest, words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        tpb_grpc.TranslatorStub(channel).Translate(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()


def test_a_bad_request_never_harms_good_ones(channel: grpc.Channel, small_repo: Path) -> None:
    images = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    expected = offline_logits(small_repo, images)
    stub = kserve(channel)

    def good() -> np.ndarray:
        r = stub.ModelInfer(image_request(images))
        return np.frombuffer(r.raw_output_contents[0], "<f4").reshape(1, 10)

    def bad() -> grpc.StatusCode:
        try:
            stub.ModelInfer(_truncated())
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(16) as pool:
        goods = [pool.submit(good) for _ in range(40)]
        bads = [pool.submit(bad) for _ in range(40)]
        for f in goods:
            np.testing.assert_allclose(f.result(), expected, atol=1e-5)
        assert {f.result() for f in bads} == {grpc.StatusCode.INVALID_ARGUMENT}


def test_statistics_and_metrics_count_requests(channel: grpc.Channel, server: ServerProcess) -> None:
    stub = kserve(channel)
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny-vit")).model_stats[0]
    stub.ModelInfer(image_request(np.zeros((4, 3, 8, 8), np.float32)))
    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny-vit")).model_stats[0]
    assert after.inference_count == before.inference_count + 4
    assert after.execution_count == before.execution_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    text = metrics_text(server)
    assert 'transerve_requests_total{code="OK",model="tiny-vit",rpc="ModelInfer"}' in text
    assert "transerve_batch_size_bucket" in text and "transerve_queue_seconds_count" in text


def test_default_log_names_the_backend_and_writes_no_access_lines(channel: grpc.Channel,
                                                                   server: ServerProcess) -> None:
    """`--backend auto` says which backend it picked and why; without --access-log requests are not logged."""
    kserve(channel).ModelInfer(image_request(np.zeros((1, 3, 8, 8), np.float32)))
    output = "".join(server.output)
    assert re.search(r"INFO transerve\.server\.backends\.runtime: \S+tiny-vit/1: backend onnxruntime \(.+\)", output)
    assert "ready on onnxruntime" in output and "transerve.access" not in output


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"inference.GRPCInferenceService", "transerve.v1.Translator", "transerve.v1.Classifier",
            "grpc.health.v1.Health"} <= names


def test_stream_infer_reports_errors_in_stream(channel: grpc.Channel) -> None:
    requests = [image_request(np.zeros((1, 3, 8, 8), np.float32)), pb.ModelInferRequest(model_name="nope"),
                image_request(np.ones((2, 3, 8, 8), np.float32))]
    responses = list(kserve(channel).ModelStreamInfer(iter(requests)))
    assert [bool(r.error_message) for r in responses] == [False, True, False]
    assert "NOT_FOUND" in responses[1].error_message
    assert list(responses[2].infer_response.outputs[0].shape) == [2, 10]



def test_cancelled_streams_leave_the_server_serving(channel: grpc.Channel, small_repo: Path) -> None:
    stub = tpb_grpc.TranslatorStub(channel)
    # (the messages, their order and that they join to the translation: tests/test_stream_join.py)
    for _ in range(20):  # cancelled mid-way: the server keeps serving everyone else
        call = stub.TranslateStream(tpb.TranslateStreamRequest(text=TEXTS[0]))
        next(call)
        call.cancel()
    assert [t.text for t in stub.Translate(tpb.TranslateRequest(texts=TEXTS)).translations] == \
        offline_translations(small_repo, TEXTS)


def test_a_labels_file_without_its_final_newline_keeps_its_last_label(tmp_path: Path) -> None:
    from transerve.server.engine.classifier import read_labels

    for text in ("zero\none\ntwo", "zero\none\ntwo\n"):
        (tmp_path / "labels.txt").write_text(text)
        assert read_labels(tmp_path / "labels.txt") == ["zero", "one", "two"]
    assert read_labels(tmp_path / "missing.txt") == []
