"""Encoder–decoder Transformer for translation (seq2seq).

The encoder reads the whole source at once (self-attention over every source
token); the decoder writes the target one token at a time, attending causally
to what it has written and, through cross-attention, to the encoder's memory.

Decoding is split into stages so export can target each one:
``encode`` (source → memory), ``memory_kv`` (memory → per-layer cross K/V,
computed once per source) and ``decode`` (new tokens + self-attention cache →
logits + grown cache). Full recomputation is ``decode`` with ``past=None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from transerve.models.attention import (
    AttentionImpl,
    CrossAttention,
    KVCache,
    SelfAttention,
    causal_mask,
    padding_mask,
)
from transerve.models.norms import NormName, make_norm
from transerve.models.positional import SinusoidalPositions


@dataclass
class TransformerConfig:
    vocab_size: int
    d_model: int = 128
    num_heads: int = 4
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    ffn_dim: int = 512
    dropout: float = 0.1
    pre_norm: bool = True  # pre-norm trains without warm-up tricks; post-norm is the 2017 original
    norm: NormName = "layer"  # layer | batch | group
    tie_embeddings: bool = True  # one joint vocabulary: source, target and output share weights
    max_len: int = 256  # longest source or target, in tokens, the position table covers
    pad_id: int = 0
    bos_id: int = 1  # the decoder's start token (MarianMT starts from its pad token)
    eos_id: int = 2
    attn_impl: AttentionImpl = "sdpa"
    activation: str = "relu"  # relu | gelu | swish (MarianMT)
    position_layout: str = "interleaved"  # interleaved sin/cos pairs, or "split" (all sines, then cosines: Marian)
    scale_embeddings: bool = True  # multiply token embeddings by √C
    output_bias: bool = False  # a bias on the output projection (Marian's final_logits_bias)
    norm_eps: float = 1e-5


def _pre_post(norm: nn.Module, pre_norm: bool) -> tuple[nn.Module, nn.Module]:
    """Place one norm before the sublayer (pre-norm) or after the residual (post-norm)."""
    return (norm, nn.Identity()) if pre_norm else (nn.Identity(), norm)


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU}


class FeedForward(nn.Module):
    """Position-wise MLP: Linear → activation → Linear."""

    def __init__(self, dim: int, hidden: int, dropout: float, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), ACTIVATIONS[activation](), nn.Dropout(dropout), nn.Linear(hidden, dim),
            nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg.d_model, cfg.num_heads, cfg.attn_impl, cfg.dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.dropout, cfg.activation)
        self.norm_in1, self.norm_out1 = _pre_post(make_norm(cfg.norm, cfg.d_model, cfg.norm_eps), cfg.pre_norm)
        self.norm_in2, self.norm_out2 = _pre_post(make_norm(cfg.norm, cfg.d_model, cfg.norm_eps), cfg.pre_norm)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.norm_out1(x + self.attn(self.norm_in1(x), mask)[0])
        return self.norm_out2(x + self.ffn(self.norm_in2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg.d_model, cfg.num_heads, cfg.attn_impl, cfg.dropout)
        self.cross_attn = CrossAttention(cfg.d_model, cfg.num_heads, cfg.attn_impl, cfg.dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.dropout, cfg.activation)
        self.norm_in1, self.norm_out1 = _pre_post(make_norm(cfg.norm, cfg.d_model, cfg.norm_eps), cfg.pre_norm)
        self.norm_in2, self.norm_out2 = _pre_post(make_norm(cfg.norm, cfg.d_model, cfg.norm_eps), cfg.pre_norm)
        self.norm_in3, self.norm_out3 = _pre_post(make_norm(cfg.norm, cfg.d_model, cfg.norm_eps), cfg.pre_norm)

    def forward(
        self, x: Tensor, self_mask: Tensor | None, memory_kv: KVCache, src_mask: Tensor, past: KVCache | None,
        cross_weights: list[Tensor] | None = None,
    ) -> tuple[Tensor, KVCache]:
        """``cross_weights``: when a list, this layer's cross-attention weights ``[B, H, T, S]`` are appended."""
        attended, present = self.self_attn(self.norm_in1(x), self_mask, past)
        x = self.norm_out1(x + attended)
        if cross_weights is None:
            crossed = self.cross_attn(self.norm_in2(x), memory_kv, src_mask)
        else:
            crossed, weights = self.cross_attn.forward_with_weights(self.norm_in2(x), memory_kv, src_mask)
            cross_weights.append(weights)
        x = self.norm_out2(x + crossed)
        return self.norm_out3(x + self.ffn(self.norm_in3(x))), present


