"""A corpus of bad input against a real server: each case gets a named client error, never a crash.

Generated here (no binary fixtures): random bytes, truncated and corrupt PNG/JPEG, a PNG whose header claims
30 000 × 30 000 pixels (the decompression bomb's header, and a header that lies about the data after it),
images in unusual modes (1×1, CMYK, 16-bit, palette, animated), tensors with wrong dtypes, ranks and dims,
raw contents that disagree with the shape, both content kinds at once, missing/extra/duplicate inputs,
NaN and Inf, BYTES length prefixes that overrun, invalid UTF-8, empty, huge and control-character texts,
unknown models and versions, oversized batches. Each answer must be one of the client-error statuses with a
message naming the field — never ``INTERNAL`` or ``UNKNOWN`` — and a valid request right after each case must
still get the right answer. Valid-but-odd images (1×1, CMYK, 16-bit, palette, animated) must be answered OK.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from conftest import ServerProcess
from PIL import Image
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc
from transerve_client.codec import encode_bytes

CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.OUT_OF_RANGE}
RNG = np.random.default_rng(14)


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR says ``width × height`` (8-bit gray) followed by a few KB of compressed zeros."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 200_000, 9))
            + chunk(b"IEND", b""))


GRAY = Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8))
GOOD_PNG = encoded(GRAY, "PNG")
GOOD_JPEG = encoded(GRAY.convert("RGB"), "JPEG")
BAD_IMAGES: dict[str, bytes] = {
    "random bytes": RNG.bytes(2048),
    "empty": b"",
    "truncated png": GOOD_PNG[: len(GOOD_PNG) // 2],
    "png, corrupt crc": GOOD_PNG[:30] + bytes([GOOD_PNG[30] ^ 0xFF]) + GOOD_PNG[31:],
    "truncated jpeg": GOOD_JPEG[: len(GOOD_JPEG) // 2],
    "jpeg header only": GOOD_JPEG[:20],
    "bomb: 30000x30000 png header": png_claiming(30_000, 30_000),
    "header lies: 4000x4000 with little data": png_claiming(4000, 4000),
    "zero-size png header": png_claiming(0, 0),
}
ODD_GOOD_IMAGES: dict[str, bytes] = {
    "1x1": encoded(Image.new("L", (1, 1), 128), "PNG"),
    "cmyk jpeg": encoded(GRAY.convert("CMYK"), "JPEG"),
    "16-bit png": encoded(Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)), "PNG"),
    "palette png": encoded(GRAY.convert("P"), "PNG"),
    "animated gif": encoded(GRAY, "GIF", save_all=True, append_images=[GRAY.rotate(90)], loop=0),
    "la png": encoded(GRAY.convert("LA"), "PNG"),
    "wide 1000x3": encoded(Image.new("RGB", (1000, 3), (9, 9, 9)), "PNG"),
}


def image_infer(array: np.ndarray, datatype: str = "FP32", shape: list[int] | None = None,
                raw: bytes | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny-vit")
    request.inputs.add(name="images", datatype=datatype, shape=shape if shape is not None else list(array.shape))
    request.raw_input_contents.append(raw if raw is not None else array.tobytes())
    return request


def both_contents() -> pb.ModelInferRequest:
    request = image_infer(np.zeros((1, 3, 8, 8), "<f4"))
    request.inputs[0].contents.fp32_contents.extend([0.0] * 192)
    return request


def duplicate_input() -> pb.ModelInferRequest:
    request = image_infer(np.zeros((1, 3, 8, 8), "<f4"))
    request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 8, 8])
    request.raw_input_contents.append(np.zeros((1, 3, 8, 8), "<f4").tobytes())
    return request


def extra_input() -> pb.ModelInferRequest:
    request = image_infer(np.zeros((1, 3, 8, 8), "<f4"))
    request.inputs.add(name="mask", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.zeros(1, "<f4").tobytes())
    return request


def text_infer(raw: bytes, shape: list[int] | None = None, model: str = "tiny-mt", version: str = ""
               ) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="text", datatype="BYTES", shape=shape or [1])
    request.raw_input_contents.append(raw)
    return request


ok = np.zeros((1, 3, 8, 8), "<f4")
BAD_INFER: dict[str, Callable[[], pb.ModelInferRequest]] = {
    "fp64 datatype": lambda: image_infer(ok.astype("<f8"), "FP64"),
    "int8 datatype": lambda: image_infer(ok.astype("i1"), "INT8"),
    "unknown datatype": lambda: image_infer(ok, "FLOAT"),
    "rank 3": lambda: image_infer(ok[0]),
    "rank 5": lambda: image_infer(ok[None]),
    "negative dim": lambda: image_infer(ok, shape=[-1, 3, 8, 8]),
    "zero dim": lambda: image_infer(ok, shape=[0, 3, 8, 8], raw=b""),
    "absurd dims": lambda: image_infer(ok, shape=[1 << 30, 1 << 30, 8, 8]),
    "raw shorter than shape": lambda: image_infer(ok, raw=ok.tobytes()[:-1]),
    "raw longer than shape": lambda: image_infer(ok, raw=ok.tobytes() + b"\0\0\0\0"),
    "both typed and raw contents": both_contents,
    "missing input": lambda: pb.ModelInferRequest(model_name="tiny-vit"),
    "extra input": extra_input,
    "duplicate input": duplicate_input,
    "NaN pixels": lambda: image_infer(np.full((1, 3, 8, 8), np.nan, "<f4")),
    "Inf pixels": lambda: image_infer(np.full((1, 3, 8, 8), np.inf, "<f4")),
    "bytes prefix overruns": lambda: text_infer(struct.pack("<I", 1000) + b"seven"),
    "bytes prefix truncated": lambda: text_infer(b"\x05\x00"),
    "bytes count disagrees": lambda: text_infer(encode_bytes(["seven"]), shape=[2]),
    "invalid utf-8 text": lambda: text_infer(encode_bytes([b"\xff\xfe\xfa"])),
    "empty text": lambda: text_infer(encode_bytes([b""])),
    "1 MB text": lambda: text_infer(encode_bytes([b"seven " * 180_000])),
    "unknown model": lambda: text_infer(encode_bytes(["seven"]), model="nope"),
    "unknown version": lambda: text_infer(encode_bytes(["seven"]), version="7"),
    "version 0": lambda: text_infer(encode_bytes(["seven"]), version="0"),
    "negative version": lambda: text_infer(encode_bytes(["seven"]), version="-1"),
    "batch over the limit": lambda: image_infer(np.zeros((65, 3, 8, 8), "<f4")),
}
BAD_TRANSLATE = {
    "empty text": tpb.TranslateRequest(texts=[""]),
    "no texts": tpb.TranslateRequest(texts=[]),
    "1 MB text": tpb.TranslateRequest(texts=["seven " * 180_000]),
    "control characters": tpb.TranslateRequest(texts=["\x00\x01\x1b[2J\x7f"]),
    "beam size absurd": tpb.TranslateRequest(texts=["seven"], options=tpb.TranslateOptions(beam_size=10**9)),
    "max_new_tokens absurd": tpb.TranslateRequest(texts=["seven"],
                                                  options=tpb.TranslateOptions(max_new_tokens=4_000_000_000)),
    "length penalty NaN": tpb.TranslateRequest(texts=["seven"],
                                               options=tpb.TranslateOptions(length_penalty=float("nan"))),
    "too many texts": tpb.TranslateRequest(texts=["seven"] * 10_000),
    "unknown model": tpb.TranslateRequest(texts=["seven"], model="../tiny-mt"),
}


@pytest.fixture(scope="module")
def channel(server: ServerProcess):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def healthy(channel: grpc.Channel) -> Callable[[], None]:
    """Asserts the server still gives the right answers (captured once, before any bad input)."""
    kserve, translator = pb_grpc.GRPCInferenceServiceStub(channel), tpb_grpc.TranslatorStub(channel)
    logits = kserve.ModelInfer(image_infer(ok)).raw_output_contents[0]
    text = translator.Translate(tpb.TranslateRequest(texts=["seven"])).translations[0].text

    def check() -> None:
        assert kserve.ModelInfer(image_infer(ok)).raw_output_contents[0] == logits
        assert translator.Translate(tpb.TranslateRequest(texts=["seven"])).translations[0].text == text

    return check


def client_error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() in CLIENT_ERRORS, (e.code(), e.details())
        return e.code(), e.details() or ""
    raise AssertionError("accepted")


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_are_refused_by_field(channel: grpc.Channel, healthy: Callable[[], None], case: str) -> None:
    request = tpb.ClassifyRequest(model="tiny-vit", images=[tpb.Image(encoded=GOOD_PNG),
                                                            tpb.Image(encoded=BAD_IMAGES[case])])
    _, message = client_error(lambda: tpb_grpc.ClassifierStub(channel).Classify(request, timeout=30))
    assert message.startswith("images[1]"), message
    healthy()


@pytest.mark.parametrize("case", list(ODD_GOOD_IMAGES))
def test_odd_but_valid_images_are_answered(channel: grpc.Channel, healthy: Callable[[], None], case: str) -> None:
    request = tpb.ClassifyRequest(model="tiny-vit", images=[tpb.Image(encoded=ODD_GOOD_IMAGES[case])], top_k=1)
    response = tpb_grpc.ClassifierStub(channel).Classify(request, timeout=30)
    assert len(response.results) == 1 and 0 < response.results[0].predictions[0].score <= 1
    healthy()


@pytest.mark.parametrize("case", list(BAD_INFER))
def test_bad_infer_requests_are_refused_by_field(channel: grpc.Channel, healthy: Callable[[], None],
                                                 case: str) -> None:
    _, message = client_error(lambda: pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(BAD_INFER[case]()))
    assert any(word in message for word in ("input", "model", "version", "text", "limit")), message
    healthy()


@pytest.mark.parametrize("case", list(BAD_TRANSLATE))
def test_bad_translations_are_refused_by_field(channel: grpc.Channel, healthy: Callable[[], None],
                                               case: str) -> None:
    translator = tpb_grpc.TranslatorStub(channel)
    _, message = client_error(lambda: translator.Translate(BAD_TRANSLATE[case], timeout=30))
    assert any(w in message for w in ("texts", "beam_size", "max_new_tokens", "length_penalty", "model")), message
    if BAD_TRANSLATE[case].texts:
        stream = tpb.TranslateStreamRequest(text=BAD_TRANSLATE[case].texts[0], model=BAD_TRANSLATE[case].model,
                                            options=BAD_TRANSLATE[case].options)
        if case != "too many texts":
            client_error(lambda: list(translator.TranslateStream(stream, timeout=30)))
    healthy()
