"""Checkpoint round trip, and every broken directory gives one clear error naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transerve.cli import app
from transerve.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.models.vit import ViT, ViTConfig
from typer.testing import CliRunner


def small_models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [
        ViT(ViTConfig(image_size=8, patch_size=4, dim=16, depth=1, num_heads=2, norm="batch")),
        Seq2SeqTransformer(TransformerConfig(vocab_size=20, d_model=16, num_heads=2, num_encoder_layers=1,
                                             num_decoder_layers=1, ffn_dim=32)),
    ]


@pytest.mark.parametrize("model", small_models(), ids=["vit", "transformer"])
def test_round_trip(model: torch.nn.Module, tmp_path: Path) -> None:
    model.eval()
    save_checkpoint(model, tmp_path / "ckpt", extra={"note": "x"})
    loaded, extra = load_checkpoint(tmp_path / "ckpt")
    assert extra == {"note": "x"} and type(loaded) is type(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.fixture
def good_dir(tmp_path: Path) -> Path:
    return save_checkpoint(small_models()[0], tmp_path / "good")


def break_missing_dir(d: Path) -> str:
    shutil.rmtree(d)
    return str(d)


def break_missing_config(d: Path) -> str:
    (d / "config.json").unlink()
    return "config.json"


def break_corrupt_json(d: Path) -> str:
    (d / "config.json").write_text("{not json")
    return "config.json"


def break_unknown_architecture(d: Path) -> str:
    meta = json.loads((d / "config.json").read_text())
    meta["architecture"] = "lstm"
    (d / "config.json").write_text(json.dumps(meta))
    return "config.json"


def break_missing_weights(d: Path) -> str:
    (d / "model.safetensors").unlink()
    return "model.safetensors"


def break_corrupt_weights(d: Path) -> str:
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    return "model.safetensors"


def break_config_mismatch(d: Path) -> str:
    meta = json.loads((d / "config.json").read_text())
    meta["config"]["dim"] = 32
    meta["config"]["num_heads"] = 4
    (d / "config.json").write_text(json.dumps(meta))
    return "model.safetensors"


BREAKS = [break_missing_dir, break_missing_config, break_corrupt_json, break_unknown_architecture,
          break_missing_weights, break_corrupt_weights, break_config_mismatch]


@pytest.mark.parametrize("breaker", BREAKS, ids=lambda f: f.__name__.removeprefix("break_"))
def test_broken_checkpoint_is_one_clear_error(breaker, good_dir: Path) -> None:
    names = breaker(good_dir)
    with pytest.raises(CheckpointError, match=names.replace(".", r"\.")):
        load_checkpoint(good_dir)
    result = CliRunner().invoke(app, ["checkpoint", "show", str(good_dir)])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.output
    assert lines[0].startswith("error:") and names in " ".join(lines)


def test_cli_process_prints_one_line_not_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "transerve", "checkpoint", "show", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "nope" in proc.stderr
