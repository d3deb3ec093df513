"""ViT importers against the source libraries' own models (random-initialised, saved the libraries' way).

Tolerance: logits within 1e-4 max-abs (fp32), before and after export.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transerve.export.exporter import ExportOptions, export_vit_entry
from transerve.models.checkpoint import CheckpointError
from transerve.models.importers.vit import VIT_IMPORTERS

TOL = 1e-4


def hf_vit(directory: Path) -> torch.nn.Module:
    transformers = import_or_skip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(directory)
    return model


def import_or_skip(module: str):  # type: ignore[no-untyped-def]
    """Like importorskip, but also skips when the import itself breaks (torchvision's CUDA-only wheel on CPU torch)."""
    try:
        return importlib.import_module(module)
    except Exception as e:
        pytest.skip(f"{module} unusable here: {type(e).__name__}: {str(e)[:120]}")


class TorchvisionLayoutViT(nn.Module):
    """An independent reference with torchvision's parameter names, built from torch.nn's own
    MultiheadAttention/LayerNorm (what torchvision's EncoderBlock uses), for machines where
    torchvision cannot be imported (there is no CPU torchvision wheel for torch 2.13 here)."""

    def __init__(self, size: int = 32, patch: int = 8, layers: int = 2, heads: int = 4, dim: int = 32,
                 mlp: int = 64, classes: int = 5) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.encoder = nn.Module()
        self.encoder.pos_embedding = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.encoder.layers = nn.Sequential()
        for i in range(layers):
            block = nn.Module()
            block.ln_1, block.ln_2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            block.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
            block.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, dim))
            self.encoder.layers.add_module(f"encoder_layer_{i}", block)
        self.encoder.ln = nn.LayerNorm(dim, eps=1e-6)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(dim, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x], dim=1) + self.encoder.pos_embedding
        for block in self.encoder.layers:
            h = block.ln_1(x)
            x = x + block.self_attention(h, h, h, need_weights=False)[0]
            x = x + block.mlp(block.ln_2(x))
        return self.heads(self.encoder.ln(x)[:, 0])


def torchvision_vit(directory: Path) -> torch.nn.Module:
    try:
        tv = importlib.import_module("torchvision.models.vision_transformer")
        model = tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                     mlp_dim=64, num_classes=5).eval()
    except Exception:  # no usable torchvision: the same layout from torch.nn parts
        model = TorchvisionLayoutViT().eval()
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "vit.pth")
    (directory / "config.json").write_text(json.dumps({"num_heads": 4}))
    return model


def import_timm():  # type: ignore[no-untyped-def]
    """timm itself — its real VisionTransformer — even where torchvision cannot be imported.

    timm imports torchvision at import time for parts a ViT never touches (FrozenBatchNorm2d, data transforms,
    datasets). There is no CPU torchvision wheel for torch 2.13 here (the one on the registry links CUDA
    libraries), so `make install` installs timm without dependencies and, if torchvision is unusable, the import
    runs with an import stub standing in for torchvision; the stub is removed again right after, so no other
    test sees it."""
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("torchvision"):
            pytest.skip(f"timm unusable here: {e}")
    finder = _TorchvisionStub()
    sys.meta_path.insert(0, finder)
    try:
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[name]  # half-imported by the failed attempt
        return importlib.import_module("timm")
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]


class _Placeholder(type):
    """Any attribute of a stubbed torchvision module: a class whose attributes and instances are placeholders."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})

    def __call__(cls, *args: object, **kwargs: object) -> type:
        return _Placeholder(cls.__name__, (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def timm_vit(directory: Path) -> torch.nn.Module:
    """timm's own model, saved the way timm saves for the Hub (config.json with model_args + safetensors)."""
    timm = import_timm()
    pytest.importorskip("huggingface_hub")
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **args).eval()
    importlib.import_module("timm.models._hub").save_for_hf(model, directory, model_args=args,
                                                            safe_serialization=True)
    return model


SOURCES = {"hf-vit": hf_vit, "torchvision-vit": torchvision_vit, "timm-vit": timm_vit}


def reference_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(x)
    return (out.logits if hasattr(out, "logits") else out).numpy()


@pytest.mark.parametrize("kind", list(SOURCES))
def test_import_matches_source_and_exports(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = SOURCES[kind](tmp_path / "ckpt")
    ours, extra = VIT_IMPORTERS[kind](tmp_path / "ckpt")
    x = torch.randn(3, 3, 32, 32)
    expected = reference_logits(source, x)
    with torch.no_grad():
        np.testing.assert_allclose(ours(x).numpy(), expected, atol=TOL, rtol=TOL)
    report = export_vit_entry(ours, ExportOptions(tmp_path / "repo", kind), **extra)
    assert report["parity"]["max_abs_diff"] <= TOL and report["attention"] == {"expected": 2, "fused": 2}


def test_mismatched_checkpoint_names_the_tensor(tmp_path: Path) -> None:
    hf_vit(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["intermediate_size"] = 48  # the weights say 64
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match its config"):
        VIT_IMPORTERS["hf-vit"](tmp_path / "ckpt")


def test_timm_average_pooling_is_refused_not_misread(tmp_path: Path) -> None:
    timm_vit(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["global_pool"] == "token"  # what timm wrote for the class-token model
    config["global_pool"] = "avg"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="global_pool 'avg' is not supported"):
        VIT_IMPORTERS["timm-vit"](tmp_path / "ckpt")


def test_wrong_architecture_is_named(tmp_path: Path) -> None:
    torchvision_vit(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="missing"):
        VIT_IMPORTERS["timm-vit"](tmp_path / "ckpt")


@pytest.mark.parametrize("kind", list(SOURCES))
def test_cli_exports_each_source_directory(kind: str, tmp_path: Path) -> None:
    from transerve.cli import app
    from typer.testing import CliRunner

    SOURCES[kind](tmp_path / "ckpt")
    result = CliRunner().invoke(app, ["export", kind, str(tmp_path / "ckpt"), "--repo", str(tmp_path / "repo"),
                                      "--name", "imported"], terminal_width=200)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "repo" / "imported" / "1" / "export_report.json").read_text())
    assert report["parity"]["max_abs_diff"] <= TOL
