"""Hugging Face generation fidelity: an imported opus-mt-like checkpoint decodes as ``MarianMTModel.generate()`` does.

The checkpoint keeps MarianConfig's library defaults (``forced_eos_token_id`` = EOS) and opus-mt's
``generation_config.json`` (beam 4, ``max_length`` 512, the pad token banned, renormalised scores): nothing is
switched off. ``generate()`` with the checkpoint's own settings is the reference; transerve's export carries the
settings into ``config.yaml`` and both scheduler modes decode with them — greedy and beam search, budgets that end
by length (the forced EOS) and by EOS — token for token.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import yaml
from helpers import ServerProcess, running_server
from test_importers_marian import import_or_skip

SOURCES = ["three hundred and forty-two", "nineteen eighty-four", "seven", "one thousand and one",
           "fifty-five thousand", "eight hundred"]
# On EOS's logit (weights at init_std 0.1): greedy decodes then end by EOS at 0 or 315 tokens or run to the
# 511-token budget, beams end by EOS at 76–315 tokens (the premises are asserted below)
EOS_BIAS = 0.95
# On the pad token's: unbanned it would win, and the probability mass the ban removes is large enough that
# renormalize_logits changes a beam's result — so the checkpoint's bad words and renormalisation both matter
PAD_BIAS = 4.0
SHORT_BUDGET = 6  # ends by length: the 6th token is the forced EOS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = import_or_skip("transformers")
    import_or_skip("sentencepiece")
    from transerve.models.importers.random_marian import write_random_marian

    directory = write_random_marian(tmp_path_factory.mktemp("opus-like"), d_model=32, encoder_layers=2,
                                    decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                    encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=512, init_std=0.1)
    model = transformers.MarianMTModel.from_pretrained(directory)
    with torch.no_grad():
        model.final_logits_bias[0, model.config.eos_token_id] += EOS_BIAS
        model.final_logits_bias[0, model.config.pad_token_id] += PAD_BIAS
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def entry(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint through ``transerve export hf-marian`` with no decoding options: all from the checkpoint."""
    from transerve.cli import app
    from typer.testing import CliRunner

    repo = tmp_path_factory.mktemp("repo")
    result = CliRunner().invoke(app, ["export", "hf-marian", str(checkpoint), "--repo", str(repo), "--name", "opus"],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    return repo / "opus"


def hf_generate(checkpoint: Path, texts: list[str], **overrides: Any) -> list[list[int]]:
    """``generate()`` with the checkpoint's own settings (and ``overrides``): generated ids, EOS and pads cut."""
    transformers = import_or_skip("transformers")
    model = transformers.MarianMTModel.from_pretrained(checkpoint).eval()
    tok = transformers.MarianTokenizer.from_pretrained(checkpoint)
    with torch.no_grad():
        out = model.generate(**tok(texts, return_tensors="pt", padding=True), **overrides)
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    rows = [[t for t in row[1:] if t != pad] for row in out.tolist()]
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def sources(checkpoint: Path, texts: list[str]) -> list[list[int]]:
    transformers = import_or_skip("transformers")
    tok = transformers.MarianTokenizer.from_pretrained(checkpoint)
    return [tok(t)["input_ids"] for t in texts]


def test_the_checkpoints_settings_reach_config_yaml(entry: Path) -> None:
    from transerve.server.engine.model_config import load_model_config

    config = load_model_config(entry)
    pad = config.decoder.pad_id if config.decoder else -1
    assert (config.beam_size, config.max_new_tokens) == (4, 511)  # num_beams; max_length 512 − decoder start
    g = config.generation
    assert (g.bad_words_ids, g.forced_eos, g.renormalize_logits, g.early_stopping, g.length_penalty) == (
        [[pad]], True, True, False, 1.0)
    assert config.decoder is not None and config.decoder.bos_id == pad  # decoder_start_token_id


def test_the_library_defaults_apply_without_a_generation_config(checkpoint: Path, tmp_path: Path) -> None:
    """No generation_config.json and no generation fields in config.json: what ``from_pretrained`` then gives
    ``generate()`` (greedy, the library's max_length, MarianConfig's forced EOS, nothing banned)."""
    transformers = import_or_skip("transformers")
    from transerve.models.importers.marian import marian_config, marian_decoding

    shutil.copytree(checkpoint, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "generation_config.json").unlink()
    decoding = marian_decoding(tmp_path / "ckpt", marian_config(tmp_path / "ckpt"))
    g = transformers.MarianMTModel.from_pretrained(tmp_path / "ckpt").generation_config
    assert decoding.beam_size == (g.num_beams or 1) == 1
    assert decoding.max_new_tokens == (g.max_length or 20) == 20  # generate() adds the decoder start to it
    assert decoding.rules.forced_eos and g.forced_eos_token_id == 0
    assert decoding.rules.bad_words == () and not g.bad_words_ids
    assert decoding.rules.early_stopping == bool(g.early_stopping) and not decoding.rules.renormalize


@pytest.mark.parametrize("setting", [{"no_repeat_ngram_size": 3}, {"do_sample": True}, {"forced_eos_token_id": 5}])
def test_a_setting_transerve_does_not_apply_is_refused(checkpoint: Path, tmp_path: Path,
                                                       setting: dict[str, Any]) -> None:
    from transerve.models.checkpoint import CheckpointError
    from transerve.models.importers.marian import marian_config, marian_decoding

    shutil.copy(checkpoint / "config.json", tmp_path / "config.json")
    settings = {**json.loads((checkpoint / "generation_config.json").read_text()), **setting}
    (tmp_path / "generation_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match=next(iter(setting))):
        marian_decoding(tmp_path, marian_config(tmp_path))


@pytest.mark.parametrize("forced", [False, True])
def test_rules_score_as_the_librarys_logits_processors(forced: bool) -> None:
    """Bad words (one token, two tokens, EOS alone — dropped, as there), forced EOS and renormalisation against
    transformers' own processors on random log-probabilities, in the order generate() chains them."""
    import_or_skip("transformers")
    from transerve.generation import GenerationRules
    from transerve.search import log_softmax
    from transformers.generation import logits_process as lp

    eos, vocab, bad = 0, 12, [[5], [3, 7], [0]]
    histories = [[11, 3], [11, 4], [3, 3]]  # decoder start first; rows 0 and 2 end in the two-token word's prefix
    scores = log_softmax(np.random.default_rng(0).normal(size=(3, vocab)).astype(np.float32))
    max_length = 3 if forced else 10  # generate() forces EOS when the sequence is max_length − 1 long
    reference = lp.LogitsProcessorList([lp.NoBadWordsLogitsProcessor(bad, eos),
                                        lp.ForcedEOSTokenLogitsProcessor(max_length, eos), lp.LogitNormalization()])
    expected = reference(torch.tensor(histories), torch.from_numpy(scores.copy())).numpy()
    rules = GenerationRules.from_settings(bad, forced_eos=True, renormalize=True, eos_id=eos)
    ours = log_softmax(rules.mask(scores, histories, np.full(3, forced), eos))
    np.testing.assert_allclose(ours, expected, atol=1e-6)  # −inf where the library puts −inf
    assert (ours == -np.inf).sum() == (expected == -np.inf).sum() > 0
    greedy = rules.greedy_pick(scores, histories, np.full(3, forced), eos)
    assert greedy.tolist() == expected.argmax(axis=1).tolist()


CASES = [  # (beam_size, max_new_tokens): None = the checkpoint's default (beam 4, 511 tokens)
    (None, None), (None, SHORT_BUDGET), (1, None), (1, SHORT_BUDGET), (3, 9)]


def decode_both_modes(entry: Path, rows: list[list[int]], beam: int, budget: int) -> tuple[list[list[int]], ...]:
    """Request-level (one padded batch) and continuous (every source its own request) over the exported graphs,
    with the rules config.yaml carries."""
    from transerve.server.backends.sessions import make_session
    from transerve.server.engine.model_config import latest_version, load_model_config
    from transerve.server.engine.scheduler import ContinuousScheduler, SchedulerCaps
    from transerve.server.engine.seq2seq import DecoderLayout, OrtSeq2Seq, pad_ids

    config = load_model_config(entry)
    d, vdir = config.decoder, latest_version(entry)
    assert d is not None
    layout = DecoderLayout(d.num_layers, d.num_heads, d.head_dim, d.bos_id, d.eos_id, d.pad_id)
    rules, penalty = config.generation.rules(d.eos_id), config.generation.length_penalty
    encoder, step = make_session(vdir / "encoder.onnx"), make_session(vdir / "decoder_step_ragged.onnx")
    static = OrtSeq2Seq(encoder, step, layout, rules).generate(*pad_ids(rows, d.pad_id), budget, beam, penalty)
    scheduler = ContinuousScheduler.over_graphs(encoder, step, layout, SchedulerCaps(max_cached_tokens=1 << 20),
                                                rules=rules)

    async def continuous() -> list[list[int]]:
        scheduler.start()
        try:
            return list(await asyncio.gather(*(scheduler.run(r, budget, beam, penalty) for r in rows)))
        finally:
            await scheduler.aclose()

    return static, asyncio.run(asyncio.wait_for(continuous(), 300))


@pytest.mark.parametrize(("beam", "budget"), CASES)
def test_both_scheduler_modes_decode_like_generate(checkpoint: Path, entry: Path, beam: int | None,
                                                   budget: int | None) -> None:
    from transerve.server.engine.model_config import load_model_config

    config = load_model_config(entry)
    overrides = {k: v for k, v in (("num_beams", beam), ("max_new_tokens", budget)) if v is not None}
    expected = hf_generate(checkpoint, SOURCES, **overrides)
    static, continuous = decode_both_modes(entry, sources(checkpoint, SOURCES), beam or config.beam_size,
                                           budget or config.max_new_tokens)
    assert static == expected
    assert continuous == expected
    limit = (budget or config.max_new_tokens) - 1  # the forced EOS takes the budget's last token
    assert all(len(row) <= limit for row in expected)
    if budget == SHORT_BUDGET:
        assert any(len(row) == limit for row in expected)  # the premise: some end by length (forced EOS)
    if budget is None:
        assert any(0 < len(row) < limit for row in expected)  # the premise: some end by EOS, mid-budget


@pytest.fixture(scope="module")
def served(entry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """The entry served twice: continuous batching (as exported) and request-level (``scheduler.mode: static``)."""
    static_repo = tmp_path_factory.mktemp("static-repo")
    shutil.copytree(entry, static_repo / "opus")
    config = yaml.safe_load((static_repo / "opus" / "config.yaml").read_text())
    config["scheduler"]["mode"] = "static"
    (static_repo / "opus" / "config.yaml").write_text(yaml.safe_dump(config))
    with running_server(entry.parent, "--no-http") as continuous, running_server(static_repo, "--no-http") as static:
        yield {"continuous": continuous, "static": static}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_served_translations_equal_generate(checkpoint: Path, served: dict[str, ServerProcess], mode: str) -> None:
    """Over gRPC, as a user calls it: no options (the checkpoint's beam 4 and budget), a short budget, greedy;
    unary and streamed. Text and token count equal what ``generate()`` makes."""
    transformers = import_or_skip("transformers")
    from transerve_client._proto import transerve_pb2 as tpb
    from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

    tok = transformers.MarianTokenizer.from_pretrained(checkpoint)
    with grpc.insecure_channel(served[mode].address) as channel:
        stub = tpb_grpc.TranslatorStub(channel)
        cases = [(tpb.TranslateOptions(), {}), (tpb.TranslateOptions(beam_size=1), {"num_beams": 1}),
                 (tpb.TranslateOptions(max_new_tokens=SHORT_BUDGET), {"max_new_tokens": SHORT_BUDGET})]
        for options, overrides in cases:
            expected = hf_generate(checkpoint, SOURCES, **overrides)
            response = stub.Translate(tpb.TranslateRequest(model="opus", texts=SOURCES, options=options))
            assert [(t.text, t.tokens) for t in response.translations] == [
                (tok.decode(ids, skip_special_tokens=True), len(ids)) for ids in expected], overrides
            streamed = list(stub.TranslateStream(tpb.TranslateStreamRequest(model="opus", text=SOURCES[0],
                                                                            options=options)))
            assert "".join(m.piece for m in streamed) == tok.decode(expected[0], skip_special_tokens=True)
            assert streamed[-1].done and streamed[-1].tokens == len(expected[0])
