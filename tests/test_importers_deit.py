"""DeiT through the ViT importers, against the libraries' own models (random-initialised, saved their way).

Hugging Face ``DeiTForImageClassification`` (class and distillation tokens, the class head only) and
``DeiTForImageClassificationWithTeacher`` (both heads, logits averaged), timm ``deit_tiny_patch16_224`` (a plain
ViT) and ``deit_tiny_distilled_patch16_224`` (``VisionTransformerDistilled``: heads averaged at inference).
Tolerance: logits within 1e-4 max-abs (fp32), PyTorch and the exported graph (attention fused, verified).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_importers_vit import TOL, import_or_skip, import_timm, reference_logits
from transerve.export.exporter import ExportOptions, export_vit_entry
from transerve.models.importers.vit import VIT_IMPORTERS


def randomized_tokens(model: Any) -> Any:
    """The libraries start the class and distillation tokens at zero (or near it): drawn here, so that reading
    them in the wrong place could not pass unnoticed."""
    with torch.no_grad():
        for module in model.modules():
            for name in ("cls_token", "dist_token", "distillation_token"):
                token = getattr(module, name, None)
                if isinstance(token, torch.nn.Parameter):
                    token.normal_()
    return model


def hf_deit(directory: Path, teacher: bool) -> Any:
    transformers = import_or_skip("transformers")
    config = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     image_size=32, patch_size=8, num_labels=5)
    kind = transformers.DeiTForImageClassificationWithTeacher if teacher else transformers.DeiTForImageClassification
    model = randomized_tokens(kind(config).eval())
    model.save_pretrained(directory)
    return model


def timm_deit(directory: Path, distilled: bool) -> Any:
    timm = import_timm()
    pytest.importorskip("huggingface_hub")
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0}
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    model = randomized_tokens(timm.create_model(name, pretrained=False, num_classes=5, **args).eval())
    importlib.import_module("timm.models._hub").save_for_hf(model, directory, model_args=args, safe_serialization=True)
    return model


CASES = {"hf-deit": ("hf-vit", lambda d: hf_deit(d, False)),
         "hf-deit-with-teacher": ("hf-vit", lambda d: hf_deit(d, True)),
         "timm-deit": ("timm-vit", lambda d: timm_deit(d, False)),
         "timm-deit-distilled": ("timm-vit", lambda d: timm_deit(d, True))}


@pytest.mark.parametrize("case", list(CASES))
def test_deit_imports_match_the_library_and_export(case: str, tmp_path: Path) -> None:
    importer, make = CASES[case]
    torch.manual_seed(0)
    source = make(tmp_path / "ckpt")
    ours, extra = VIT_IMPORTERS[importer](tmp_path / "ckpt")
    assert ours.config.distillation_token == (case != "timm-deit")
    x = torch.randn(3, 3, 32, 32)
    expected = reference_logits(source, x)
    with torch.no_grad():
        np.testing.assert_allclose(ours(x).numpy(), expected, atol=TOL, rtol=TOL)
        np.testing.assert_allclose(ours.forward_class_token(x).numpy(), expected, atol=TOL, rtol=TOL)
    report = export_vit_entry(ours, ExportOptions(tmp_path / "repo", case), **extra)
    assert report["parity"]["max_abs_diff"] <= TOL and report["attention"] == {"expected": 2, "fused": 2}
