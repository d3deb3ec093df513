"""Routing by language through a running server: discovery, direct pairs, pivots, detection, the KServe and
REST faces, streams, and the errors a client gets. Every entry is a copy of one random translator, so what a
route returns can be checked against the same entries called by name, leg by leg."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import ServerProcess, entry_copies, running_server
from transerve_client import TranserveClient
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc
from transerve_client._requests import infer_outputs

PAIRS = {"en-de": ("en", "de"), "de-en": ("de", "en"), "en-fr": ("en", "fr")}
GERMAN = "Das ist ein sehr schöner Tag heute, und wir gehen in den Park."
ENGLISH = "This is a very nice day today, and we are going to the park."


@pytest.fixture(scope="module")
def server(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = entry_copies(small_repo / "tiny-mt", tmp_path_factory.mktemp("languages"), {
        name: {"languages": {"source": s, "target": t}} for name, (s, t) in PAIRS.items()})
    with running_server(repo) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[TranserveClient]:
    with TranserveClient(server.address) as c:
        yield c


def test_discovery_lists_direct_pairs_and_pivots(server: ServerProcess, client: TranserveClient) -> None:
    pairs = {(p.source, p.target): (p.via, p.models) for p in client.languages()}
    assert pairs == {("en", "de"): ("", ["en-de"]), ("de", "en"): ("", ["de-en"]), ("en", "fr"): ("", ["en-fr"]),
                     ("de", "fr"): ("en", ["de-en", "en-fr"])}
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/languages", timeout=30) as r:
        body = json.loads(r.read())
    assert body["pivot_language"] == "en" and body["detectable"] == ["de", "en"]
    assert {(p["source"], p["target"], p["via"]) for p in body["pairs"]} == {(s, t, v) for (s, t), (v, _)
                                                                              in pairs.items()}


def test_a_pair_routes_to_its_entry(client: TranserveClient) -> None:
    [routed] = client.translate_detailed([ENGLISH], source_language="eng", target_language="de-DE", scores=False)
    assert routed.text == client.translate([ENGLISH], model="en-de")[0]
    assert (routed.source_language, routed.via, routed.models, routed.language_confidence) == ("en", "", ["en-de"],
                                                                                               0.0)


def test_a_pivot_is_both_legs_in_turn(client: TranserveClient) -> None:
    [routed] = client.translate_detailed([GERMAN], source_language="de", target_language="fr", scores=False)
    by_hand = client.translate(client.translate([GERMAN], model="de-en"), model="en-fr")[0]
    assert routed.text == by_hand
    assert (routed.via, routed.models) == ("en", ["de-en", "en-fr"])


def test_auto_detects_each_texts_language(client: TranserveClient) -> None:
    out = client.translate_detailed([GERMAN, ENGLISH], target_language="fr", scores=False)
    assert [(t.source_language, t.models) for t in out] == [("de", ["de-en", "en-fr"]), ("en", ["en-fr"])]
    assert all(t.language_confidence > 0.5 for t in out)
    assert out[1].text == client.translate([ENGLISH], model="en-fr")[0]
    [same] = client.translate_detailed([ENGLISH], target_language="en", scores=False)  # already there
    assert (same.text, same.models) == (ENGLISH, [])


def test_per_sentence_detection_routes_each_run(client: TranserveClient) -> None:
    text = f"{GERMAN}\n\n{ENGLISH}"
    [out] = client.translate_detailed([text], target_language="fr", detection="sentence", scores=False)
    assert [(start, end, language) for start, end, language, _ in out.languages] == [
        (0, len(GERMAN), "de"), (len(GERMAN), len(text), "en")]
    pivot = client.translate([GERMAN], source_language="de", target_language="fr")[0]
    direct = client.translate([ENGLISH], model="en-fr")[0]
    assert out.text == f"{pivot}\n\n{direct}"


def test_a_named_model_wins_over_languages(client: TranserveClient) -> None:
    named = client.translate_detailed([ENGLISH], model="en-de", target_language="fr", scores=False)[0]
    assert named.text == client.translate([ENGLISH], model="en-de")[0] and named.models == []


def test_scores_and_glossary_through_a_pivot(client: TranserveClient) -> None:
    [scored] = client.translate_detailed([GERMAN], source_language="de", target_language="fr", alignments=True)
    assert scored.sentences and all(0 <= s.source[0] < s.source[1] <= len(GERMAN) for s in scored.sentences)
    assert all(s.target[1] <= len(scored.text) and s.mean_log_prob < 0 for s in scored.sentences)
    for sentence in scored.sentences:
        for source, target in sentence.alignments:
            assert 0 <= source[0] < source[1] <= len(GERMAN) and 0 <= target[0] < target[1] <= len(scored.text)
    # the glossary's target term goes into the pivot text, and the second leg must keep it (random weights glue
    # letters to it, so the leg-two match is checked by building the same chain by hand)
    text = "hundert und zwei"
    out = client.translate([text], source_language="de", target_language="fr", glossary={"hundert": "seven"})[0]
    pivot = client.translate([text], model="de-en", glossary={"hundert": "seven"})[0]
    assert "seven" in pivot
    assert out == client.translate([pivot], model="en-fr", glossary={"seven": "seven"})[0]


def test_stream_pieces_join_to_the_routed_translation(server: ServerProcess, client: TranserveClient) -> None:
    with grpc.insecure_channel(server.address) as channel:
        messages = list(tpb_grpc.TranslatorStub(channel).TranslateStream(tpb.TranslateStreamRequest(
            text=GERMAN, source_language="auto", target_language="fr")))
    assert (messages[0].source_language, messages[0].via, list(messages[0].models)) == ("de", "en",
                                                                                        ["de-en", "en-fr"])
    assert "".join(m.piece for m in messages) == client.translate([GERMAN], target_language="fr")[0]


def test_kserve_and_rest_route_the_model_translate(server: ServerProcess, client: TranserveClient) -> None:
    request = pb.ModelInferRequest(model_name="translate", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[GERMAN.encode()]))])
    request.parameters["target_language"].string_param = "fr"
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    outputs = infer_outputs(reply)
    expected = client.translate([GERMAN], target_language="fr")[0]
    assert outputs["translation"][0].decode() == expected
    route = json.loads(outputs["route"][0])
    assert (route["source_language"], route["via"], route["models"]) == ("de", "en", ["de-en", "en-fr"])
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [GERMAN]}],
                       "parameters": {"source_language": "de", "target_language": "fr"}}).encode()
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{server.http_port}/v2/models/translate/infer", body,
            {"Content-Type": "application/json"}), timeout=60) as r:
        rest = json.loads(r.read())
    assert {o["name"]: o["data"] for o in rest["outputs"]}["translation"] == [expected]


@pytest.mark.parametrize(("source", "target", "code", "message"), [
    ("xx", "de", grpc.StatusCode.INVALID_ARGUMENT, "source_language: 'xx' is well-formed but names no known"),
    ("de", "klingon!", grpc.StatusCode.INVALID_ARGUMENT, "target_language: 'klingon!' is not a language code"),
    ("fr", "de", grpc.StatusCode.NOT_FOUND, "no translation from fr to de.*de→fr \\(via en\\)"),
    ("auto", "de", grpc.StatusCode.INVALID_ARGUMENT, "texts\\[0\\].*no letters.*one of de, en"),
    ("de", "", grpc.StatusCode.INVALID_ARGUMENT, "target_language: required"),
])
def test_bad_languages_are_refused_by_name(server: ServerProcess, source: str, target: str,
                                           code: grpc.StatusCode, message: str) -> None:
    text = "12 345" if source == "auto" else GERMAN
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as e:
        tpb_grpc.TranslatorStub(channel).Translate(tpb.TranslateRequest(texts=[text], source_language=source,
                                                                        target_language=target))
    assert e.value.code() == code
    assert re.search(message, e.value.details() or ""), e.value.details()


def test_the_sdk_refuses_a_source_without_a_target(client: TranserveClient) -> None:
    with pytest.raises(ValueError, match="source_language needs target_language"):
        client.translate([GERMAN], source_language="de")


def test_bad_kserve_detection_parameter(server: ServerProcess) -> None:
    request = pb.ModelInferRequest(model_name="translate", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"x"]))])
    request.parameters["target_language"].string_param = "fr"
    request.parameters["detection"].string_param = "paragraph"
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters.detection" in (e.value.details() or "")
