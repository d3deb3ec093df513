"""Acceptance: the served zoo answers plain gRPC calls (generated stubs, no SDK) like the offline models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import ServerProcess, png_bytes, running_server
from transerve.models.zoo.digits import DigitsRecipe, split_digits
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc
from transerve_client.codec import decode_bytes, encode_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo_server(zoo_repo: Path) -> Iterator[ServerProcess]:
    """fp32: these tests hold the served answers to PyTorch's, token for token (the reduced-precision variants
    that `precision: auto` may choose are held to their accuracy gate instead: test_precision_server.py)."""
    with running_server(zoo_repo, "--precision", "fp32") as proc:
        yield proc


def test_translates_num2words_english(zoo_server: ServerProcess) -> None:
    with grpc.insecure_channel(zoo_server.address) as channel:
        response = tpb_grpc.TranslatorStub(channel).Translate(
            tpb.TranslateRequest(texts=["three hundred and forty-two", "nineteen eighty-four"]))
        assert [t.text for t in response.translations] == ["dreihundertzweiundvierzig",
                                                           "neunzehnhundertvierundachtzig"]
        request = pb.ModelInferRequest(model_name="mt-en-de-numbers")
        request.inputs.add(name="text", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(encode_bytes(["three hundred and forty-two"]))
        out = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        assert decode_bytes(out.raw_output_contents[0], 1, "translation")[0] == b"dreihundertzweiundvierzig"


def test_concurrent_translations_equal_the_offline_model(zoo_server: ServerProcess, zoo_dir: Path) -> None:
    """Continuous batching on the trained translator: 16 clients, greedy and beam 4, PyTorch eager as reference."""
    from concurrent.futures import ThreadPoolExecutor

    from num2words import num2words
    from transerve.models.translator import TextTranslator

    texts = [num2words(n) for n in range(7, 5000, 97)] + [num2words(n, to="ordinal") for n in range(1, 60, 7)]
    offline = TextTranslator.load(zoo_dir / "mt-en-de-numbers")
    with grpc.insecure_channel(zoo_server.address) as channel:
        stub = tpb_grpc.TranslatorStub(channel)
        for beam in (1, 4):
            def one(text: str, beam: int = beam) -> str:
                options = tpb.TranslateOptions(beam_size=beam)
                return stub.Translate(tpb.TranslateRequest(texts=[text], options=options)).translations[0].text

            with ThreadPoolExecutor(16) as pool:
                served = list(pool.map(one, texts))
            assert served == offline.translate(texts, beam_size=beam)


def test_stream_pieces_arrive_token_by_token(zoo_server: ServerProcess) -> None:
    with grpc.insecure_channel(zoo_server.address) as channel:
        messages = list(tpb_grpc.TranslatorStub(channel).TranslateStream(
            tpb.TranslateStreamRequest(text="three hundred and forty-two")))
    pieces = [m.piece for m in messages if m.piece]
    assert "".join(pieces) == "dreihundertzweiundvierzig" and len(pieces) > 3  # drei|hundert|zwei|und|vier|zig


def test_digits_sent_as_png_score_the_zoo_accuracy(zoo_server: ServerProcess, zoo_dir: Path) -> None:
    _, _, images, labels = split_digits(DigitsRecipe())
    encoded = [png_bytes(image) for image in images]  # the original 8×8 grayscale digits, as a user sends them
    predictions: list[int] = []
    with grpc.insecure_channel(zoo_server.address) as channel:
        stub = tpb_grpc.ClassifierStub(channel)
        for start in range(0, len(encoded), 64):
            batch = [tpb.Image(encoded=e) for e in encoded[start:start + 64]]
            response = stub.Classify(tpb.ClassifyRequest(model="vit-digits", images=batch, top_k=1))
            predictions += [int(r.predictions[0].label) for r in response.results]
    correct = int(np.sum(np.array(predictions) == labels))
    zoo = json.loads((zoo_dir / "zoo_report.json").read_text())["models"]["vit-digits"]["test_accuracy"]
    assert correct == round(zoo * len(labels))  # the same images right as in the zoo's own test
