"""Attention against the formula, written independently with numpy (tolerance 1e-5 in fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transerve.models.attention import (
    CrossAttention,
    SelfAttention,
    causal_mask,
    explicit_attention,
    padding_mask,
    sdpa_attention,
)

TOL = 1e-5


def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """softmax(q kᵀ / √d) v, one (batch, head) at a time, with an explicit loop over queries."""
    out = np.zeros_like(q)
    d = q.shape[-1]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                scores = k[b, h] @ q[b, h, i] / np.sqrt(d)
                if allowed is not None:
                    scores = np.where(np.broadcast_to(allowed, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
                                      [b, h, i], scores, -np.inf)
                w = np.exp(scores - scores.max())
                out[b, h, i] = (w / w.sum()) @ v[b, h]
    return out


@pytest.fixture
def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g),
            torch.randn(2, 3, 7, 8, generator=g))


@pytest.mark.parametrize("fn", [explicit_attention, sdpa_attention])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_equals_formula(fn, masked, qkv) -> None:
    q, k, v = qkv
    mask = padding_mask(torch.tensor([[True] * 7, [True] * 4 + [False] * 3])) if masked else None
    expected = numpy_attention(q.numpy(), k.numpy(), v.numpy(), None if mask is None else mask.numpy())
    np.testing.assert_allclose(fn(q, k, v, mask).numpy(), expected, atol=TOL, rtol=TOL)


def test_padded_keys_get_no_weight(qkv) -> None:
    q, k, v = qkv
    keep = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out = explicit_attention(q, k, v, padding_mask(keep))
    v2 = v.clone()
    v2[1, :, 4:] = 1e3  # garbage where the mask says "padding"
    k2 = k.clone()
    k2[1, :, 4:] = -1e3
    torch.testing.assert_close(explicit_attention(q, k2, v2, padding_mask(keep)), out, atol=TOL, rtol=TOL)


def test_causal_mask_shape_and_offset() -> None:
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # two new queries after three cached keys: the first new one sees 4 keys, the second 5
    assert causal_mask(2, 5).tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_causal_self_attention_ignores_the_future() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(16, 4).eval()
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 16)  # change only the last two positions
    mask = causal_mask(6)
    out_x, _ = attn(x, mask)
    out_y, _ = attn(y, mask)
    torch.testing.assert_close(out_x[:, :4], out_y[:, :4], atol=TOL, rtol=TOL)
    assert not torch.allclose(out_x[:, 4:], out_y[:, 4:])


@pytest.mark.parametrize("module_cls", [SelfAttention, CrossAttention])
def test_sdpa_and_explicit_paths_agree(module_cls) -> None:
    torch.manual_seed(0)
    fast, ref = module_cls(32, 4, "sdpa").eval(), module_cls(32, 4, "explicit").eval()
    ref.load_state_dict(fast.state_dict())
    x, mem = torch.randn(3, 5, 32), torch.randn(3, 7, 32)
    keep = padding_mask(torch.arange(7)[None, :] < torch.tensor([[7], [3], [5]]))
    if module_cls is SelfAttention:
        got, want = fast(x, causal_mask(5))[0], ref(x, causal_mask(5))[0]
    else:
        got, want = fast(x, fast.memory_kv(mem), keep), ref(x, ref.memory_kv(mem), keep)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_multi_head_attention_equals_per_head_formula() -> None:
    """The module = per-head formula on the sliced projections, concatenated, projected."""
    torch.manual_seed(0)
    attn = SelfAttention(12, 3).eval()
    x = torch.randn(2, 4, 12)
    q, k, v = (x @ w.T + b for w, b in zip(attn.qkv.weight.chunk(3), attn.qkv.bias.chunk(3), strict=True))
    heads = []
    for h in range(3):
        sl = slice(4 * h, 4 * (h + 1))
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)  # √D = √4
        heads.append(w @ v[..., sl])
    expected = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x)[0], expected, atol=TOL, rtol=TOL)


def test_kv_cache_grows_by_new_tokens() -> None:
    attn = SelfAttention(8, 2).eval()
    _, (k, v) = attn(torch.randn(1, 3, 8))
    _, (k2, v2) = attn(torch.randn(1, 1, 8), past=(k, v))
    assert k2.shape == (1, 2, 4, 4) and v2.shape == (1, 2, 4, 4)
    torch.testing.assert_close(k2[:, :, :3], k)


def test_bad_head_count_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        SelfAttention(10, 3)
