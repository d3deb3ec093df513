"""Document translation through the server, on the zoo's trained translator (en → de numbers): a text is split
into sentences that decode together and come back with the text's own whitespace; the result equals
translating the sentences one by one, token for token, in both scheduler modes; long sentences are cut, never
refused; limits and budgets answer by name."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import ServerProcess, mode_copies, running_server, scrape, total
from transerve.server.engine.documents import split_document
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

DOCUMENT = ("three hundred and forty-two. nineteen eighty-four.\n\n  Seven hundred!  twelve\n"
            "- eight\n- ninety-nine.   ")
MODES = ["doc-continuous", "doc-static"]


pytestmark = pytest.mark.slow  # the zoo is trained once per session


@pytest.fixture(scope="module")
def doc_repo(zoo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo translator twice (64 positions, default budget 40): continuous and static scheduling, with small
    document limits."""
    return mode_copies(zoo_repo / "mt-en-de-numbers", tmp_path_factory.mktemp("doc-repo"),
                       {"doc-continuous": "continuous", "doc-static": "static"},
                       documents={"max_document_chars": 20_000, "max_document_sentences": 40})


@pytest.fixture(scope="module")
def stub(doc_repo: Path) -> Iterator[tpb_grpc.TranslatorStub]:
    with running_server(doc_repo) as server, grpc.insecure_channel(server.address) as channel:
        yield tpb_grpc.TranslatorStub(channel)


def translate(stub: tpb_grpc.TranslatorStub, model: str, texts: list[str], **options: int | bool
              ) -> list[tpb.Translation]:
    request = tpb.TranslateRequest(model=model, texts=texts, options=tpb.TranslateOptions(**options))
    return list(stub.Translate(request, timeout=60).translations)


@pytest.mark.parametrize("model", MODES)
def test_a_document_equals_its_sentences_one_by_one(stub: tpb_grpc.TranslatorStub, model: str) -> None:
    doc = split_document(DOCUMENT)
    assert len(doc.spans) == 6
    one_by_one = [translate(stub, model, [s], max_new_tokens=12, segmentation=tpb.SEGMENTATION_WHOLE)[0]
                  for s in doc.sentences]
    [whole] = translate(stub, model, [DOCUMENT], max_new_tokens=12)
    assert whole.text == doc.reassemble([t.text for t in one_by_one])  # whitespace as sent, sentence for sentence
    assert whole.tokens == sum(t.tokens for t in one_by_one)
    assert sum(bool(t.text.strip()) for t in one_by_one) >= 5  # the model really translates them
    # two documents in one request, and the beam: the same per sentence
    both = translate(stub, model, [DOCUMENT, "nineteen. twenty."], max_new_tokens=12, beam_size=3)
    beams = [translate(stub, model, [s], max_new_tokens=12, beam_size=3, segmentation=tpb.SEGMENTATION_WHOLE)[0]
             for s in doc.sentences]
    assert both[0].text == doc.reassemble([t.text for t in beams])


@pytest.mark.parametrize("model", MODES)
def test_a_stream_yields_sentences_in_order_and_joins_to_the_unary_text(stub: tpb_grpc.TranslatorStub,
                                                                         model: str) -> None:
    request = tpb.TranslateStreamRequest(model=model, text=DOCUMENT, options=tpb.TranslateOptions(max_new_tokens=12))
    replies = list(stub.TranslateStream(request, timeout=60))
    [unary] = translate(stub, model, [DOCUMENT], max_new_tokens=12)
    pieces = [r.piece for r in replies if not r.done]
    assert "".join(pieces) == unary.text and replies[-1].done and replies[-1].tokens == unary.tokens
    doc = split_document(DOCUMENT)
    one_by_one = [translate(stub, model, [s], max_new_tokens=12, segmentation=tpb.SEGMENTATION_WHOLE)[0].text
                  for s in doc.sentences]
    expected = [doc.gap_before(i) + t for i, t in enumerate(one_by_one)] + [doc.tail()]
    assert pieces == [p for p in expected if p]  # sentence by sentence, in order, each with the gap before it
    tokens = [r.tokens for r in replies]
    assert tokens == sorted(tokens)  # counts only grow


