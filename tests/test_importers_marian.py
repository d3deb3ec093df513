"""MarianMT importer against transformers' own model and tokenizer (random weights, a tokenizer trained here).

Parity: the same greedy token ids as ``MarianMTModel.generate`` (PyTorch and the exported ONNX graphs),
logits within 1e-4, and token ids equal to ``MarianTokenizer``'s.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from transerve.export.exporter import ExportOptions, export_translator_entry
from transerve.models.checkpoint import CheckpointError
from transerve.models.importers.marian import import_hf_marian

SOURCES = ["three hundred and forty-two", "nineteen eighty-four", "seven", "one thousand and one"]


def import_or_skip(module: str):  # type: ignore[no-untyped-def]
    try:
        return importlib.import_module(module)
    except Exception as e:
        pytest.skip(f"{module} unusable here: {type(e).__name__}: {str(e)[:120]}")


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import_or_skip("transformers")
    import_or_skip("sentencepiece")
    from transerve.models.importers.random_marian import write_random_marian

    return write_random_marian(tmp_path_factory.mktemp("marian"), random_bias=True, d_model=32, encoder_layers=2,
                               decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                               encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)


def reference(directory: Path):  # type: ignore[no-untyped-def]
    transformers = import_or_skip("transformers")
    return (transformers.MarianMTModel.from_pretrained(directory).eval(),
            transformers.MarianTokenizer.from_pretrained(directory))


def test_tokenizer_matches_marian_tokenizer(marian_dir: Path) -> None:
    _, hf_tok = reference(marian_dir)
    ours = import_hf_marian(marian_dir)
    for text in [*SOURCES, "  two   hundred  ", "fünfhundert"]:
        expected = hf_tok(text)["input_ids"]
        assert ours.encode_sources([text])[0][0].tolist() == expected, text
        assert ours.tokenizer.decode(expected) == hf_tok.decode(expected, skip_special_tokens=True)


def test_greedy_ids_and_logits_match_generate(marian_dir: Path, tmp_path: Path) -> None:
    hf_model, hf_tok = reference(marian_dir)
    ours = import_hf_marian(marian_dir)
    batch = hf_tok(SOURCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = hf_model.generate(**batch, num_beams=1, do_sample=False, max_new_tokens=12)
        decoder_in = generated[:, :-1]
        hf_logits = hf_model(**batch, decoder_input_ids=decoder_in).logits
        src, keep = ours.encode_sources(SOURCES)
        our_logits = ours.model(src, keep, decoder_in)
    np.testing.assert_allclose(our_logits.numpy(), hf_logits.numpy(), atol=1e-4, rtol=1e-4)
    eos, pad = hf_model.config.eos_token_id, hf_model.config.pad_token_id
    expected = [[t for t in row[1:] if t != pad] for row in generated.tolist()]
    expected = [row[: row.index(eos)] if eos in row else row for row in expected]
    from transerve.models.decoding import translate_ids

    assert sum(len(row) for row in expected) > 10  # the random model really generates
    assert translate_ids(ours.model, src, keep, 12, rules=ours.decoding.rules) == expected
    report = export_translator_entry(ours.model, ours.tokenizer, ExportOptions(tmp_path, "marian"),
                                     eval_pairs=[(s, "") for s in SOURCES], max_new_tokens=12)
    assert report["parity"]["tokens_equal"] is True and report["parity"]["max_abs_diff"] <= 1e-4


def test_not_a_marian_checkpoint(tmp_path: Path, marian_dir: Path) -> None:
    (tmp_path / "config.json").write_text((marian_dir / "config.json").read_text())
    torch.save({"something": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="missing"):
        import_hf_marian(tmp_path)


def test_cli_exports_a_marian_directory(marian_dir: Path, tmp_path: Path) -> None:
    from transerve.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["export", "hf-marian", str(marian_dir), "--repo", str(tmp_path / "repo"),
                                      "--name", "opus", "--max-new-tokens", "12"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "repo" / "opus" / "1").glob("*.onnx")} == {
        "encoder.onnx", "decoder_step_ragged.onnx", "decoder_score.onnx", "decoder_align.onnx"}


def test_continuous_batching_scheduler_decodes_marian_like_generate(marian_dir: Path, tmp_path: Path) -> None:
    """The server's scheduler over the exported Marian graphs, with the checkpoint's rules: greedy = ``generate``,
    beam = offline beam (tests/test_marian_generation.py holds beams to ``generate`` too)."""
    import asyncio

    from transerve.models.decoding import translate_ids
    from transerve.server.backends.sessions import make_session
    from transerve.server.engine.scheduler import ContinuousScheduler, DecoderLayout, SchedulerCaps

    hf_model, hf_tok = reference(marian_dir)
    ours = import_hf_marian(marian_dir)
    export_translator_entry(ours.model, ours.tokenizer, ExportOptions(tmp_path, "marian"), max_new_tokens=12)
    vdir, c = tmp_path / "marian" / "1", ours.model.config
    layout = DecoderLayout(c.num_decoder_layers, c.num_heads, c.d_model // c.num_heads, c.bos_id, c.eos_id, c.pad_id)
    scheduler = ContinuousScheduler.over_graphs(make_session(vdir / "encoder.onnx"),
                                                make_session(vdir / "decoder_step_ragged.onnx"), layout,
                                                SchedulerCaps(), rules=ours.decoding.rules)
    sources = [hf_tok(s)["input_ids"] for s in SOURCES]

    async def serve() -> list[list[int]]:
        scheduler.start()
        plan = [scheduler.run(src, 12, beam) for beam in (1, 3) for src in sources]
        results = await asyncio.gather(*plan)
        await scheduler.aclose()
        return list(results)

    served = asyncio.run(asyncio.wait_for(serve(), 60))
    with torch.no_grad():
        generated = hf_model.generate(**hf_tok(SOURCES, return_tensors="pt", padding=True), num_beams=1,
                                      do_sample=False, max_new_tokens=12)
    eos, pad = hf_model.config.eos_token_id, hf_model.config.pad_token_id
    greedy = [[t for t in row[1:] if t != pad] for row in generated.tolist()]
    greedy = [row[: row.index(eos)] if eos in row else row for row in greedy]
    beams = []
    for src in sources:
        ids = torch.tensor([src])
        beams += translate_ids(ours.model, ids, torch.ones_like(ids, dtype=torch.bool), 12, beam_size=3,
                               rules=ours.decoding.rules)
    assert served == greedy + beams
    assert sum(len(row) for row in greedy) > 10


def test_marian_export_decodes_like_pytorch_in_both_scheduler_modes(marian_dir: Path, tmp_path: Path) -> None:
    """Serving's numpy search over the exported Marian graphs, request-level and continuous, against the
    PyTorch search: greedy and beams 1–5 × length penalties 0.5–2, mixed source lengths, token for token."""
    from test_search import assert_modes_equal_offline
    from transerve.server.backends.sessions import make_session

    ours = import_hf_marian(marian_dir)
    export_translator_entry(ours.model, ours.tokenizer, ExportOptions(tmp_path, "marian"), max_new_tokens=12)
    vdir = tmp_path / "marian" / "1"
    src, keep = ours.encode_sources(SOURCES)
    rows = [row[mask].tolist() for row, mask in zip(src, keep, strict=True)]
    assert len({len(r) for r in rows}) > 1  # mixed lengths
    assert_modes_equal_offline(ours.model, make_session(vdir / "encoder.onnx"),
                               make_session(vdir / "decoder_step_ragged.onnx"), rows, 12)
