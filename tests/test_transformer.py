"""Translator: masks, KV cache vs recomputation, greedy vs beam search."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from transerve.models.decoding import beam_search, greedy_search, translate_ids
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.models.translator import pad_batch

TOL = 1e-5


def random_model(pre_norm: bool = True, norm: str = "layer", seed: int = 0, tie: bool = True) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=50, d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                            ffn_dim=64, dropout=0.0, pre_norm=pre_norm, norm=norm, tie_embeddings=tie)
    model = Seq2SeqTransformer(cfg).eval()
    last_norm = model.decoder_norm if pre_norm else model.decoder[-1].norm_out3
    with torch.no_grad():  # sharper logits than the init's, so decoding varies with the source
        for p in last_norm.parameters():
            p.mul_(4.0)
        for layer in model.decoder:  # let computed features, not the input token's embedding, drive the output
            layer.ffn.net[3].weight.mul_(8.0)
    return model


def ragged_sources(lengths: list[int], seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = [[*torch.randint(4, 50, (n,), generator=g).tolist(), 2] for n in lengths]
    return pad_batch(rows, 0)


@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_kv_cache_gives_exactly_the_recomputed_tokens(pre_norm: bool, tie: bool) -> None:
    model = random_model(pre_norm, tie=tie)
    src, keep = ragged_sources([3, 9, 6, 1])
    cached = translate_ids(model, src, keep, max_new_tokens=12, use_cache=True)
    full = translate_ids(model, src, keep, max_new_tokens=12, use_cache=False)
    assert cached == full
    assert len({tuple(t) for t in cached}) > 1  # the sources really decode differently


def test_kv_cache_logits_match_recomputation() -> None:
    model = random_model()
    src, keep = ragged_sources([4, 7])
    mkv = model.memory_kv(model.encode(src, keep))
    tgt = torch.randint(4, 50, (2, 6))
    full_logits, _ = model.decode(tgt, mkv, keep)
    past = None
    for t in range(6):
        step_logits, past = model.decode(tgt[:, t:t + 1], mkv, keep, past)
        torch.testing.assert_close(step_logits[:, 0], full_logits[:, t], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_padding_does_not_change_a_source(norm: str) -> None:
    """A short source batched with a long one decodes as it does alone (padding is masked)."""
    model = random_model(norm=norm)
    src, keep = ragged_sources([3, 11])
    alone_src, alone_keep = src[:1, :4], keep[:1, :4]
    mem_batched = model.encode(src, keep)[0, :4]
    mem_alone = model.encode(alone_src, alone_keep)[0]
    torch.testing.assert_close(mem_batched, mem_alone, atol=TOL, rtol=TOL)
    assert translate_ids(model, src, keep, 10)[0] == translate_ids(model, alone_src, alone_keep, 10)[0]


def test_beam_size_one_equals_greedy() -> None:
    model = random_model(seed=3)
    src, keep = ragged_sources([5, 2, 8, 4], seed=4)
    assert translate_ids(model, src, keep, 15, beam_size=1) == translate_ids(model, src, keep, 15)
    # and through the generic search: one beam per source is greedy search
    for lengths in ([5, 2, 8, 4], [1, 6]):
        src, keep = ragged_sources(lengths, seed=5)
        greedy = translate_ids(model, src, keep, 15)
        from transerve.models.decoding import model_step

        mkv = model.memory_kv(model.encode(src, keep))
        beams = beam_search(model_step(model, mkv, keep), None, len(lengths), 1, 1, 2, 15)
        assert [h.tokens[: h.tokens.index(2)] if 2 in h.tokens else h.tokens for h in beams] == greedy


def test_beam_with_and_without_cache_agree() -> None:
    model = random_model(seed=7)
    src, keep = ragged_sources([4, 9, 2], seed=8)
    cached = translate_ids(model, src, keep, 12, beam_size=4)
    full = translate_ids(model, src, keep, 12, beam_size=4, use_cache=False)
    assert cached == full


# A constructed scorer: vocabulary {0 pad, 1 bos, 2 eos, 3 "a", 4 "b"}.
# Greedy takes "a" (p=0.6) but after "a" every continuation is flat (p=0.2 each);
# "b" (p=0.4) is followed by EOS with p=0.99. Best sequence: "b EOS" (0.396) > "a ? …" (≤ 0.12).
def constructed_step(last: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    state = last[:, None] if state is None else torch.cat([state, last[:, None]], dim=1)
    probs = torch.full((len(last), 5), 1e-9)
    for i, prev in enumerate(last.tolist()):
        if prev == 1:
            probs[i, 3], probs[i, 4] = 0.6, 0.4
        elif prev == 4:
            probs[i, 2], probs[i, 3] = 0.99, 0.01
        else:
            probs[i, 2:] = 0.2
            probs[i, 0:2] = 0.2
    return (probs / probs.sum(-1, keepdim=True)).log(), state


def sequence_log_prob(tokens: list[int]) -> float:
    total, state = 0.0, None
    last = torch.tensor([1])
    for tok in tokens:
        log_probs, state = constructed_step(last, state)
        total += float(log_probs[0, tok])
        last = torch.tensor([tok])
    return total


def test_beam_search_beats_greedy_on_constructed_case() -> None:
    greedy = greedy_search(constructed_step, None, 1, bos_id=1, eos_id=2, max_new_tokens=2)[0]
    best = beam_search(constructed_step, None, 1, beam_size=2, bos_id=1, eos_id=2, max_new_tokens=2,
                       length_penalty=0.0)[0]
    assert greedy[0] == 3  # greedy commits to "a"
    assert best.tokens == [4, 2]
    greedy_score = sequence_log_prob(greedy + ([2] if len(greedy) < 2 else []))
    assert best.log_prob == pytest.approx(sequence_log_prob([4, 2]), abs=1e-5)
    assert best.log_prob > greedy_score
    assert math.exp(best.log_prob) == pytest.approx(0.4 * 0.99, rel=1e-3)


def test_length_penalty_prefers_longer_when_positive() -> None:
    """With log-probs normalised by length, a long likely hypothesis can beat a short one."""
    model = random_model(seed=11)
    src, keep = ragged_sources([6, 6], seed=12)
    short = translate_ids(model, src, keep, 20, beam_size=4, length_penalty=0.0)
    long = translate_ids(model, src, keep, 20, beam_size=4, length_penalty=2.0)
    assert all(len(b) >= len(a) for a, b in zip(short, long, strict=True))