@pytest.mark.parametrize("model", MODES)
def test_a_sentence_longer_than_the_encoder_takes_is_cut_not_refused(stub: tpb_grpc.TranslatorStub,
                                                                     model: str) -> None:
    rng = np.random.default_rng(0)
    words = ["seven", "hundred", "and", "twelve", "forty", "three,", "nine"]
    long = " ".join(rng.choice(words, 400))  # several hundred tokens; the encoder takes 63
    with pytest.raises(grpc.RpcError) as refused:
        translate(stub, model, [long], segmentation=tpb.SEGMENTATION_WHOLE)
    assert "exceed max_input_tokens 63" in refused.value.details()
    [answer] = translate(stub, model, [long], max_new_tokens=8)
    assert answer.tokens > 8 and answer.text.strip()  # several pieces, each translated


@pytest.mark.parametrize(("text", "words"), [
    (". ".join(["seven"] * 41) + ".", "texts[0]: 41 sentences exceed max_document_sentences 40"),
    ("seven " * 4000, "texts[0]: 24000 characters exceed max_document_chars 20000"),
    ("  \n\n ", "texts[0]: empty text"),
])
def test_document_limits_are_refused_by_name(stub: tpb_grpc.TranslatorStub, text: str, words: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        translate(stub, "doc-continuous", [text])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in refused.value.details()
    assert translate(stub, "doc-continuous", ["seven. eight."])[0].text  # and the next request is answered


def test_a_budget_is_limited_by_the_decoders_positions_not_the_default(stub: tpb_grpc.TranslatorStub) -> None:
    """The zoo translator's default budget is 40 and its decoder has 64 positions: 50 is allowed, 64 is not."""
    assert translate(stub, "doc-continuous", ["seven"], max_new_tokens=50)[0].tokens <= 50
    with pytest.raises(grpc.RpcError) as refused:
        translate(stub, "doc-continuous", ["seven"], max_new_tokens=64)
    assert "exceeds the model's limit of 63 (max_new_tokens_limit)" in refused.value.details()


def test_kserve_takes_segmentation_as_a_parameter(doc_repo: Path, stub: tpb_grpc.TranslatorStub) -> None:
    with running_server(doc_repo) as server, grpc.insecure_channel(server.address) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)

        def infer(**parameters: str) -> str:
            request = pb.ModelInferRequest(model_name="doc-continuous")
            text = request.inputs.add(name="text", datatype="BYTES", shape=[1])
            text.contents.bytes_contents.append(DOCUMENT.encode())
            request.parameters["max_new_tokens"].int64_param = 12
            for name, value in parameters.items():
                request.parameters[name].string_param = value
            reply = kserve.ModelInfer(request, timeout=60)
            return reply.outputs[0].contents.bytes_contents[0].decode() if reply.outputs[0].contents.bytes_contents \
                else reply.raw_output_contents[0][4:].decode()

        [unary] = translate(stub, "doc-continuous", [DOCUMENT], max_new_tokens=12)
        assert infer() == infer(segmentation="sentences") == unary.text
        with pytest.raises(grpc.RpcError) as refused:
            infer(segmentation="paragraphs")
        assert 'parameters.segmentation: must be "sentences" or "whole"' in refused.value.details()


def test_repeated_sentences_come_from_the_cache_with_the_same_text(doc_repo: Path) -> None:
    """A document repeating its sentences: the first request decodes each distinct sentence once, a second one
    takes them all from the cache; hits equal misses, and cache=false decodes afresh."""
    document = " ".join(["seven hundred and twelve.", "forty-one!", "seven hundred and twelve.", "nine."] * 5)
    with running_server(doc_repo) as server, grpc.insecure_channel(server.address) as channel:
        stub = tpb_grpc.TranslatorStub(channel)
        first = translate(stub, "doc-continuous", [document], max_new_tokens=12)[0]
        after_first = cache_events(server)
        second = translate(stub, "doc-continuous", [document], max_new_tokens=12)[0]
        after_second = cache_events(server)
        fresh = translate(stub, "doc-continuous", [document], max_new_tokens=12, cache=False)[0]
        sentence_by_sentence = [translate(stub, "doc-continuous", [s], max_new_tokens=12, cache=False)[0].text
                                for s in ("seven hundred and twelve.", "forty-one!", "nine.")]
        assert first.text == second.text == fresh.text and first.tokens == second.tokens == fresh.tokens
        assert first.text == " ".join([sentence_by_sentence[i] for i in (0, 1, 0, 2)] * 5)
        assert after_first["miss"] == 3 and after_first["hit"] == 17  # 3 distinct sentences decoded, once each
        assert after_second["hit"] - after_first["hit"] == 20 and after_second["miss"] == after_first["miss"]
        assert cache_events(server) == after_second  # cache=false neither looks up nor counts
        assert scrape(server)['transerve_translation_cache_bytes{model="doc-continuous"}'] > 0


