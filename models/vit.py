"""Vision Transformer: an image cut into patches, read as a sequence of tokens.

A conv with kernel = stride = patch size embeds each patch; a learned class
token is prepended and learned positions are added; pre-norm encoder blocks
mix the tokens; the class token's final state is classified (DeiT: a distillation token beside it, whose
head's logits are averaged with the class head's where the checkpoint has one).

``norm="batch"`` swaps every LayerNorm for BatchNorm over features, puts a
BatchNorm conv stem in front of the patch embedding and a BatchNorm inside
each MLP — all directly after a Conv or Linear, so export can fold every one
of them into weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transerve.models.attention import AttentionImpl, SelfAttention
from transerve.models.norms import FeatureBatchNorm, NormName, make_norm


@dataclass
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    norm: NormName = "layer"
    norm_eps: float = 1e-5  # imported checkpoints: 1e-12 (Hugging Face), 1e-6 (torchvision, timm)
    attn_impl: AttentionImpl = "sdpa"
    distillation_token: bool = False  # DeiT: a second prefix token after the class token
    distillation_head: bool = False  # DeiT with teacher / timm distilled: logits = (head(cls) + head_dist(dist)) / 2

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patches: the class token, and DeiT's distillation token."""
        return 2 if self.distillation_token else 1


class PatchEmbed(nn.Module):
    """[B, 3, H, W] → [B, N, C] with N = (H / P)·(W / P) patches."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
        # The BN variant's stem: a 3×3 conv + BatchNorm + ReLU before patchifying.
        self.stem: nn.Module = nn.Identity()
        stem_out = cfg.in_chans
        if cfg.norm == "batch":
            stem_out = cfg.dim // 2
            self.stem = nn.Sequential(
                nn.Conv2d(cfg.in_chans, stem_out, 3, padding=1, bias=False), nn.BatchNorm2d(stem_out), nn.ReLU()
            )
        self.proj = nn.Conv2d(stem_out, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(self.stem(x))  # [B, C, H/P, W/P]
        return x.flatten(2).transpose(1, 2)  # [B, N, C]


class Mlp(nn.Module):
    """Linear → [BatchNorm] → GELU → Linear."""

    def __init__(self, dim: int, hidden: int, batch_norm: bool, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = FeatureBatchNorm(hidden) if batch_norm else nn.Identity()
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.norm(self.fc1(x))))))


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.attn_impl, cfg.dropout)
        self.norm2 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.norm == "batch", cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))

    def forward_first(self, x: Tensor, count: int = 1) -> Tensor:
        """The block's output at the first ``count`` positions only, ``[B, count, C]`` (every norm here acts on
        each token alone)."""
        first = x[:, :count]
        first = first + self.attn.forward_first(self.norm1(first), self.norm1(x))
        return first + self.mlp(self.norm2(first))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        if cfg.distillation_head and not cfg.distillation_token:
            raise ValueError("distillation_head needs distillation_token")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.distillation_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + cfg.prefix_tokens, cfg.dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.depth)))
        self.norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.head_dist = nn.Linear(cfg.dim, cfg.num_classes) if cfg.distillation_head else None

    def embed(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] → input tokens [B, T + N, C] (class token first, then DeiT's distillation token; positions
        added)."""
        x = self.patch_embed(images)  # [B, N, C]
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        return torch.cat([*prefix, x], dim=1) + self.pos_embed  # [B, T + N, C]

    def forward_features(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] → token states [B, 1 + N, C] (class token first)."""
        return self.norm(self.blocks(self.embed(images)))

    def forward_head(self, features: Tensor) -> Tensor:
        logits = self.head(features[:, 0])  # [B, classes]
        if self.head_dist is not None:  # DeiT's inference: the class and distillation heads averaged
            logits = (logits + self.head_dist(features[:, 1])) / 2
        return logits

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    def forward_class_token(self, images: Tensor) -> Tensor:
        """The same logits as ``forward``, with the last block computed only where the head reads (the class
        token): its queries, output projection, MLP and final norm for one position instead of 1 + N. Exact
        math, not an approximation; what the exported graph runs (``transerve.export.graphs.export_vit``)."""
        *body, last = self.blocks
        x = self.embed(images)
        for block in body:
            x = block(x)
        assert isinstance(last, Block)
        return self.forward_head(self.norm(last.forward_first(x, 2 if self.head_dist is not None else 1)))
