"""Per-sentence scores and word alignments: the scoring graph against PyTorch eager and the attention formula,
the word grouping on its own, and the fields through the server. The ranking test on a trained model is in
test_document_translation.py (the zoo)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import entry_model, running_server
from transerve.export import graphs
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.server.engine.scoring import ScoredSentence, SentenceScorer, _token_words
from transerve.server.engine.seq2seq import DecoderLayout
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

LOG_PROB_TOLERANCE = 1e-4  # float32 graphs against eager: the same arithmetic in another order


def tiny_model(layers: int = 2) -> Seq2SeqTransformer:
    torch.manual_seed(3)
    return Seq2SeqTransformer(TransformerConfig(vocab_size=40, d_model=32, num_heads=4, num_encoder_layers=2,
                                                num_decoder_layers=layers, ffn_dim=64, max_len=32)).eval()


def test_cross_attention_weights_are_the_formulas() -> None:
    """The weights ``forward_with_weights`` returns rebuild the fused kernel's output, sum to 1 over the source
    and put nothing on padding."""
    model = tiny_model()
    layer = model.decoder[0].cross_attn
    memory, x = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    kv = layer.memory_kv(memory)
    with torch.no_grad():
        fused = layer(x, kv, keep[:, None, None, :])
        out, weights = layer.forward_with_weights(x, kv, keep[:, None, None, :])
    torch.testing.assert_close(out, fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 3))
    assert float(weights[1, :, :, 3:].abs().max()) == 0.0


def test_score_graph_matches_eager_teacher_forcing() -> None:
    """``decoder_score`` in ONNX Runtime: each target token's log-probability as the model's own forward gives it
    (to 1e-4), and attention rows that are distributions over the real source tokens."""
    model = tiny_model()
    encoder = ort.InferenceSession(graphs.export_encoder(model).SerializeToString())
    score = ort.InferenceSession(graphs.export_score(model).SerializeToString())
    src = np.array([[5, 6, 7, 2], [8, 9, 2, 0]])
    mask = (src != 0).astype(np.int64)
    cross = encoder.run(None, {"input_ids": src, "attention_mask": mask})
    inputs, targets = np.array([[1, 10, 11, 12, 13], [1, 14, 15, 0, 0]]), np.array([[10, 11, 12, 13, 2],
                                                                                    [14, 15, 2, 0, 0]])
    log_probs, attention = score.run(None, {"input_ids": inputs, "target_ids": targets, "attention_mask": mask,
                                            **dict(zip(graphs.kv_names("cross", 2), cross, strict=True))})
    with torch.no_grad():
        logits = model(torch.tensor(src), torch.tensor(mask).bool(), torch.tensor(inputs))
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(targets)[..., None])[..., 0].numpy()
    np.testing.assert_allclose(log_probs, expected, atol=LOG_PROB_TOLERANCE)
    assert attention.shape == (2, 2, 5, 4)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    assert float(np.abs(attention[1, :, :, 3]).max()) == 0.0


def test_token_words_group_tokens_into_words() -> None:
    text = "drei hundert, zwölf"
    offsets = [(0, 4), (4, 5), (5, 12), (12, 13), (13, 15), (15, 19), (19, 19)]
    assert _token_words(text, offsets) == [(0, 4), None, (5, 12), (12, 13), (14, 19), (14, 19), None]


def test_scorer_on_the_exported_entry(small_repo: Path) -> None:
    """The served scorer (ORT graphs of the repository entry) against the entry's PyTorch checkpoint, and an
    alignment that follows attention: every target word points into the sentence."""
    model, tokenizer = entry_model(small_repo, "tiny-mt")
    vdir = small_repo / "tiny-mt" / "1"
    cfg = model.config
    layout = DecoderLayout(cfg.num_decoder_layers, cfg.num_heads, cfg.d_model // cfg.num_heads, cfg.bos_id,
                           cfg.eos_id, cfg.pad_id)

    class Runner:
        def __init__(self, path: Path) -> None:
            self.session = ort.InferenceSession(str(path))

        def run(self, names: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return list(self.session.run(None, feeds))

    scorer = SentenceScorer(Runner(vdir / "encoder.onnx"), Runner(vdir / "decoder_score.onnx"), layout, tokenizer,
                            alignment_layer=0)
    source = [*tokenizer.encode("three hundred and seven").ids, cfg.eos_id]
    output = [7, 9, 11]
    log_probs, _ = scorer.teacher_forced([source], [output])
    with torch.no_grad():
        logits = model(torch.tensor([source]), torch.ones(1, len(source), dtype=torch.bool),
                       torch.tensor([[cfg.bos_id, *output]]))
    expected = logits.log_softmax(-1)[0, torch.arange(4), torch.tensor([*output, cfg.eos_id])].numpy()
    np.testing.assert_allclose(log_probs[0], expected, atol=LOG_PROB_TOLERANCE)


@pytest.fixture(scope="module")
def stub(small_repo: Path) -> Iterator[tpb_grpc.TranslatorStub]:
    with running_server(small_repo) as server, grpc.insecure_channel(server.address) as channel:
        yield tpb_grpc.TranslatorStub(channel)


def test_sentences_come_back_with_spans_scores_and_alignments(stub: tpb_grpc.TranslatorStub) -> None:
    text = "three hundred. seven!\n\nNineteen"
    options = tpb.TranslateOptions(scores=True, alignments=True, max_new_tokens=6)
    [result] = stub.Translate(tpb.TranslateRequest(model="tiny-mt", texts=[text], options=options),
                              timeout=60).translations
    assert [text[s.source_start:s.source_end] for s in result.sentences] == ["three hundred.", "seven!", "Nineteen"]
    for sentence in result.sentences:
        assert sentence.mean_log_prob < 0 and 0 < sentence.min_token_prob <= 1
        assert np.exp(sentence.mean_log_prob) >= sentence.min_token_prob
        assert sentence.target_start <= sentence.target_end <= len(result.text)
        for a in sentence.alignments:
            assert sentence.source_start <= a.source_start < a.source_end <= sentence.source_end
            assert sentence.target_start <= a.target_start < a.target_end <= sentence.target_end
    plain = stub.Translate(tpb.TranslateRequest(model="tiny-mt", texts=[text],
                                                options=tpb.TranslateOptions(max_new_tokens=6)), timeout=60)
    assert plain.translations[0].text == result.text and not plain.translations[0].sentences


def test_scores_of_a_whole_text(stub: tpb_grpc.TranslatorStub) -> None:
    options = tpb.TranslateOptions(scores=True, segmentation=tpb.SEGMENTATION_WHOLE, max_new_tokens=4)
    [result] = stub.Translate(tpb.TranslateRequest(model="tiny-mt", texts=["one. two."], options=options),
                              timeout=60).translations
    [sentence] = result.sentences
    assert (sentence.source_start, sentence.source_end) == (0, 9)
    assert (sentence.target_start, sentence.target_end) == (0, len(result.text))
    assert not sentence.alignments  # not asked for


def test_the_alignment_graph_is_the_score_graphs_layer() -> None:
    """``decoder_align`` (the layers up to the alignment layer, no output projection) gives that layer's
    attention as ``decoder_score`` does, to float32 rounding."""
    model = tiny_model(layers=3)
    encoder = ort.InferenceSession(graphs.export_encoder(model).SerializeToString())
    score = ort.InferenceSession(graphs.export_score(model).SerializeToString())
    align = ort.InferenceSession(graphs.export_align(model, 1).SerializeToString())
    src = np.array([[5, 6, 7, 2], [8, 9, 2, 0]])
    mask = (src != 0).astype(np.int64)
    cross = encoder.run(None, {"input_ids": src, "attention_mask": mask})
    inputs = np.array([[1, 10, 11, 12], [1, 13, 14, 0]])
    names = graphs.kv_names("cross", 3)
    _, attention = score.run(None, {"input_ids": inputs, "target_ids": inputs, "attention_mask": mask,
                                    **dict(zip(names, cross, strict=True))})
    [aligned] = align.run(None, {"input_ids": inputs, "attention_mask": mask,
                                 **dict(zip(names[:4], cross[:4], strict=True))})
    np.testing.assert_allclose(aligned, attention[:, 1], atol=1e-6)
    assert [i.name for i in align.get_inputs()][-1] == "cross_v_1"  # only the layers it needs


def test_alignments_without_scores_take_the_alignment_graph(small_repo: Path) -> None:
    model, tokenizer = entry_model(small_repo, "tiny-mt")
    vdir, cfg = small_repo / "tiny-mt" / "1", model.config
    encoder, score, align = (ort.InferenceSession(str(vdir / f)) for f in ("encoder.onnx", "decoder_score.onnx",
                                                                          "decoder_align.onnx"))
    layout = DecoderLayout(cfg.num_decoder_layers, cfg.num_heads, cfg.d_model // cfg.num_heads, cfg.bos_id,
                           cfg.eos_id, cfg.pad_id)
    full = SentenceScorer(encoder, score, layout, tokenizer, alignment_layer=0)
    fast = SentenceScorer(encoder, score, layout, tokenizer, alignment_layer=0, align_graph=align)
    assert fast.align_graph is not None and full.align_graph is None
    text = "three hundred and seven"
    sentence = ScoredSentence([*tokenizer.encode(text).ids, cfg.eos_id], text, [7, 9, 11],
                              tokenizer.decode([7, 9, 11]))
    [with_scores] = full.score([sentence], align=True)
    [alone] = fast.score([sentence], align=True, scores=False)
    assert alone.alignments == with_scores.alignments and alone.mean_log_prob == 0.0
