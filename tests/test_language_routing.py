"""Routing by language without a server: codes, the router's choices, detection, what a pivot reports, and the
languages hf-marian reads off a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transerve.languages import LanguageCodeError, normalize
from transerve.server.engine.glossary import GlossaryEntry
from transerve.server.engine.language_id import LanguageDetector
from transerve.server.engine.model_config import ModelConfig
from transerve.server.engine.pivot import compose_reports, glossary_legs
from transerve.server.engine.routing import LanguageRouter
from transerve.server.engine.scoring import SentenceReport, SentenceScore, WordAlignment
from transerve.server.exceptions import ModelNotFound, RequestError


@pytest.mark.parametrize(("code", "key"), [("de", "de"), ("DE", "de"), ("deu", "de"), ("ger", "de"), ("de-AT", "de"),
                                           ("de_DE", "de"), (" en ", "en"), ("iw", "he"), ("fil", "fil"),
                                           ("zh-Hant-TW", "zh")])
def test_codes_normalise_to_one_key(code: str, key: str) -> None:
    assert normalize(code) == key


@pytest.mark.parametrize("code", ["", "xx", "english", "und", "mul", "!!", "a" * 40])
def test_codes_that_name_no_language_are_refused(code: str) -> None:
    with pytest.raises(LanguageCodeError):
        normalize(code)


def translator(name: str, source: str, target: str | list[str], default: bool = False) -> tuple[str, ModelConfig]:
    return name, ModelConfig.model_validate({
        "name": name, "task": "translate", "default": default, "inputs": [], "outputs": [], "files": {},
        "tokenizer": "tokenizer.json", "languages": {"source": source, "target": target},
        "decoder": {"num_layers": 1, "num_heads": 1, "head_dim": 1, "vocab_size": 8, "bos_id": 0, "eos_id": 1,
                    "pad_id": 2}})


def router(*entries: tuple[str, ModelConfig], pivot: str = "en") -> LanguageRouter:
    return LanguageRouter(lambda: list(entries), pivot)


def test_config_normalises_languages_and_reads_with_the_source_language() -> None:
    _, config = translator("m", "deu", "en-GB")
    assert config.languages is not None
    assert (config.languages.source, config.languages.target) == ("de", ["en"])
    assert config.documents.language == "de"  # its sentence rules follow the language it reads
    with pytest.raises(ValueError, match="names no known language"):
        translator("m", "xx", "de")


def test_direct_pairs_and_pivots_through_the_pivot_language() -> None:
    r = router(translator("fr-en", "fr", "en"), translator("en-de", "en", "de"), translator("de-en", "de", "en"))
    pairs = {(x.source, x.target): (x.via, x.models) for x in r.routes()}
    assert pairs == {("fr", "en"): ("", ["fr-en"]), ("en", "de"): ("", ["en-de"]), ("de", "en"): ("", ["de-en"]),
                     ("fr", "de"): ("en", ["fr-en", "en-de"])}  # de→fr: no en→fr entry
    assert r.route("fr", "de").models == ["fr-en", "en-de"]
    assert r.sources() == ["de", "en", "fr"]
    with pytest.raises(ModelNotFound, match=r"no translation from de to fr.*fr→de \(via en\)"):
        r.route("de", "fr")


def test_a_direct_entry_beats_a_pivot_and_a_bilingual_one_a_multilingual_one() -> None:
    r = router(translator("en-mul", "en", ["de", "fr", "es"]), translator("en-de", "en", "de"),
               translator("fr-en", "fr", "en"), translator("fr-de", "fr", "de"))
    assert r.route("en", "de").models == ["en-de"]
    assert r.route("fr", "de").models == ["fr-de"]
    route = r.route("fr", "es")
    assert route.models == ["fr-en", "en-mul"] and route.legs[1].target_token == ">>es<<"
    assert r.route("en", "de").legs[0].target_token is None


def test_ties_go_to_the_default_then_the_first_name() -> None:
    assert router(translator("b", "en", "de"), translator("a", "en", "de")).route("en", "de").models == ["a"]
    assert router(translator("b", "en", "de", default=True),
                  translator("a", "en", "de")).route("en", "de").models == ["b"]


def test_pivot_language_is_configurable() -> None:
    r = router(translator("fr-de", "fr", "de"), translator("de-it", "de", "it"), pivot="de")
    assert r.route("fr", "it").via == "de"


@pytest.fixture(scope="module")
def detector() -> LanguageDetector:
    return LanguageDetector()


@pytest.mark.parametrize(("text", "language"), [
    ("Das ist ein kleiner Test, der zeigt, wie es geht.", "de"), ("This is a short test of the detector.", "en"),
    ("Bonjour tout le monde, comment allez-vous ?", "fr"), ("dreihundertsiebenundvierzig", "de"),
    ("three hundred and forty-seven", "en")])
def test_detection_finds_the_language_among_the_repositorys(detector: LanguageDetector, text: str,
                                                            language: str) -> None:
    found = detector.detect(text, ["de", "en", "fr"], "texts[0]")
    assert found.language == language
    assert 0.5 < found.confidence <= 1.0


@pytest.mark.parametrize("text", ["", "   ", "12 345", "😀🎉", "!!! ???"])
def test_text_without_letters_is_refused_naming_the_languages(detector: LanguageDetector, text: str) -> None:
    with pytest.raises(RequestError, match=r"texts\[3\].*no letters.*de, en"):
        detector.detect(text, ["de", "en"], "texts[3]")


def test_text_clearly_in_another_language_is_refused(detector: LanguageDetector) -> None:
    with pytest.raises(RequestError, match=r"reads as ja.*languages: de, en"):
        detector.detect("これは日本語の文です。東京は大きい都市です。", ["de", "en"], "texts[0]")


def report(source: tuple[int, int], target: tuple[int, int], mean: float, least: float,
           *alignments: tuple[tuple[int, int], tuple[int, int]]) -> SentenceReport:
    return SentenceReport(source, target, SentenceScore(mean, least, tuple(WordAlignment(s, t) for s, t in
                                                                              alignments)))


def test_pivot_reports_join_the_legs_on_pivot_words() -> None:
    # "Hallo Welt." → "Hello world." → "Bonjour monde."
    first = [report((0, 11), (0, 12), -0.5, 0.6, ((0, 5), (0, 5)), ((6, 10), (6, 11)), ((10, 11), (11, 12)))]
    second = [report((0, 12), (0, 14), -0.25, 0.4, ((0, 5), (0, 7)), ((6, 11), (8, 13)), ((11, 12), (13, 14)))]
    [joined] = compose_reports(first, second)
    assert joined.source == (0, 11) and joined.target == (0, 14)
    assert joined.score.mean_log_prob == pytest.approx(-0.75)  # the chain's probability: the legs' product
    assert joined.score.min_token_prob == pytest.approx(0.4)
    assert [(a.source, a.target) for a in joined.score.alignments] == [((0, 5), (0, 7)), ((6, 10), (8, 13)),
                                                                       ((10, 11), (13, 14))]


def test_pivot_sentence_reports_follow_their_own_pivot_sentences() -> None:
    first = [report((0, 5), (0, 6), -1.0, 0.5), report((6, 12), (7, 14), -2.0, 0.2)]
    second = [report((0, 6), (0, 4), -0.1, 0.9), report((7, 14), (5, 9), -0.3, 0.8)]
    joined = compose_reports(first, second)
    assert [(j.source, j.target) for j in joined] == [((0, 5), (0, 4)), ((6, 12), (5, 9))]
    assert [j.score.mean_log_prob for j in joined] == pytest.approx([-1.1, -2.3])


def test_glossary_targets_survive_both_legs() -> None:
    first, second = glossary_legs([GlossaryEntry("Rechnung", "facture")])
    assert first == [GlossaryEntry("Rechnung", "facture")]
    assert second == [GlossaryEntry("facture", "facture")]


def marian_dir(tmp_path: Path, name: str, vocab: list[str], tokenizer_config: dict[str, Any] | None = None) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "vocab.json").write_text(json.dumps({piece: i for i, piece in enumerate(vocab)}))
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def test_marian_languages_from_the_tokenizer_config_the_folder_name_or_the_target_tokens(tmp_path: Path) -> None:
    from transerve.models.importers.marian_languages import marian_languages

    plain = ["</s>", "<unk>", "▁the", "<pad>"]
    assert marian_languages(marian_dir(tmp_path, "ckpt", plain, {"source_lang": "eng", "target_lang": "deu"})) == {
        "source": "en", "target": "de"}
    assert marian_languages(marian_dir(tmp_path, "opus-mt-fr-es", plain)) == {"source": "fr", "target": "es"}
    multi = marian_dir(tmp_path, "opus-mt-en-ROMANCE", ["</s>", ">>fr<<", ">>es<<", ">>ita<<", ">>xx<<", "▁a"])
    assert marian_languages(multi) == {"source": "en", "target": ["fr", "es", "it"],
                                       "target_tokens": {"fr": ">>fr<<", "es": ">>es<<", "it": ">>ita<<"}}
    _, config = translator("m", "en", ["fr", "it"])
    assert config.languages is not None and config.languages.token_for("it") == ">>it<<"
    config.languages.target_tokens = {"it": ">>ita<<"}
    assert config.languages.token_for("it") == ">>ita<<"
    assert marian_languages(multi, target="pt") == {"source": "en", "target": "pt"}  # the option wins
    assert marian_languages(marian_dir(tmp_path, "mystery", plain)) is None
