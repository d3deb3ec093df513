"""Glossaries: which source terms match (case, plurals, word boundaries, overlaps), what is refused and how it
is named, a model's glossary file, and terms forced into the translations of a served (random) model in both
scheduler modes. The term-usage rate on the trained zoo translator is in test_document_translation.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import entry_model, mode_copies, running_server
from transerve.server.engine.glossary import MAX_ENTRIES, Glossaries, GlossaryEntry, read_glossary_file
from transerve.server.exceptions import ConfigError, RequestError
from transerve_client._proto import inference_pb2 as ipb
from transerve_client._proto import inference_pb2_grpc as ipb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

MODES = ["gl-continuous", "gl-static"]


@pytest.fixture(scope="module")
def glossaries(small_repo: Path) -> Glossaries:
    _, tokenizer = entry_model(small_repo, "tiny-mt")
    return Glossaries([GlossaryEntry("hundred", "hundert")], tokenizer, english=True)


def terms(glossaries: Glossaries, entries: list[tuple[str, str]], sentence: str) -> list[str]:
    glossary = glossaries.for_request([GlossaryEntry(s, t) for s, t in entries])
    return [glossaries.tokenizer.decode(list(t)) for t in glossary.constraints(sentence, "texts[0]").terms]


def test_source_terms_match_case_plurals_and_whole_words(glossaries: Glossaries) -> None:
    entries = [("seven", "sieben"), ("twenty one", "einundzwanzig")]
    assert terms(glossaries, entries, "Seven hundred and TWENTY   ONE.") == ["sieben", "hundert", "einundzwanzig"]
    assert terms(glossaries, entries, "sevens and hundreds") == ["sieben", "hundert"]
    assert terms(glossaries, entries, "seventeen, a hundredth") == []  # not inside another word
    assert terms(glossaries, [], "two hundred") == ["hundert"]  # the model's own entry


def test_longer_terms_win_and_the_request_overrides_the_model(glossaries: Glossaries) -> None:
    entries = [("hundred", "hundert"), ("one hundred", "einhundert")]
    assert terms(glossaries, entries, "one hundred and one") == ["einhundert"]
    assert terms(glossaries, [("hundred", "sieben")], "two hundred") == ["sieben"]


@pytest.mark.parametrize(("entries", "message"), [
    ([("", "x")], "glossary[0].source: empty term"),
    ([("seven", "  ")], "glossary[0].target: empty term"),
    ([("seven", "sieben"), ("Seven", "acht")], "glossary[1].source: 'Seven' is already glossary[0]"),
    ([("seven", "x" * 201)], "glossary[0].target: 201 characters exceed the limit of 200"),
    ([("seven", "sieben\tacht")], "glossary[0].target: control character"),
    ([("seven", "ΩΨ")], "glossary[0].target: 'ΩΨ' cannot be written with the model's vocabulary"),
    ([(f"w{i}", "sieben") for i in range(MAX_ENTRIES + 1)], f"{MAX_ENTRIES + 1} entries exceed the limit"),
])
def test_bad_entries_are_refused_by_name(glossaries: Glossaries, entries: list[tuple[str, str]],
                                         message: str) -> None:
    with pytest.raises(RequestError, match=re.escape(message)):
        glossaries.for_request([GlossaryEntry(s, t) for s, t in entries])


def test_too_many_terms_in_one_sentence(glossaries: Glossaries) -> None:
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    glossary = glossaries.for_request([GlossaryEntry(w, "sieben" if i % 2 else "acht") for i, w in enumerate(words)])
    glossary.constraints("one two three", "texts[0]")  # two distinct targets: fine
    many = glossaries.for_request([GlossaryEntry(w, t) for w, t in zip(words, [
        "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"], strict=True)])
    message = "texts[0]: one sentence matches 9 glossary terms, the limit is 8"
    with pytest.raises(RequestError, match=re.escape(message)):
        many.constraints(" ".join(words), "texts[0]")


def test_glossary_files_are_read_and_checked(tmp_path: Path, glossaries: Glossaries) -> None:
    path = tmp_path / "glossary.tsv"
    path.write_text("# terms\nseven\tsieben\n\nhundred\thundert\n")
    assert read_glossary_file(path) == [GlossaryEntry("seven", "sieben"), GlossaryEntry("hundred", "hundert")]
    path.write_text("seven sieben\n")
    with pytest.raises(ConfigError, match=re.escape("glossary.tsv:1: expected 'source<TAB>target', got 1 fields")):
        read_glossary_file(path)
    with pytest.raises(ConfigError, match=re.escape("glossary file[0].target: 'ΩΨ' cannot be written")):
        Glossaries([GlossaryEntry("seven", "ΩΨ")], glossaries.tokenizer, english=True)


@pytest.fixture(scope="module")
def gl_repo(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-mt (random weights) in both scheduler modes, with a glossary file; cache off so every request
    decodes."""
    repo = mode_copies(small_repo / "tiny-mt", tmp_path_factory.mktemp("gl-repo"), dict(zip(MODES, (
        "continuous", "static"), strict=True)), glossary="terms.tsv", translation_cache_mb=0)
    for name in MODES:
        (repo / name / "terms.tsv").write_text("hundred\thundert\n")
    return repo


