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

import re
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import ServerProcess, image_bytes
from PIL import Image
from reliability import record_figures
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc
from transerve_client.codec import encode_bytes

CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.OUT_OF_RANGE}
RNG = np.random.default_rng(14)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR says ``width × height`` (8-bit gray) followed by a few KB of compressed zeros."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 200_000, 9))
            + chunk(b"IEND", b""))


GRAY = Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8))
GOOD_PNG = image_bytes(GRAY, "PNG")
GOOD_JPEG = image_bytes(GRAY.convert("RGB"), "JPEG")
CORPUS = Path(__file__).parent / "data" / "bad_inputs"  # files that must stay refused (README there says how)
BAD_IMAGES: dict[str, bytes] = {
    **{f"corpus: {path.name}": path.read_bytes() for path in sorted(CORPUS.iterdir()) if path.suffix != ".md"},
    "empty": b"",
    "header lies: 2000x3000 with little data": png_claiming(2000, 3000),
    "real 6000x6000 png, over the pixel limit": image_bytes(Image.new("L", (6000, 6000)), "PNG"),
}
ODD_GOOD_IMAGES: dict[str, bytes] = {
    "1x1": image_bytes(Image.new("L", (1, 1), 128), "PNG"),
    "cmyk jpeg": image_bytes(GRAY.convert("CMYK"), "JPEG"),
    "16-bit png": image_bytes(Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)), "PNG"),
    "palette png": image_bytes(GRAY.convert("P"), "PNG"),
    "animated gif": image_bytes(GRAY, "GIF", save_all=True, append_images=[GRAY.rotate(90)], loop=0),
    "la png": image_bytes(GRAY.convert("LA"), "PNG"),
    "wide 1000x3": image_bytes(Image.new("RGB", (1000, 3), (9, 9, 9)), "PNG"),
    "large 4000x4000": image_bytes(Image.new("RGB", (4000, 4000), (200, 30, 9)), "PNG"),
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


def translate_infer() -> pb.ModelInferRequest:
    return text_infer(encode_bytes(["seven"]))


