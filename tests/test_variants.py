"""Reduced-precision variants and their accuracy gate, against independent references.

* teacher-forced logits of the fp32 graphs equal PyTorch eager's teacher-forced decode (1e-4, the fp32
  parity bound), so the gate's yardstick is itself checked;
* OpenVINO in f32 runs our export like ONNX Runtime (1e-4); in bf16 within the gate's bound;
* the gate fails a variant whose logits are off, naming the bound;
* the int8 decoder keeps no fp32 MatMul with a weight over 1 M elements (the tied output projection of a
  realistic vocabulary is quantized).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_export import small_translator, small_vit, tokenizer  # noqa: F401  (fixture)
from transerve.export import accuracy_gate, graphs
from transerve.export.exporter import ExportOptions, export_translator_entry, export_vit_entry, ort_seq2seq
from transerve.export.passes import optimize
from transerve.export.precision import quantize_int8
from transerve.export.variants import INT8_FORMS, bf16_skip_reason, pick_form, teacher_forced_logits
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.server.backends.openvino_runner import OpenVinoRunner, openvino_available
from transerve.server.backends.sessions import make_session
from transerve.server.engine.seq2seq import pad_ids

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed (openvino extra)")


def test_teacher_forced_logits_match_pytorch(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    model = small_translator(tokenizer.get_vocab_size())
    export_translator_entry(model, tokenizer, ExportOptions(tmp_path, "t"), max_new_tokens=8)
    vdir = tmp_path / "t" / "1"
    seq2seq = ort_seq2seq(model, make_session(vdir / "encoder.onnx"), make_session(vdir / "decoder_step_ragged.onnx"))
    ids, mask = pad_ids([[5, 9, 2], [7, 8, 11, 12, 13, 2]], model.config.pad_id)
    targets = [[6, 7, 8, 9], [10]]
    logits, valid = teacher_forced_logits(seq2seq, ids, mask, targets)
    assert logits.shape[:2] == (2, 5) and valid.sum(1).tolist() == [5, 2]
    with torch.no_grad():  # PyTorch: the whole forced sequence in one causal pass
        keep = torch.from_numpy(mask).bool()
        memory = model.memory_kv(model.encode(torch.from_numpy(ids), keep))
        forced = torch.tensor([[model.config.bos_id, 6, 7, 8, 9], [model.config.bos_id, 10, 0, 0, 0]])
        expected, _ = model.decode(forced, memory, keep)
    np.testing.assert_allclose(logits[valid], expected.numpy()[valid], atol=1e-4)


def test_gate_fails_a_variant_that_is_off() -> None:
    reference = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
    close = accuracy_gate.verdict(accuracy_gate.logit_checks(reference + 0.005, reference))
    assert close["passed"] and "why" not in close
    off = accuracy_gate.verdict({**accuracy_gate.logit_checks(reference + 0.02, reference),
                                 "accuracy": 0.90, "accuracy_fp32": 0.97, "token_agreement": 0.5})
    assert not off["passed"]
    assert "logit MAE 0.02 > 0.01" in off["why"] and "accuracy 0.9000 < fp32" in off["why"]
    assert "token agreement 0.500 < 0.95" in off["why"]
    big = reference * 50  # a trained model's logits: the bound scales with their size
    assert accuracy_gate.logit_checks(big + 0.2, big)["logit_mae_bound"] > 0.2


def test_vit_variants_are_gated_and_timed(tmp_path: Path) -> None:
    labels = np.arange(16) % 10
    images = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    report = export_vit_entry(small_vit(), ExportOptions(tmp_path, "v", int8=True), labels=[str(i) for i in range(10)],
                              preprocessing={"size": 8}, eval_images=images, eval_labels=labels)
    int8 = report["variants"]["int8"]
    assert int8["runtime"] == "onnxruntime" and int8["files"] == {"model": "model.int8.onnx"}
    assert int8["gate"]["logit_mae"] >= 0 and "accuracy_fp32" in int8["gate"] and int8["speed_vs_fp32"] > 0
    assert set(int8["forms"]) == set(INT8_FORMS) and int8["form"] == pick_form_from_summary(int8["forms"])
    assert int8["speed_vs_fp32"] == int8["forms"][int8["form"]]["speed_vs_fp32"]
    scales = [t for t in onnx.load(str(tmp_path / "v" / "1" / "model.int8.onnx")).graph.initializer
              if t.name.endswith("_scale")]  # the quantizer's weight scales: [columns] per channel, [] per tensor
    assert scales and {len(t.dims) == 1 for t in scales} == {int8["form"] == "per-channel"}  # the kept form's file
    if bf16_skip_reason() is None:
        bf16 = report["variants"]["bf16"]
        assert bf16["runtime"] == "openvino" and bf16["files"] == {"model": "model.onnx"}
        assert bf16["gate"]["passed"], bf16["gate"]
    else:
        assert "bf16" not in report["variants"] and report["bf16_skipped"] == bf16_skip_reason()


def pick_form_from_summary(forms: dict[str, dict[str, object]]) -> str:
    return pick_form({f: {"runs_on_cpu": True, "gate": {"passed": m["passed"]}, "speed_vs_fp32": m["speed_vs_fp32"]}
                      for f, m in forms.items()})


def test_the_kept_int8_form_is_the_fastest_that_passed() -> None:
    def measured(speed: float, passed: bool) -> dict[str, object]:
        return {"runs_on_cpu": True, "gate": {"passed": passed}, "speed_vs_fp32": speed}

    assert pick_form({"per-channel": measured(1.5, True), "per-tensor": measured(1.6, True)}) == "per-tensor"
    assert pick_form({"per-channel": measured(1.5, True), "per-tensor": measured(1.9, False)}) == "per-channel"
    assert pick_form({"per-channel": measured(1.5, False), "per-tensor": measured(1.9, False)}) == "per-channel"
    assert pick_form({"per-channel": {"runs_on_cpu": False, "error": "x"}, "per-tensor": measured(0.9, True)}) \
        == "per-tensor"


@needs_openvino
def test_openvino_runs_our_export_like_onnxruntime(tmp_path: Path) -> None:
    export_vit_entry(small_vit(), ExportOptions(tmp_path, "v"), labels=[str(i) for i in range(10)],
                     preprocessing={"size": 8})
    path = tmp_path / "v" / "1" / "model.onnx"
    images = np.random.default_rng(2).standard_normal((5, 3, 8, 8)).astype(np.float32)
    expected = make_session(path).run(None, {"images": images})[0]
    runner = OpenVinoRunner(path, 2, "f32")
    assert runner.input_names == ["images"] and runner.output_names == ["logits"]
    np.testing.assert_allclose(runner.run(None, {"images": images})[0], expected, atol=1e-4)
    if bf16_skip_reason() is None:
        bf16 = OpenVinoRunner(path, 2, "bf16").run(["logits"], {"images": images})[0]
        checks = accuracy_gate.logit_checks(bf16, expected)
        assert checks["logit_mae"] <= checks["logit_mae_bound"], checks


def weight_behind(model: onnx.ModelProto, name: str) -> str:
    """The initializer a MatMul input comes from through Transpose/Reshape/Identity (else ``name`` itself)."""
    producers = {out: n for n in model.graph.node for out in n.output}
    while name in producers and producers[name].op_type in ("Transpose", "Reshape", "Identity"):
        name = producers[name].input[0]
    return name


def test_int8_decoder_has_no_large_fp32_matmul() -> None:
    """A vocabulary of 33 000 at width 128: the tied output projection alone is 4.2 M weights, behind a
    Transpose of the embedding, past the size up to which constant folding would pre-transpose it."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(TransformerConfig(vocab_size=33000, d_model=128, num_heads=2, num_encoder_layers=1,
                                                 num_decoder_layers=1, ffn_dim=128, dropout=0.0, max_len=32)).eval()
    step = graphs.export_ragged_step(model)
    optimize(step, "onnxruntime", 2)
    quantized = quantize_int8(step)
    weights = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    fp32_matmuls = [(n.name, weights[w].size) for n in quantized.graph.node if n.op_type in ("MatMul", "Gemm")
                    for w in (weight_behind(quantized, i) for i in n.input)
                    if w in weights and weights[w].dtype == np.float32]
    assert not [m for m in fp32_matmuls if m[1] > 1_000_000], fp32_matmuls
    assert any(n.op_type == "MatMulInteger" for n in quantized.graph.node)
    onnx.checker.check_model(quantized)
