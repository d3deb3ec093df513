"""The ragged decoder step continuous batching needs: rows at different lengths in one call.

Reference: each sequence decoded alone with the ordinary KV-cached ``decode`` (tolerance 1e-5).
"""

from __future__ import annotations

import torch
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.models.translator import pad_batch

TOL = 1e-5


def model() -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return Seq2SeqTransformer(TransformerConfig(vocab_size=40, d_model=32, num_heads=4, num_encoder_layers=2,
                                                num_decoder_layers=2, ffn_dim=64, dropout=0.0)).eval()


@torch.no_grad()
def test_ragged_step_equals_each_sequence_alone() -> None:
    m = model()
    g = torch.Generator().manual_seed(1)
    sources = [[*torch.randint(4, 40, (n,), generator=g).tolist(), 2] for n in (3, 7, 5)]
    histories = [torch.randint(4, 40, (n,), generator=g).tolist() for n in (2, 6, 4)]  # tokens already decoded
    nxt = torch.randint(4, 40, (3,), generator=g)
    src, keep = pad_batch(sources, 0)
    memory_kv = m.memory_kv(m.encode(src, keep))
    expected, caches = [], []
    for b in range(3):  # alone: prefill the history, then one more step
        mkv = [(k[b:b + 1], v[b:b + 1]) for k, v in memory_kv]
        _, past = m.decode(torch.tensor([histories[b]]), mkv, keep[b:b + 1])
        logits, _ = m.decode(nxt[b].view(1, 1), mkv, keep[b:b + 1], past)
        expected.append(logits[0, -1])
        caches.append(past)
    p = max(len(h) for h in histories)
    past_keep = torch.zeros(3, p, dtype=torch.bool)
    ragged = []
    for layer in range(2):  # right-pad every row's cache to P slots
        ks, vs = [], []
        for b, cache in enumerate(caches):
            k, v = cache[layer]
            pad = p - k.shape[2]
            ks.append(torch.nn.functional.pad(k, (0, 0, 0, pad)))
            vs.append(torch.nn.functional.pad(v, (0, 0, 0, pad)))
            past_keep[b, : k.shape[2]] = True
        ragged.append((torch.cat(ks), torch.cat(vs)))
    positions = torch.tensor([len(h) for h in histories])
    logits, present = m.decode_step_ragged(nxt, positions, memory_kv, keep, ragged, past_keep)
    torch.testing.assert_close(logits, torch.stack(expected), atol=TOL, rtol=TOL)
    assert present[0][0].shape[2] == p + 1


@torch.no_grad()
def test_exported_ragged_step_matches_pytorch() -> None:
    import numpy as np
    from transerve.export.graphs import export_ragged_step, kv_names
    from transerve.export.passes import count_attention, optimize
    from transerve.server.backends.sessions import make_session

    m = model()
    proto = export_ragged_step(m)
    optimize(proto, "onnxruntime", expected_attention=4)  # 2 self + 2 cross, all fused
    assert count_attention(proto) == 4
    g = torch.Generator().manual_seed(3)
    b, s, p = 3, 6, 4
    ids, positions = torch.randint(4, 40, (b,), generator=g), torch.tensor([4, 1, 2])
    attention_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0]])
    past_mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    past = [torch.randn(b, 4, p, 8, generator=g) for _ in range(4)]
    cross = [torch.randn(b, 4, s, 8, generator=g) for _ in range(4)]
    feeds = {"input_ids": ids.numpy(), "positions": positions.numpy(), "attention_mask": attention_mask.numpy(),
             "past_mask": past_mask.numpy()}
    feeds.update({n: t.numpy() for n, t in zip(kv_names("past", 2), past, strict=True)})
    feeds.update({n: t.numpy() for n, t in zip(kv_names("cross", 2), cross, strict=True)})
    got = make_session(proto.SerializeToString()).run(None, feeds)
    pairs = [(past[2 * i], past[2 * i + 1]) for i in range(2)]
    cross_pairs = [(cross[2 * i], cross[2 * i + 1]) for i in range(2)]
    logits, present = m.decode_step_ragged(ids, positions, cross_pairs, attention_mask.bool(), pairs,
                                           past_mask.bool())
    np.testing.assert_allclose(got[0], logits.numpy(), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got[1], present[0][0].numpy(), atol=TOL, rtol=TOL)