def with_parameters(request: pb.ModelInferRequest, **parameters: object) -> pb.ModelInferRequest:
    """Set KServe request parameters, each in the oneof its Python type maps to."""
    for name, value in parameters.items():
        slot = request.parameters[name]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        else:
            slot.string_param = str(value)
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
    "4 channels": lambda: image_infer(np.zeros((1, 4, 8, 8), "<f4")),
    "1 channel": lambda: image_infer(np.zeros((1, 1, 8, 8), "<f4")),
    "channels last": lambda: image_infer(np.zeros((1, 8, 8, 3), "<f4")),
    "beam_size 'four'": lambda: with_parameters(translate_infer(), beam_size="four"),
    "max_new_tokens -1": lambda: with_parameters(translate_infer(), max_new_tokens=-1),
    "max_new_tokens over the model's": lambda: with_parameters(translate_infer(), max_new_tokens=10_000),
    "beam_size 0": lambda: with_parameters(translate_infer(), beam_size=0),
    "beam_size 10^9": lambda: with_parameters(translate_infer(), beam_size=10**9),
    "length_penalty a bool": lambda: with_parameters(translate_infer(), length_penalty=True),
    "length_penalty NaN": lambda: with_parameters(translate_infer(), length_penalty=float("nan")),
    "top_k 10^9 (no such parameter)": lambda: with_parameters(image_infer(ok), top_k=10**9),
    "unknown parameter": lambda: with_parameters(translate_infer(), beam_sise=4),
    "timeout negative": lambda: with_parameters(translate_infer(), timeout=-5),
    "timeout a string": lambda: with_parameters(image_infer(ok), timeout="1s"),
    "stream on unary ModelInfer": lambda: with_parameters(translate_infer(), stream=True),
    "glossary not JSON": lambda: with_parameters(translate_infer(), glossary="seven=sieben"),
    "glossary an object": lambda: with_parameters(translate_infer(), glossary='{"source": "a", "target": "b"}'),
    "glossary entry without target": lambda: with_parameters(translate_infer(), glossary='[{"source": "seven"}]'),
    "glossary entry a number": lambda: with_parameters(translate_infer(), glossary='[{"source": 7, "target": "x"}]'),
    "format markdown": lambda: with_parameters(translate_infer(), format="markdown"),
    "scores a string": lambda: with_parameters(translate_infer(), scores="yes"),
}
def html(**options: object) -> tpb.TranslateOptions:
    return tpb.TranslateOptions(format=tpb.FORMAT_HTML, **options)  # type: ignore[arg-type]


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
    "whitespace-only document": tpb.TranslateRequest(texts=[" \n\n\t \u00a0", "seven"]),
    # cut into more pieces than a document may hold (tiny-mt's encoder takes 47 tokens): refused by name
    "50 000-character sentence without punctuation": tpb.TranslateRequest(texts=["seven " * 8_334]),
    "too many sentences": tpb.TranslateRequest(texts=["Seven. " * 300]),
    "unknown segmentation": tpb.TranslateRequest(texts=["seven"], options=tpb.TranslateOptions(segmentation=9)),
    "unknown format": tpb.TranslateRequest(texts=["seven"], options=tpb.TranslateOptions(format=7)),
    "markup-only html": tpb.TranslateRequest(texts=["<p> </p><!-- x --><img src=a>"], options=html()),
    "html with scores": tpb.TranslateRequest(texts=["<p>seven</p>"], options=html(scores=True)),
    **{f"glossary: {name}": tpb.TranslateRequest(texts=["seven"], options=tpb.TranslateOptions(glossary=[
        tpb.GlossaryEntry(source=s, target=t) for s, t in entries])) for name, entries in {
        "empty source": [("", "sieben")], "empty target": [("seven", "")],
        "duplicated source": [("seven", "sieben"), ("SEVEN", "acht")],
        "term over 200 characters": [("seven", "sieben " * 40)],
        "target the vocabulary cannot write": [("seven", "七")],
        "257 entries": [(f"w{i}", "sieben") for i in range(257)],
        "newline in a term": [("seven\nhundred", "sieben")]}.items()},
    # routing by language (tiny-mt declares en → de)
    **{f"languages: {name}": tpb.TranslateRequest(texts=[text], source_language=source, target_language=target,
                                                  detection=detection) for name, (text, source, target, detection) in {
        "unknown source code": ("seven", "xx", "de", 0), "malformed target code": ("seven", "en", "d e!", 0),
        "source without target": ("seven", "en", "", 0), "auto on empty text": ("", "auto", "de", 0),
        "auto on emoji only": ("😀🎉🚀", "auto", "de", 0), "auto on digits only": ("12 345 678", "auto", "de", 0),
        "auto on a language no entry reads": ("これは日本語の文です。東京は大きい都市です。", "auto", "de", 0),
        "auto per sentence, no letters": ("12. 34. 56.", "auto", "de", 1),
        "pair neither direct nor pivotable": ("seven", "de", "fr", 0),
        "unknown detection": ("seven", "auto", "de", 7)}.items()},
}
# documents that look hostile but are fine: answered, each with its whitespace kept
ODD_GOOD_DOCUMENTS = {
    "12 000 characters, no punctuation": "seven " * 2_000,
    "one 4 000-character word": "x" * 4_000,
    "punctuation only": "... !!! ??? …",
    "markup as text": "<p>seven <b>eight</b></p>\n\n<!-- nine -->",
    "paragraph breaks only around one word": "\n\n\n  seven  \n\n\n",
}
# pages that look hostile but are fine in format html (best-effort, never refused): answered, tags kept
ODD_GOOD_PAGES = {
    "unclosed tags": "<p>seven <b>eight <i>nine",
    "10 000 nested elements": "<b>" * 10_000 + "seven" + "</b>" * 10_000,
    "script and style only around text": "<script>var a = '<p>x</p>';</script>seven<style>p{}</style>",
    "stray end tags": "</div></b>seven</p>",
    "entities and comments": "seven&nbsp;&amp;&#8217;<!-- c -->&copy;",
    "glossary terms overlapping, one never occurring": "seven hundred",
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


TALLY = {"tried": 0, "refused_correctly": 0}  # for RELIABILITY.md: tried − refused correctly = mishandled


@pytest.fixture(scope="module", autouse=True)
def tally() -> Iterator[None]:
    yield
    record_figures("bad_inputs", cases=TALLY["tried"], mishandled=TALLY["tried"] - TALLY["refused_correctly"],
                   corpus_files=len(list(CORPUS.glob("*"))) - 1)


def client_error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    TALLY["tried"] += 1
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() in CLIENT_ERRORS, (e.code(), e.details())
        TALLY["refused_correctly"] += 1
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
    assert any(word in message for word in ("input", "model", "version", "text", "limit", "parameters.")), message
    healthy()


@pytest.mark.parametrize("case", list(BAD_TRANSLATE))
def test_bad_translations_are_refused_by_field(channel: grpc.Channel, healthy: Callable[[], None],
                                               case: str) -> None:
    translator = tpb_grpc.TranslatorStub(channel)
    _, message = client_error(lambda: translator.Translate(BAD_TRANSLATE[case], timeout=30))
    assert any(w in message for w in ("texts", "beam_size", "max_new_tokens", "length_penalty", "model",
                                      "segmentation", "format", "glossary", "language", "detection")), message
    request = BAD_TRANSLATE[case]
    if request.texts:
        stream = tpb.TranslateStreamRequest(text=request.texts[0], model=request.model, options=request.options,
                                            source_language=request.source_language,
                                            target_language=request.target_language)
        if case not in ("too many texts", "languages: unknown detection", "languages: auto per sentence, no letters"):
            client_error(lambda: list(translator.TranslateStream(stream, timeout=30)))
    healthy()


@pytest.mark.parametrize("case", list(ODD_GOOD_DOCUMENTS))
def test_odd_but_valid_documents_are_answered(channel: grpc.Channel, healthy: Callable[[], None], case: str) -> None:
    text = ODD_GOOD_DOCUMENTS[case]
    reply = tpb_grpc.TranslatorStub(channel).Translate(tpb.TranslateRequest(texts=[text]), timeout=120)
    [translation] = reply.translations
    lead, trail = text[:len(text) - len(text.lstrip())], text[len(text.rstrip()):]
    assert translation.text.startswith(lead) and translation.text.endswith(trail)  # the document's own spacing
    healthy()


@pytest.mark.parametrize("case", list(ODD_GOOD_PAGES))
def test_odd_but_valid_pages_are_answered(channel: grpc.Channel, healthy: Callable[[], None], case: str) -> None:
    page = ODD_GOOD_PAGES[case]
    glossary = [tpb.GlossaryEntry(source="seven hundred", target="siebenhundert"),
                tpb.GlossaryEntry(source="hundred", target="hundert"), tpb.GlossaryEntry(source="xyz", target="x")]
    reply = tpb_grpc.TranslatorStub(channel).Translate(tpb.TranslateRequest(texts=[page], options=html(
        max_new_tokens=8, glossary=glossary)), timeout=120)
    assert re.findall(r"<[^>]*>", reply.translations[0].text) == re.findall(r"<[^>]*>", page)
    healthy()


def test_model_infer_parameters_decode_like_translate_options(channel: grpc.Channel) -> None:
    """The parameters the corpus refuses when malformed are applied when valid: the same tokens as Translate."""
    kserve, translator = pb_grpc.GRPCInferenceServiceStub(channel), tpb_grpc.TranslatorStub(channel)
    for options in ({"beam_size": 3, "max_new_tokens": 4, "length_penalty": 0.5}, {"max_new_tokens": 2},
                    {"timeout": 30_000_000}):
        response = kserve.ModelInfer(with_parameters(translate_infer(), **options))
        translated = response.raw_output_contents[0][4:].decode()
        task_options = tpb.TranslateOptions(**{k: v for k, v in options.items() if k != "timeout"})
        expected = translator.Translate(tpb.TranslateRequest(texts=["seven"], options=task_options))
        assert translated == expected.translations[0].text, options
    for budget, beam in ((1, 1), (3, 1), (5, 2)):  # the token count shows the budget took effect
        streamed = with_parameters(translate_infer(), stream=True, max_new_tokens=budget, beam_size=beam)
        final = list(kserve.ModelStreamInfer(iter([streamed])))[-1].infer_response
        expected = translator.Translate(tpb.TranslateRequest(
            texts=["seven"], options=tpb.TranslateOptions(max_new_tokens=budget, beam_size=beam)))
        assert final.parameters["tokens"].int64_param == expected.translations[0].tokens <= budget
