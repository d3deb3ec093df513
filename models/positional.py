"""Sinusoidal positional encoding.

Attention alone is blind to order: permuting the tokens permutes the output.
Adding ``PE[pos, 2i] = sin(pos / 10000^(2i/C))`` and
``PE[pos, 2i+1] = cos(pos / 10000^(2i/C))`` gives each position a distinct
code whose dot products depend only on the offset between positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(max_len: int, dim: int, layout: str = "interleaved") -> Tensor:
    """The ``[max_len, dim]`` table of the formula above (``dim`` even).

    ``layout="split"`` stores the same values as all sines then all cosines
    (``[sin f₀ … sin fₙ, cos f₀ … cos fₙ]``), the order MarianMT checkpoints use.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even dim, got {dim}")
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # [L, 1]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # [C/2]
    table = torch.empty(max_len, dim)
    if layout == "interleaved":
        table[:, 0::2], table[:, 1::2] = torch.sin(pos * inv_freq), torch.cos(pos * inv_freq)
    elif layout == "split":
        table[:, : dim // 2], table[:, dim // 2 :] = torch.sin(pos * inv_freq), torch.cos(pos * inv_freq)
    else:
        raise ValueError(f"position layout must be 'interleaved' or 'split', got {layout!r}")
    return table


class SinusoidalPositions(nn.Module):
    """Adds the sinusoidal code of positions ``offset … offset + T - 1`` to ``[B, T, C]``.

    ``offset`` is the number of tokens already decoded, so a KV-cached decoder
    step gets the same code as full recomputation would give that position.
    """

    table: Tensor

    def __init__(self, dim: int, max_len: int = 512, layout: str = "interleaved") -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_len, dim, layout), persistent=False)

    def at(self, positions: Tensor) -> Tensor:
        """Codes of arbitrary positions: ``[B, T]`` ints → ``[B, T, C]`` (each row its own offset)."""
        return self.table[positions]

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        t = x.shape[1]
        return x + self.table[offset : offset + t]
