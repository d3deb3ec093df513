"""Continuous batching through a real server on loopback: exact offline outputs, streaming, cancellation.

The translator has random weights and a long budget (it never emits EOS in 200 tokens), so sequences of very
different lengths share the batch and a stream cancelled after its first piece is really cancelled mid-way.
Reference: PyTorch eager ``translate_ids`` on each source alone (greedy and beam), tokens identical.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from helpers import ServerProcess, metrics_text, offline_text, running_server, wait_for
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc
from transerve_client.codec import encode_bytes

MODEL = "long-mt"
TEXTS = ["seven", "three hundred and forty-two", "one thousand and one", "ninety-nine",
         "two million four hundred thousand and twelve", "the first", "eighteen hundred and six", "zero"]


@pytest.fixture(scope="module")
def long_server(long_repo: Path) -> Iterator[ServerProcess]:
    with running_server(long_repo) as proc:
        yield proc


@pytest.fixture(scope="module")
def channel(long_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(long_server.address) as ch:
        yield ch


def offline(repo: Path, text: str, budget: int, beam: int, penalty: float = 1.0) -> str:
    return offline_text(repo, MODEL, text, budget, beam, penalty)


def metric(server: ServerProcess, name: str, labels: str = f'model="{MODEL}"') -> float:
    text = metrics_text(server)
    match = re.search(rf"^{name}{{{re.escape(labels)}}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_concurrent_mixed_requests_equal_offline(channel: grpc.Channel, long_repo: Path) -> None:
    stub = tpb_grpc.TranslatorStub(channel)
    plan = [(TEXTS[i % len(TEXTS)], 5 + 13 * (i % 7), 1 + (i % 4 == 3) + (i % 8 == 7), 0.5 if i % 6 == 5 else 1.0)
            for i in range(24)]  # budgets 5..83, greedy and beams of 2 and 3, two length penalties

    def call(item: tuple[str, int, int, float]) -> str:
        text, budget, beam, penalty = item
        options = tpb.TranslateOptions(max_new_tokens=budget, beam_size=beam, length_penalty=penalty)
        return stub.Translate(tpb.TranslateRequest(texts=[text], options=options), timeout=120).translations[0].text

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(call, plan))
    assert got == [offline(long_repo, *item) for item in plan]
    several = stub.Translate(tpb.TranslateRequest(texts=TEXTS, options=tpb.TranslateOptions(max_new_tokens=30)))
    assert [t.text for t in several.translations] == [offline(long_repo, t, 30, 1) for t in TEXTS]


def test_model_stream_infer_streams_translation_pieces(channel: grpc.Channel, long_repo: Path) -> None:
    request = pb.ModelInferRequest(model_name=MODEL, id="s-1")
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes([TEXTS[4]]))
    request.parameters["stream"].bool_param = True
    responses = [r.infer_response for r in pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request]))]
    assert [r.parameters["triton_final_response"].bool_param for r in responses] == [False] * (len(responses) - 1) \
        + [True]
    pieces = [r.raw_output_contents[0][4:].decode() for r in responses[:-1]]  # BYTES: 4-byte length, then text
    assert len(pieces) > 5  # (that they join to the translation: tests/test_stream_join.py)
    assert responses[-1].parameters["tokens"].int64_param == 200 and responses[-1].id == "s-1"


def test_hundred_cancelled_streams_leave_the_cache_empty(channel: grpc.Channel, long_server: ServerProcess,
                                                          long_repo: Path) -> None:
    stub = tpb_grpc.TranslatorStub(channel)

    def count(code: str) -> float:
        return metric(long_server, "transerve_requests_total", f'code="{code}",model="{MODEL}",rpc="TranslateStream"')

    before = {code: count(code) for code in ("CANCELLED", "OK")}
    calls = [stub.TranslateStream(tpb.TranslateStreamRequest(text=TEXTS[i % len(TEXTS)])) for i in range(100)]
    assert next(calls[0]).tokens >= 1 and metric(long_server, "transerve_cached_tokens") > 0  # decoding
    for call in calls:
        assert next(call).tokens >= 1  # a first piece came back (the budget is 200 tokens) …
        call.cancel()  # … and the client goes away mid-decode
    # What the clients saw decides what the server must have counted: a stream whose last message was already
    # sent when the client cancelled (the tiny model can decode 200 tokens that fast) ends OK on both sides.
    seen = {code: sum(c.code().name == code for c in calls) for code in ("CANCELLED", "OK")}
    assert seen["CANCELLED"] + seen["OK"] == 100 and seen["CANCELLED"] >= 50, seen

    def settled() -> bool:
        return (metric(long_server, "transerve_cached_tokens") == 0
                and metric(long_server, "transerve_active_sequences") == 0
                and all(count(code) - before[code] == seen[code] for code in seen))

    # the server's own gauges settle: a handler counts its cancellation when it ends, which may be after the
    # scheduler has freed the rows
    wait_for(settled, 30, "cache freed and every stream counted")
    assert metric(long_server, "transerve_cached_tokens") == 0
    assert metric(long_server, "transerve_active_sequences") == 0
    assert metric(long_server, "transerve_cache_slots") == 0
    assert {code: count(code) - before[code] for code in seen} == seen  # every stream counted once, as it ended
    text = tpb_grpc.TranslatorStub(channel).Translate(tpb.TranslateRequest(
        texts=[TEXTS[2]], options=tpb.TranslateOptions(max_new_tokens=20))).translations[0].text
    assert text == offline(long_repo, TEXTS[2], 20, 1)  # the loop survived


def test_scheduler_metrics_are_exported(channel: grpc.Channel, long_server: ServerProcess) -> None:
    tpb_grpc.TranslatorStub(channel).Translate(tpb.TranslateRequest(texts=TEXTS[:2]))
    assert metric(long_server, "transerve_time_to_first_token_seconds_count") >= 2
    assert metric(long_server, "transerve_request_tokens_sum") >= 400
    text = metrics_text(long_server)
    for name in ("transerve_tokens_per_second", "transerve_queue_length", "transerve_active_sequences"):
        assert f'{name}{{model="{MODEL}"}}' in text


def test_bad_decoding_options_name_the_field(channel: grpc.Channel) -> None:
    stub = tpb_grpc.TranslatorStub(channel)
    for options, words in ((tpb.TranslateOptions(length_penalty=11.0), "length_penalty: 11.0 is outside 0 to 10"),
                           (tpb.TranslateOptions(beam_size=9), "beam_size: 9 exceeds the limit of 8"),
                           (tpb.TranslateOptions(max_new_tokens=256), "max_new_tokens: 256 exceeds")):
        with pytest.raises(grpc.RpcError) as info:
            stub.Translate(tpb.TranslateRequest(texts=["seven"], options=options))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()


def test_torch_backend_runs_the_same_scheduler(long_repo: Path) -> None:
    """``--backend torch`` (the reference): the scheduler over the PyTorch graphs, outputs equal to offline."""
    with running_server(long_repo, "--backend", "torch") as server, grpc.insecure_channel(server.address) as ch:
        stub = tpb_grpc.TranslatorStub(ch)
        for beam in (1, 2):
            reply = stub.Translate(tpb.TranslateRequest(
                texts=TEXTS[:3], options=tpb.TranslateOptions(max_new_tokens=12, beam_size=beam)))
            assert [t.text for t in reply.translations] == [offline(long_repo, t, 12, beam) for t in TEXTS[:3]]
