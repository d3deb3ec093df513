"""End-to-end export into a repository entry, its report, its variants and the CLI around it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transerve.cli import app
from transerve.export.exporter import ExportOptions, export_translator_entry, export_vit_entry, ort_seq2seq
from transerve.models.checkpoint import save_checkpoint
from transerve.models.decoding import translate_ids
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.models.translator import TOKENIZER_FILE
from transerve.models.vit import ViT, ViTConfig
from transerve.models.zoo.numbers import train_tokenizer
from transerve.models.zoo.numbers_data import NumbersDataConfig, make_split
from transerve.server.backends.sessions import make_session
from transerve.server.engine.seq2seq import pad_ids
from typer.testing import CliRunner

REPORT_KEYS = {"passes", "op_counts_before", "op_counts_after", "parity", "accuracy"}


def small_vit() -> ViT:
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=4, dim=16, depth=2, num_heads=2, norm="batch")).train()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8))
    return model.eval()


def small_translator(vocab: int = 40) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return Seq2SeqTransformer(TransformerConfig(vocab_size=vocab, d_model=16, num_heads=2, num_encoder_layers=2,
                                                num_decoder_layers=2, ffn_dim=32, dropout=0.0, max_len=32)).eval()


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    train, _ = make_split(NumbersDataConfig(cardinals=300, ordinals=50, test_cardinals=5, test_ordinals=5,
                                            test_years=2))
    return train_tokenizer([t for p in train for t in p], 40)


def test_vit_entry(tmp_path: Path) -> None:
    labels = np.arange(6) % 10
    images = np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32)
    report = export_vit_entry(small_vit(), ExportOptions(tmp_path, "v", int8=True), labels=[str(i) for i in range(10)],
                              preprocessing={"size": 8}, eval_images=images, eval_labels=labels)
    assert set(report) >= REPORT_KEYS
    assert report["op_counts_after"]["model"].get("BatchNormalization", 0) == 0
    assert report["op_counts_before"]["model"]["BatchNormalization"] > 0
    assert report["attention"] == {"expected": 2, "fused": 2}
    assert report["parity"]["max_abs_diff"] <= 1e-4
    assert report["accuracy"]["pytorch"] == report["accuracy"]["onnx"]
    assert report["variants"]["int8"]["runs_on_cpu"] is True
    entry = tmp_path / "v"
    config = yaml.safe_load((entry / "config.yaml").read_text())
    assert config["task"] == "classify" and config["inputs"][0]["dims"] == [-1, 3, 8, 8]
    assert (entry / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    # the PyTorch copy (for --backend torch only) is written only when asked for (torch_checkpoint)
    assert {p.name for p in (entry / "1").iterdir()} == {"model.onnx", "model.int8.onnx", "export_report.json"}
    assert json.loads((entry / "1" / "export_report.json").read_text())["parity"] == report["parity"]


def test_translator_entry_decodes_like_pytorch(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = small_translator(tokenizer.get_vocab_size())
    report = export_translator_entry(model, tokenizer, ExportOptions(tmp_path, "t"), max_new_tokens=12)
    assert report["parity"]["tokens_equal"] is True and report["parity"]["max_abs_diff"] <= 1e-4
    assert report["attention"] == {"encoder": {"expected": 2, "fused": 2},
                                   "decoder_step_ragged": {"expected": 4, "fused": 4}}
    vdir = tmp_path / "t" / "1"
    seq2seq = ort_seq2seq(model, make_session(vdir / "encoder.onnx"), make_session(vdir / "decoder_step_ragged.onnx"))
    rows = [[5, 9, 2], [7, 8, 11, 12, 13, 2], [3, 2]]
    ids, mask = pad_ids(rows, 0)
    expected = translate_ids(model, torch.from_numpy(ids), torch.from_numpy(mask).bool(), 12, beam_size=3)
    assert seq2seq.generate(ids, mask, 12, beam_size=3) == expected  # beam search over ORT, too
    assert (tmp_path / "t" / TOKENIZER_FILE).is_file()


def test_tensorrt_legacy_target_still_verifies(tmp_path: Path) -> None:
    report = export_vit_entry(small_vit(), ExportOptions(tmp_path, "v", target="tensorrt-legacy"),
                              labels=[str(i) for i in range(10)], preprocessing={"size": 8})
    assert "Attention" not in report["op_counts_after"]["model"]
    assert report["parity"]["max_abs_diff"] <= 1e-4


runner = CliRunner()


def test_cli_export_and_inspect(tmp_path: Path) -> None:
    save_checkpoint(small_vit(), tmp_path / "ckpt")
    result = runner.invoke(app, ["export", "vit", str(tmp_path / "ckpt"), "--repo", str(tmp_path / "repo"),
                                 "--name", "mine"], terminal_width=200)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "repo" / "mine")], terminal_width=200)
    assert result.exit_code == 0
    assert "fold_batchnorm" in result.output and "BatchNormalization" in result.output


def test_cli_errors_name_the_cause(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    translator_dir = save_checkpoint(small_translator(), tmp_path / "mt")
    tokenizer.save(str(translator_dir / TOKENIZER_FILE))
    wrong = runner.invoke(app, ["export", "vit", str(translator_dir), "--repo", str(tmp_path / "repo")])
    assert wrong.exit_code == 2 and "unsupported architecture" in wrong.output
    save_checkpoint(small_vit(), tmp_path / "ckpt")
    runner.invoke(app, ["export", "vit", str(tmp_path / "ckpt"), "--repo", str(tmp_path / "repo"), "--name", "v"])
    onnx_file = tmp_path / "repo" / "v" / "1" / "model.onnx"
    onnx_file.write_bytes(b"not a protobuf")
    corrupt = runner.invoke(app, ["inspect", str(tmp_path / "repo" / "v")])
    assert corrupt.exit_code == 2 and "model.onnx" in corrupt.output and "corrupt ONNX" in corrupt.output
    missing = runner.invoke(app, ["inspect", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "not a model-repository entry" in missing.output
