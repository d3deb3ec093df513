"""Property-based fuzzing of a real server: whatever a client sends, only a client-side status comes back.

Strategies of our own (the protobuf plugins for hypothesis do not load on current protobuf) build
``ModelInferRequest``, ``ClassifyRequest``, ``TranslateRequest`` and ``TranslateStreamRequest`` messages
from parts that are sometimes valid and often not: model names and versions, tensor names, datatypes,
shapes with negative, zero and huge dims, raw and typed contents of any length, request parameters of every
type, texts with any characters, options at and past their limits. Then random bytes go to every method of
every service through a raw channel. Derandomized (a fixed seed per test), so CI runs the same examples.
After each test, health answers and a valid request still gets the right answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import record_figures
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.OUT_OF_RANGE}
EXAMPLES = 500  # per message kind: 4 kinds = 2 000 examples, plus the raw bytes
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
             "BYTES", "BF16"]

# mostly real models and versions, so that most examples reach the checks behind the model lookup
real_versions = st.sampled_from(["", "1"])
odd_names = st.one_of(st.sampled_from(["nope", "../tiny-vit", "tiny-vit\x00", "tiny-mt/1"]), st.text(max_size=12))


def names(*real: str) -> st.SearchStrategy[str]:
    """Mostly ``real`` (the task's own models; "" is the default one), sometimes anything."""
    return mostly(st.sampled_from(real), odd_names)


def mostly(usual: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` four times in five (hypothesis' one_of does not weight its branches)."""
    return st.integers(0, 4).flatmap(lambda i: odd if i == 0 else usual)


versions = mostly(real_versions, st.sampled_from(["0", "-1", "99", "1.0"]) | st.text(max_size=4))
dims = st.lists(st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 65]) | st.integers(-(1 << 40), 1 << 40), max_size=5)
texts = st.text(max_size=64) | st.sampled_from(["seven", "one hundred and seven", " ", "\t\n", "<p>seven <b>x",
                                                "<!-- -->", "&amp;<br>", "<script>seven</script>"]) | \
    st.lists(st.sampled_from(["seven.", "Eight!", "\n\n", "  ", "- nine", "1.", "…", "x" * 300, "。"]),
             max_size=12).map("".join)  # documents: sentences, paragraphs, list items, a long unpunctuated run
uint32 = st.sampled_from([0, 1, 2, 4, 8, 9, 16, 17]) | st.integers(0, (1 << 32) - 1)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def parameters(draw: st.DrawFn, message: pb.ModelInferRequest) -> None:
    keys = st.sampled_from(["beam_size", "max_new_tokens", "length_penalty", "stream", "timeout", "top_k",
                            "segmentation", "cache"])
    for key in draw(st.lists(keys | st.text(max_size=8), max_size=3)):
        slot = message.parameters[key]
        choice = draw(st.integers(0, 4))
        if choice == 0:
            slot.bool_param = draw(st.booleans())
        elif choice == 1:
            slot.int64_param = draw(st.integers(-(1 << 63), (1 << 63) - 1))
        elif choice == 2:
            slot.string_param = draw(st.text(max_size=8))
        elif choice == 3:
            slot.double_param = draw(st.floats(allow_nan=True, allow_infinity=True))
        else:
            slot.uint64_param = draw(st.integers(0, (1 << 64) - 1))


@st.composite
def near_valid_infer(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A request for one of the two models with the right input name, often right in every other way too."""
    if draw(st.booleans()):
        request = pb.ModelInferRequest(model_name="tiny-vit", model_version=draw(real_versions))
        n = draw(st.integers(1, 3))
        shape = draw(st.sampled_from([[n, 3, 8, 8]] * 3 + [[n, 3, 8], [n, 8, 8, 3], [n, 3, 8, 9]]))
        values = draw(st.lists(floats, min_size=n * 192, max_size=n * 192))
        request.inputs.add(name="images", datatype=draw(st.sampled_from(["FP32"] * 4 + ["FP16", "BYTES"])),
                           shape=shape)
        request.raw_input_contents.append(np.array(values, "<f4").tobytes())
    else:
        request = pb.ModelInferRequest(model_name="tiny-mt", model_version=draw(real_versions))
        items = draw(st.lists(st.binary(max_size=24) | texts.map(str.encode), min_size=1, max_size=3))
        request.inputs.add(name="text", datatype=draw(st.sampled_from(["BYTES"] * 4 + ["FP32"])),
                           shape=draw(st.sampled_from([[len(items)]] * 3 + [[len(items) + 1], [1, len(items)]])))
        request.raw_input_contents.append(b"".join(len(b).to_bytes(4, "little") + b for b in items))
    draw(parameters(request))
    return request


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    if draw(st.booleans()):
        return draw(near_valid_infer())
    request = pb.ModelInferRequest(model_name=draw(names("tiny-vit", "tiny-mt")), model_version=draw(versions))
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(st.sampled_from(["images", "text", "mask"]) | st.text(max_size=6)),
                                    datatype=draw(st.sampled_from(DATATYPES) | st.text(max_size=5)),
                                    shape=draw(dims))
        if raw:
            request.raw_input_contents.append(draw(st.binary(max_size=1024) | st.sampled_from(
                [np.zeros((1, 3, 8, 8), "<f4").tobytes(), b"\x05\x00\x00\x00seven"])))
        elif draw(st.booleans()):
            tensor.contents.fp32_contents.extend(draw(st.lists(floats, max_size=256)))
        else:
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=32), max_size=4)))
    for _ in range(draw(st.integers(0, 2))):
        request.outputs.add(name=draw(st.sampled_from(["logits", "translation"]) | st.text(max_size=6)))
    draw(parameters(request))
    return request


@st.composite
def classify_requests(draw: st.DrawFn) -> tpb.ClassifyRequest:
    request = tpb.ClassifyRequest(model=draw(names("tiny-vit", "")), top_k=draw(uint32))
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            request.images.add(encoded=draw(st.binary(max_size=512)))
        else:
            shape = draw(st.sampled_from([[3, 8, 8]] * 3 + [[1, 3, 8, 8], [2, 3, 8, 8]]) | dims)
            data = np.array(draw(st.lists(floats, min_size=192, max_size=192)), "<f4").tobytes() \
                if draw(st.booleans()) else draw(st.binary(max_size=1024))
            request.images.add(tensor=tpb.Tensor(shape=shape, data=data))
    return request


glossary_terms = st.sampled_from(["seven", "sieben", "", "hundred", "七", "x" * 300]) | st.text(max_size=12)


@st.composite
def translate_options(draw: st.DrawFn) -> tpb.TranslateOptions:
    options = tpb.TranslateOptions(beam_size=draw(uint32), max_new_tokens=draw(uint32),
                                   segmentation=draw(st.sampled_from([0, 0, 1, 2, 1 << 20])))
    if draw(st.booleans()):
        options.length_penalty = draw(floats)
    if draw(st.booleans()):
        options.cache = draw(st.booleans())
    options.format = draw(st.sampled_from([0, 0, 0, 1, 2]))
    options.scores, options.alignments = draw(st.booleans()), draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        options.glossary.add(source=draw(glossary_terms), target=draw(glossary_terms))
    return options


# language codes: valid, aliased, auto, unknown, malformed, absurd (tiny-mt declares en → de)
language_codes = st.sampled_from(["", "", "en", "de", "deu", "de-AT", "auto", "fr", "xx", "und", "!!", "a" * 60]) \
    | st.text(max_size=8)


@st.composite
def translate_requests(draw: st.DrawFn) -> tpb.TranslateRequest:
    listed = draw(st.lists(texts, min_size=draw(st.integers(0, 1)), max_size=4))
    return tpb.TranslateRequest(model=draw(names("tiny-mt", "")), texts=listed, options=draw(translate_options()),
                                source_language=draw(language_codes), target_language=draw(language_codes),
                                detection=draw(st.sampled_from([0, 0, 1, 2, 1 << 20])))


@st.composite
def stream_requests(draw: st.DrawFn) -> tpb.TranslateStreamRequest:
    return tpb.TranslateStreamRequest(model=draw(names("tiny-mt", "")), text=draw(texts),
                                      options=draw(translate_options()), source_language=draw(language_codes),
                                      target_language=draw(language_codes))


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def still_right(channel: grpc.Channel) -> Callable[[], None]:
    """Health SERVING and the same answers as before any fuzzing (captured once)."""
    kserve, translator = pb_grpc.GRPCInferenceServiceStub(channel), tpb_grpc.TranslatorStub(channel)
    request = pb.ModelInferRequest(model_name="tiny-vit")
    request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 8, 8])
    request.raw_input_contents.append(np.linspace(-1, 1, 192, dtype="<f4").tobytes())
    logits = kserve.ModelInfer(request).raw_output_contents[0]
    tokens = translator.Translate(tpb.TranslateRequest(texts=["seven"])).translations[0].tokens

    def check() -> None:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert kserve.ModelInfer(request).raw_output_contents[0] == logits
        assert translator.Translate(tpb.TranslateRequest(texts=["seven"])).translations[0].tokens == tokens

    return check


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, (e.code(), e.details())
        return e.code()
    return grpc.StatusCode.OK


def fuzz(kind: str, strategy: st.SearchStrategy, send: Callable[[object], object],
         still_right: Callable[[], None]) -> None:
    seen: dict[str, int] = {}

    @FUZZ
    @given(strategy)
    def run(message: object) -> None:
        code = status_of(lambda: send(message))
        seen[code.name] = seen.get(code.name, 0) + 1

    run()
    still_right()
    assert sum(seen.values()) >= EXAMPLES and len(seen) > 1, seen  # ran them all, and not all alike
    record_figures(f"fuzz.{kind}", examples=sum(seen.values()), **seen)


def test_fuzzed_model_infer(channel: grpc.Channel, still_right: Callable[[], None]) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    fuzz("ModelInfer", infer_requests(), lambda m: stub.ModelInfer(m, timeout=30), still_right)


def test_fuzzed_classify(channel: grpc.Channel, still_right: Callable[[], None]) -> None:
    stub = tpb_grpc.ClassifierStub(channel)
    fuzz("Classify", classify_requests(), lambda m: stub.Classify(m, timeout=30), still_right)


def test_fuzzed_translate(channel: grpc.Channel, still_right: Callable[[], None]) -> None:
    stub = tpb_grpc.TranslatorStub(channel)
    fuzz("Translate", translate_requests(), lambda m: stub.Translate(m, timeout=30), still_right)


def test_fuzzed_translate_stream(channel: grpc.Channel, still_right: Callable[[], None]) -> None:
    stub = tpb_grpc.TranslatorStub(channel)
    fuzz("TranslateStream", stream_requests(), lambda m: list(stub.TranslateStream(m, timeout=30)), still_right)


def every_method() -> list[tuple[str, bool, bool]]:
    """(path, client streams, server streams) of every method the server registers, health and reflection too."""
    from grpc_health.v1 import health_pb2 as hpb
    from grpc_reflection.v1alpha import reflection_pb2 as rpb
    from transerve_client._proto import inference_pb2, transerve_pb2

    methods = []
    for descriptor in (inference_pb2.DESCRIPTOR, transerve_pb2.DESCRIPTOR, hpb.DESCRIPTOR, rpb.DESCRIPTOR):
        for service in descriptor.services_by_name.values():
            for method in service.methods:
                methods.append((f"/{service.full_name}/{method.name}", method.client_streaming,
                                method.server_streaming))
    return methods


def test_random_bytes_to_every_method(channel: grpc.Channel, still_right: Callable[[], None]) -> None:
    rng, seen, sent = random.Random(14), {}, 0
    payloads = [b"", b"\xff", b"\x0a\xff\xff\xff\xff\x0f", *(rng.randbytes(rng.randint(1, 512)) for _ in range(40))]
    for path, client_streams, server_streams in every_method():
        for payload in payloads:
            if client_streams:
                call: Callable[[], object] = (
                    (lambda p=path, b=payload: list(channel.stream_stream(p)(iter([b, b]), timeout=5)))
                    if server_streams else (lambda p=path, b=payload: channel.stream_unary(p)(iter([b, b]), timeout=5)))
            elif server_streams:
                if path.endswith("Health/Watch"):  # a valid Watch never ends: read its first answer only
                    call = lambda p=path, b=payload: next(iter(channel.unary_stream(p)(b, timeout=5)))  # noqa: E731
                else:
                    call = lambda p=path, b=payload: list(channel.unary_stream(p)(b, timeout=5))  # noqa: E731
            else:
                call = lambda p=path, b=payload: channel.unary_unary(p)(b, timeout=5)  # noqa: E731
            code = status_of(call)
            seen[code.name] = seen.get(code.name, 0) + 1
            sent += 1
    still_right()
    assert seen.get("INVALID_ARGUMENT", 0) > 0, seen  # bytes that do not parse are the client's error
    record_figures("fuzz.raw_bytes", methods=len(every_method()), sent=sent, **seen)
