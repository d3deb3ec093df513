"""Scaled dot-product attention and the multi-head modules built on it.

Attention compares every query with every key by a dot product, turns the
scores into weights that sum to 1 with a softmax, and returns the weighted sum
of the values: ``softmax(q @ kᵀ / √D) @ v``. It is one chain of matrix
products, so all positions are computed in parallel.

Two implementations sit side by side and are chosen once, in ``__init__``:

* ``"sdpa"`` calls ``F.scaled_dot_product_attention``. The ONNX exporter turns
  it into one ``Attention`` node (opset 23) or the MatMul→Softmax→MatMul form
  with pre-scaled Q and K that TensorRT fuses (opset ≤ 20), so the models call
  it on the fast path.
* ``"explicit"`` writes the formula out; it is the reference that tests hold
  the fast path to.

Masks are boolean and say *where attention is allowed* (``True`` = attend),
broadcastable to ``[B, H, T, S]``.

Dimension letters: ``B`` batch, ``T`` query length, ``S`` key length,
``H`` heads, ``D`` head dim, ``C`` model width.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionImpl = Literal["sdpa", "explicit"]

KVCache = tuple[Tensor, Tensor]
"""Keys and values of one attention layer, each ``[B, H, S, D]``."""


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """The reference formula ``softmax(q @ kᵀ / √D) @ v`` with a boolean mask.

    q: [B, H, T, D], k and v: [B, H, S, D], mask: broadcastable to [B, H, T, S].
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v  # [B, H, T, D]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """The fused kernel; same contract as :func:`explicit_attention`."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


_ATTENTION_FUNCTIONS = {"sdpa": sdpa_attention, "explicit": explicit_attention}


def attention_function(impl: AttentionImpl):  # type: ignore[no-untyped-def]
    """Resolve an implementation name; unknown names are a config error."""
    try:
        return _ATTENTION_FUNCTIONS[impl]
    except KeyError:
        raise ValueError(f"attention impl must be one of {sorted(_ATTENTION_FUNCTIONS)}, got {impl!r}") from None


def causal_mask(t: int, s: int | None = None, device: torch.device | None = None) -> Tensor:
    """``[T, S]`` mask letting query ``i`` see keys ``0 … i + (S - T)``.

    With a KV cache the queries are the *last* T of S positions, hence the offset.
    """
    s = t if s is None else s
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def padding_mask(keep: Tensor) -> Tensor:
    """Turn a ``[B, S]`` keep-mask (True = real token) into ``[B, 1, 1, S]``."""
    return keep[:, None, None, :]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, T, C] → [B, H, T, D]."""
    b, t, c = x.shape
    return x.view(b, t, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, T, D] → [B, T, C]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and an optional KV cache.

    Several heads attend side by side, each over its own ``D = C / H`` slice of
    the projected queries, keys and values; the heads are concatenated and mixed
    by the output projection.
    """

    def __init__(self, dim: int, num_heads: int, impl: AttentionImpl = "sdpa", dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attend = attention_function(impl)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, past: KVCache | None = None
    ) -> tuple[Tensor, KVCache]:
        """x: [B, T, C]; past: cached K/V of earlier positions. Returns output and present K/V."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 × [B, T, C]
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))  # [B, H, T, D]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # [B, H, S, D], S = past + T
            v = torch.cat([past[1], v], dim=2)
        out = merge_heads(self.attend(q, k, v, mask))  # [B, T, C]
        return self.dropout(self.proj(out)), (k, v)

    def forward_first(self, first: Tensor, x: Tensor) -> Tensor:
        """The output at position 0 only, ``[B, 1, C]`` (``first`` is ``x[:, :1]``), attending over every
        position of ``x``: what a classifier head that reads the first token needs from the last block (no
        queries, output projection or softmax rows for the other positions). ``first`` comes in separately so
        that whatever produced it (a norm) feeds projections only — the form BatchNorm folding needs."""
        dim = x.shape[-1]
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(first, weight[:dim], None if bias is None else bias[:dim])  # [B, 1, C]
        k, v = F.linear(x, weight[dim:], None if bias is None else bias[dim:]).chunk(2, dim=-1)  # 2 × [B, T, C]
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))
        return self.dropout(self.proj(merge_heads(self.attend(q, k, v, None))))


class CrossAttention(nn.Module):
    """Multi-head attention of decoder queries over encoder memory.

    The memory's keys and values do not change while decoding, so
    :meth:`memory_kv` computes them once per source and every step reuses them.
    """

    def __init__(self, dim: int, num_heads: int, impl: AttentionImpl = "sdpa", dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attend = attention_function(impl)
        self.dropout = nn.Dropout(dropout)

    def memory_kv(self, memory: Tensor) -> KVCache:
        """memory: [B, S, C] → K, V each [B, H, S, D]."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return split_heads(k, self.num_heads), split_heads(v, self.num_heads)

    def forward(self, x: Tensor, memory_kv: KVCache, mask: Tensor | None = None) -> Tensor:
        """x: [B, T, C]; mask: [B, 1, 1, S] source padding. Returns [B, T, C]."""
        q = split_heads(self.q(x), self.num_heads)  # [B, H, T, D]
        out = merge_heads(self.attend(q, memory_kv[0], memory_kv[1], mask))
        return self.dropout(self.proj(out))

    def forward_with_weights(self, x: Tensor, memory_kv: KVCache, mask: Tensor | None = None
                             ) -> tuple[Tensor, Tensor]:
        """As :meth:`forward`, and the attention weights ``[B, H, T, S]`` (the formula written out, since the
        fused kernel does not return them): where each target position looked in the source, which is what
        word alignment reads."""
        q = split_heads(self.q(x), self.num_heads)
        scores = q @ memory_kv[0].transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        return self.dropout(self.proj(merge_heads(weights @ memory_kv[1]))), weights
