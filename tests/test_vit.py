"""ViT: shapes, each norm variant trains and evaluates, and the BN variant is foldable by design."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transerve.models.norms import FeatureBatchNorm, FeatureGroupNorm, make_norm
from transerve.models.vit import ViT, ViTConfig

NORMS = ["layer", "batch", "group"]


def tiny(norm: str, attn_impl: str = "sdpa") -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, num_heads=4, norm=norm, attn_impl=attn_impl))


@pytest.mark.parametrize("norm", NORMS)
def test_shapes(norm: str) -> None:
    model = tiny(norm).eval()
    images = torch.randn(3, 3, 16, 16)
    assert model.forward_features(images).shape == (3, 1 + 16, 32)
    assert model(images).shape == (3, 10)


@pytest.mark.parametrize("norm", NORMS)
def test_each_norm_variant_trains_and_evaluates(norm: str) -> None:
    """Fitting a fixed batch drives the loss down; eval mode is deterministic and batch-independent."""
    model = tiny(norm)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    model.eval()
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(model(x[:5]), full[:5], atol=1e-5, rtol=1e-5)  # no batch statistics at eval


@pytest.mark.parametrize("norm", NORMS)
def test_sdpa_and_explicit_attention_agree(norm: str) -> None:
    fast, ref = tiny(norm, "sdpa").eval(), tiny(norm, "explicit").eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["layer", "batch", "group"])
@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_class_token_path_equals_the_full_forward(norm: str, impl: str) -> None:
    """forward_class_token computes the last block for the class token only; the logits must not change
    (fp32, 1e-5 — only the GEMM shapes differ)."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=3, num_heads=4, norm=norm,  # type: ignore[arg-type]
                          attn_impl=impl)).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():  # nothing left at its zero/one initialisation
            p.add_(0.1 * torch.randn_like(p))
        images = torch.randn(5, 3, 16, 16)
        torch.testing.assert_close(model.forward_class_token(images), model(images), atol=1e-5, rtol=1e-5)


def test_batch_variant_puts_every_batchnorm_right_after_a_linear_or_conv() -> None:
    """What makes BN folding possible: each BN follows a Conv/Linear (stem, MLP) or feeds one (pre-norm)."""
    model = tiny("batch")
    assert isinstance(model.patch_embed.stem[0], nn.Conv2d) and isinstance(model.patch_embed.stem[1], nn.BatchNorm2d)
    for block in model.blocks:
        assert isinstance(block.mlp.norm, FeatureBatchNorm)
        assert isinstance(block.norm1, FeatureBatchNorm) and isinstance(block.norm2, FeatureBatchNorm)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())


def test_feature_batchnorm_is_a_per_feature_affine_map_at_inference() -> None:
    bn = FeatureBatchNorm(6)
    bn.train()
    bn(torch.randn(8, 5, 6) * 3 + 2)  # collect running statistics
    bn.eval()
    x = torch.randn(4, 5, 6)
    s = bn.bn.weight / torch.sqrt(bn.bn.running_var + bn.bn.eps)
    t = bn.bn.bias - s * bn.bn.running_mean
    torch.testing.assert_close(bn(x), x * s + t, atol=1e-5, rtol=1e-5)


def test_group_norm_normalises_each_group_of_each_token() -> None:
    gn = FeatureGroupNorm(8, num_groups=2).eval()
    y = gn(torch.randn(3, 4, 8) * 5 + 1).reshape(3, 4, 2, 4)
    torch.testing.assert_close(y.mean(-1), torch.zeros(3, 4, 2), atol=1e-5, rtol=0)


def test_unknown_norm_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="norm must be one of"):
        make_norm("instance-ish", 8)