@pytest.fixture(scope="module")
def channel(gl_repo: Path) -> Iterator[grpc.Channel]:
    with running_server(gl_repo) as server, grpc.insecure_channel(server.address) as channel:
        yield channel


def translate(channel: grpc.Channel, model: str, texts: list[str], **options: object) -> list[str]:
    stub = tpb_grpc.TranslatorStub(channel)
    request = tpb.TranslateRequest(model=model, texts=texts, options=tpb.TranslateOptions(**options))  # type: ignore[arg-type]
    return [t.text for t in stub.Translate(request, timeout=60).translations]


TEXTS = ["seven hundred and two. nine.", "two hundred", "forty-one. Seven thousand!"]
GLOSSARY = [tpb.GlossaryEntry(source="seven", target="sieben"), tpb.GlossaryEntry(source="two", target="zwei")]


@pytest.mark.parametrize("model", MODES)
def test_a_random_model_writes_every_term(channel: grpc.Channel, model: str) -> None:
    """Terms a random model would never write appear in every sentence that calls for them (the model's file
    included), greedy and beam, and sentences without terms decode as without a glossary."""
    for beam in (1, 2):
        plain = translate(channel, model, TEXTS, beam_size=beam, max_new_tokens=16)
        forced = translate(channel, model, TEXTS, beam_size=beam, max_new_tokens=16, glossary=GLOSSARY)
        assert all(t in forced[0] for t in ("sieben", "zwei", "hundert")), forced
        assert all(t in forced[1] for t in ("zwei", "hundert")) and "sieben" in forced[2], forced
        assert forced != plain
        no_term = ["forty-one. nine"]
        assert translate(channel, model, no_term, beam_size=beam, max_new_tokens=16, glossary=GLOSSARY) == \
            translate(channel, model, no_term, beam_size=beam, max_new_tokens=16)


def test_both_scheduler_modes_give_the_same_constrained_translation(channel: grpc.Channel) -> None:
    continuous, static = (translate(channel, m, TEXTS, beam_size=2, max_new_tokens=16, glossary=GLOSSARY)
                          for m in MODES)
    assert continuous == static


def test_streams_use_the_glossary(channel: grpc.Channel) -> None:
    stub = tpb_grpc.TranslatorStub(channel)
    for model in MODES:
        request = tpb.TranslateStreamRequest(model=model, text=TEXTS[0], options=tpb.TranslateOptions(
            max_new_tokens=16, glossary=GLOSSARY))
        streamed = "".join(r.piece for r in stub.TranslateStream(request, timeout=60))
        assert streamed == translate(channel, model, [TEXTS[0]], max_new_tokens=16, glossary=GLOSSARY)[0]


def test_kserve_takes_the_glossary_as_json(channel: grpc.Channel) -> None:
    stub = ipb_grpc.GRPCInferenceServiceStub(channel)
    request = ipb.ModelInferRequest(model_name="gl-continuous", inputs=[ipb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1], contents=ipb.InferTensorContents(bytes_contents=[b"seven"]))])
    request.parameters["glossary"].string_param = json.dumps([{"source": "seven", "target": "sieben"}])
    request.parameters["max_new_tokens"].int64_param = 16
    response = stub.ModelInfer(request, timeout=60)
    assert "sieben" in response.outputs[0].name + response.raw_output_contents[0].decode(errors="replace")
    request.parameters["glossary"].string_param = '[{"source": "seven"}]'
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters.glossary[0]: must be" in str(error.value.details())


def test_bad_glossaries_are_invalid_argument_and_the_server_goes_on(channel: grpc.Channel) -> None:
    for entries, message in (([tpb.GlossaryEntry(source="", target="x")], "glossary[0].source: empty term"),
                             ([tpb.GlossaryEntry(source="a", target="ΩΨ")], "cannot be written")):
        with pytest.raises(grpc.RpcError) as error:
            translate(channel, "gl-continuous", ["seven"], glossary=entries)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in str(error.value.details())
    assert translate(channel, "gl-continuous", ["seven"], glossary=GLOSSARY, max_new_tokens=16)[0].find("sieben") >= 0
