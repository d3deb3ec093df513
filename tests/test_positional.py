"""Sinusoidal positions against their formula and the properties the notes promise."""

from __future__ import annotations

import math

import pytest
import torch
from transerve.models.positional import SinusoidalPositions, sinusoidal_table


def test_table_matches_formula() -> None:
    table = sinusoidal_table(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_each_frequency_pair_lies_on_the_unit_circle() -> None:
    table = sinusoidal_table(100, 32)
    radius = table[:, 0::2] ** 2 + table[:, 1::2] ** 2
    torch.testing.assert_close(radius, torch.ones_like(radius))


def test_positions_are_distinct() -> None:
    table = sinusoidal_table(256, 32)
    distances = torch.cdist(table, table) + torch.eye(256) * 1e9
    assert distances.min() > 1e-2


def test_dot_product_depends_only_on_offset() -> None:
    table = sinusoidal_table(200, 64).double()  # float32 table: errors ~1e-6 per term
    for k in (1, 5, 20):
        dots = (table[:-k] * table[k:]).sum(-1)
        assert dots.max() - dots.min() < 1e-4


def test_offset_continues_the_sequence() -> None:
    pe = SinusoidalPositions(8, 32)
    x = torch.zeros(1, 10, 8)
    full = pe(x)
    torch.testing.assert_close(pe(x[:, 6:7], offset=6), full[:, 6:7])


def test_odd_dim_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        sinusoidal_table(10, 7)