def cache_events(server: ServerProcess) -> dict[str, float]:
    samples = scrape(server)
    return {kind: total(samples, "transerve_translation_cache_total", model="doc-continuous", event=kind)
            for kind in ("hit", "miss", "eviction")}


CORRUPTIONS = ("a token replaced", "two tokens swapped", "a token dropped", "a token repeated", "another number")


def corrupted(ids: list[int], other: list[int], kind: str, rng: np.random.Generator, vocab: int) -> list[int]:
    out = list(ids)
    at = int(rng.integers(len(out)))
    if kind == "a token replaced":
        out[at] = int(rng.choice([t for t in range(4, vocab) if t != out[at]]))
    elif kind == "two tokens swapped" and len(out) > 1:
        at = min(at, len(out) - 2)
        out[at], out[at + 1] = out[at + 1], out[at]
    elif kind == "a token dropped" and len(out) > 1:
        del out[at]
    elif kind == "a token repeated":
        out.insert(at, out[at])
    elif kind == "another number":
        out = list(other)
    return out


def test_scores_rank_correct_translations_above_corrupted_ones(zoo_repo: Path) -> None:
    """The zoo translator's own probabilities, teacher-forced through the served scoring graph: the correct
    German of 60 numbers it was not trained on scores a higher mean log-probability than each of five
    corruptions of it (in ≥ 95 % of the 300 pairs; the figure is printed)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer
    from transerve.models.zoo.numbers_data import NumbersDataConfig, make_split
    from transerve.server.engine.model_config import load_model_config
    from transerve.server.engine.scoring import SentenceScorer
    from transerve.server.engine.seq2seq import DecoderLayout

    entry = zoo_repo / "mt-en-de-numbers"
    config = load_model_config(entry)
    d = config.decoder
    assert d is not None and config.scoring is not None
    sessions = [ort.InferenceSession(str(entry / "1" / f)) for f in ("encoder.onnx", config.scoring.file)]
    tokenizer = Tokenizer.from_file(str(entry / "tokenizer.json"))
    scorer = SentenceScorer(*sessions, DecoderLayout(d.num_layers, d.num_heads, d.head_dim, d.bos_id, d.eos_id,
                                                     d.pad_id), tokenizer, config.scoring.alignment_layer)
    _, test = make_split(NumbersDataConfig())
    pairs = test[:60]
    sources = [[*tokenizer.encode(en).ids, d.eos_id] for en, _ in pairs]
    correct = [tokenizer.encode(de).ids for _, de in pairs]
    rng = np.random.default_rng(25)
    ordered = total = 0
    for kind in CORRUPTIONS:
        bad = [corrupted(c, correct[(i + 7) % len(correct)], kind, rng, d.vocab_size) for i, c in enumerate(correct)]
        good_lp, _ = scorer.teacher_forced(sources, correct)
        bad_lp, _ = scorer.teacher_forced(sources, bad)
        for g, b, c, x in zip(good_lp, bad_lp, correct, bad, strict=True):
            if c != x:
                total += 1
                ordered += float(g.mean()) > float(b.mean())
    print(f"correct above corrupted: {ordered} of {total}")
    assert total >= 280 and ordered >= 0.95 * total


@pytest.mark.parametrize("model", MODES)
def test_glossary_terms_are_used_by_the_trained_translator(stub: tpb_grpc.TranslatorStub, model: str) -> None:
    """Terminology the model does not write by itself ("zwo" for "two", "einhundert" for "hundred"), in every
    sentence that calls for it, in both scheduler modes; sentences without a term translate as without."""
    from num2words import num2words

    glossary = [tpb.GlossaryEntry(source="two", target="zwo"), tpb.GlossaryEntry(source="hundred",
                                                                                 target="einhundert")]
    texts = [num2words(n) + "." for n in (2, 102, 200, 2200, 312, 42, 1002, 7)]
    out = [t.text for t in translate(stub, model, texts, glossary=glossary)]  # type: ignore[arg-type]
    plain = [t.text for t in translate(stub, model, texts)]
    for text, forced, before in zip(texts, out, plain, strict=True):
        for source, target in (("two", "zwo"), ("hundred", "einhundert")):
            assert (target in forced) == bool(re.search(rf"\b{source}\b", text)), (text, forced)
        if not re.search(r"\b(two|hundred)\b", text):
            assert forced == before