class Seq2SeqTransformer(nn.Module):
    """The translator: token ids in, next-token logits out."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.src_embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.tgt_embed = self.src_embed if cfg.tie_embeddings else nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = SinusoidalPositions(cfg.d_model, cfg.max_len, cfg.position_layout)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        # Pre-norm leaves the residual stream unnormalised, so each stack ends with a norm.
        self.encoder_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.decoder_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.output_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.src_embed.weight
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self._init_embeddings()

    @torch.no_grad()
    def _init_embeddings(self) -> None:
        """N(0, 1/C), so that after the √C scale tokens and positions have the same magnitude.

        PyTorch's N(0, 1) default would, once scaled, drown the ±1 positional code.
        """
        for embed in {self.src_embed, self.tgt_embed}:
            nn.init.normal_(embed.weight, std=self.config.d_model**-0.5)
            embed.weight[self.config.pad_id].zero_()

    def encode(self, src: Tensor, src_keep: Tensor) -> Tensor:
        """src: [B, S] ids, src_keep: [B, S] True for real tokens → memory [B, S, C]."""
        x = self.embed_dropout(self.positions(self.src_embed(src) * self.embed_scale))
        # [B, 1, S, S]: ONNX Runtime's Attention kernel does not broadcast the mask's query axis.
        mask = padding_mask(src_keep).expand(-1, -1, src.shape[1], -1)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x)

    def memory_kv(self, memory: Tensor) -> list[KVCache]:
        """Cross-attention K/V of every decoder layer, computed once per source."""
        return [cast(DecoderLayer, layer).cross_attn.memory_kv(memory) for layer in self.decoder]

    def decode(
        self, tgt: Tensor, memory_kv: list[KVCache], src_keep: Tensor, past: list[KVCache] | None = None,
        cross_weights: list[Tensor] | None = None,
    ) -> tuple[Tensor, list[KVCache]]:
        """tgt: [B, T] new ids → logits [B, T, V] and the grown self-attention cache.

        With ``past`` the new tokens continue the cached positions; without it
        they start at position 0. ``cross_weights``: a list that receives every layer's cross-attention
        weights ``[B, H, T, S]`` (what scoring and word alignment read).
        """
        offset = 0 if past is None else past[0][0].shape[2]
        x = self.embed_dropout(self.positions(self.tgt_embed(tgt) * self.embed_scale, offset))
        t = tgt.shape[1]
        # One new token may see every cached position, so it needs no causal mask.
        self_mask = None if t == 1 else causal_mask(t, offset + t, tgt.device)
        src_mask = padding_mask(src_keep).expand(-1, -1, t, -1)  # [B, 1, T, S], see encode()
        present: list[KVCache] = []
        for i, layer in enumerate(self.decoder):
            x, kv = layer(x, self_mask, memory_kv[i], src_mask, None if past is None else past[i], cross_weights)
            present.append(kv)
        return self.lm_head(self.decoder_norm(x)), present

    def decode_step_ragged(self, tokens: Tensor, positions: Tensor, memory_kv: list[KVCache], src_keep: Tensor,
                           past: list[KVCache], past_keep: Tensor) -> tuple[Tensor, list[KVCache]]:
        """One step for rows at *different* points of their decoding (continuous batching).

        tokens, positions: [B] — each row's newest token and its position; past: per layer K/V [B, H, P, D]
        whose slot j is real where ``past_keep[b, j]`` (shorter histories are padded anywhere, masked out).
        Returns logits [B, V] and the caches with the new token appended at slot P for every row.
        """
        x = self.tgt_embed(tokens[:, None]) * self.embed_scale + self.positions.at(positions[:, None])  # [B, 1, C]
        x = self.embed_dropout(x)
        keep = torch.cat([past_keep, torch.ones_like(past_keep[:, :1])], dim=1)  # [B, P + 1]: the new slot is real
        self_mask, src_mask = padding_mask(keep), padding_mask(src_keep)  # [B, 1, 1, P + 1], [B, 1, 1, S]
        present: list[KVCache] = []
        for i, layer in enumerate(self.decoder):
            x, kv = layer(x, self_mask, memory_kv[i], src_mask, past[i])
            present.append(kv)
        return self.lm_head(self.decoder_norm(x))[:, -1], present

    def cross_attention(self, tgt: Tensor, memory_kv: list[KVCache], src_keep: Tensor, layer: int) -> Tensor:
        """Teacher forcing through decoder layers ``0 … layer`` only: that layer's cross-attention weights
        ``[B, H, T, S]`` — what word alignment reads, without the layers above it or the output projection."""
        x = self.embed_dropout(self.positions(self.tgt_embed(tgt) * self.embed_scale))
        t = tgt.shape[1]
        self_mask = None if t == 1 else causal_mask(t, t, tgt.device)
        src_mask = padding_mask(src_keep).expand(-1, -1, t, -1)
        weights: list[Tensor] = []
        for i in range(layer + 1):
            x, _ = self.decoder[i](x, self_mask, memory_kv[i], src_mask, None, weights)
        return weights[-1]

    def forward(self, src: Tensor, src_keep: Tensor, tgt: Tensor) -> Tensor:
        """Teacher forcing: logits [B, T, V] for every target position."""
        memory = self.encode(src, src_keep)
        return self.decode(tgt, self.memory_kv(memory), src_keep)[0]

    @torch.no_grad()
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
