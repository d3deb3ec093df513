"""Export a model into a repository entry: graphs → passes → verification → files → report.

Every export is verified before it is trusted: the report is written either
way, and :class:`ExportError` is raised when fp32 parity or token equality
fails, so a broken graph never silently lands in a repository.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tokenizers import Tokenizer
from transerve import __version__
from transerve.export import accuracy_gate, graphs, repository, variants
from transerve.export.passes import PassResult, Target, op_counts, optimize
from transerve.export.verify import FP32_TOLERANCE, verify_translator, verify_vit
from transerve.export.weights_file import save_graphs
from transerve.generation import DecodingDefaults, GenerationRules
from transerve.models.checkpoint import save_checkpoint
from transerve.models.transformer import Seq2SeqTransformer
from transerve.models.vit import ViT
from transerve.server.backends.cpu import cpu_signature
from transerve.server.backends.sessions import make_session
from transerve.server.engine.seq2seq import DecoderLayout, OrtSeq2Seq

VERIFY_MAX_NEW_TOKENS = 64  # verification decodes this much at most, whatever budget the entry serves


class ExportError(RuntimeError):
    """The export ran but its result failed verification (see the report)."""


@dataclass
class ExportOptions:
    repo: Path
    name: str
    version: int = 1
    target: Target = "onnxruntime"
    int8: bool = False
    fp16: bool = False
    default: bool = False
    torch_checkpoint: bool = False  # also write <version>/torch for the `torch` reference backend
    bf16: bool = True  # with int8: measure the OpenVINO bf16 variant too, where this CPU can run it
    source: str = "transerve"
    languages: dict[str, Any] | None = None  # translators: {"source": "en", "target": "de" or [...]} (routing)
    on_status: Callable[[str], None] = field(default=lambda message: None)


def _passes_report(graph: str, results: list[PassResult]) -> list[dict[str, Any]]:
    return [{"graph": graph, "name": r.name, "nodes_changed": r.nodes_changed, "changed": r.changed,
             "warnings": r.warnings} for r in results]


def _optimize(raw: onnx.ModelProto, target: Target, expected_attention: int) -> tuple[onnx.ModelProto,
                                                                                     list[PassResult]]:
    fused = copy.deepcopy(raw)
    results = optimize(fused, target, expected_attention)
    onnx.checker.check_model(fused)
    return fused, results


def _base_report(opts: ExportOptions, kind: str) -> dict[str, Any]:
    return {"model": opts.name, "kind": kind, "source": opts.source, "target": opts.target, "opset": graphs.OPSET,
            "transerve_version": __version__, "passes": [], "op_counts_before": {}, "op_counts_after": {},
            "attention": {}, "parity": {}, "accuracy": {}, "variants": {}}


def _check(report: dict[str, Any], vdir: Path) -> None:
    repository.write_report(vdir, report)
    parity = report["parity"]
    if parity["max_abs_diff"] > FP32_TOLERANCE or parity.get("tokens_equal") is False:
        raise ExportError(f"{report['model']}: parity failed (max_abs_diff {parity['max_abs_diff']:.2e}, "
                          f"tokens_equal {parity.get('tokens_equal')}); see {vdir / repository.REPORT_FILE}")


def export_vit_entry(model: ViT, opts: ExportOptions, *, labels: Sequence[str], preprocessing: dict[str, Any],
                     eval_images: np.ndarray | None = None, eval_labels: np.ndarray | None = None,
                     preprocessing_from: str = "") -> dict[str, Any]:
    """Export a ViT classifier to ``REPO/NAME`` and return its export report; ``preprocessing_from`` says where
    the preprocessing came from (an importer's checkpoint file or recipe), for the report."""
    start = time.perf_counter()
    cfg, report = model.config, _base_report(opts, "vit")
    if preprocessing_from:
        report["preprocessing_from"] = preprocessing_from
    opts.on_status(f"{opts.name}: exporting to ONNX (opset {graphs.OPSET})")
    raw = graphs.export_vit(model.eval())
    opts.on_status(f"{opts.name}: graph passes (target {opts.target})")
    fused, results = _optimize(raw, opts.target, cfg.depth)
    report["passes"] = _passes_report("model", results)
    report["op_counts_before"], report["op_counts_after"] = {"model": op_counts(raw)}, {"model": op_counts(fused)}
    report["attention"] = {"expected": cfg.depth, "fused": results[-2].changed.get("attention_blocks", 0)}
    opts.on_status(f"{opts.name}: verifying against PyTorch")
    report.update(verify_vit(model, make_session(fused.SerializeToString()), eval_images, eval_labels))
    config = repository.vit_config(opts.name, image_size=cfg.image_size, in_chans=cfg.in_chans,
                                   num_classes=cfg.num_classes, preprocessing=preprocessing, default=opts.default)
    vdir = repository.write_entry(opts.repo, opts.name, opts.version, config, {"labels.txt": "\n".join(labels) + "\n"})
    save_graphs(vdir, {"model": fused})
    if opts.torch_checkpoint:
        save_checkpoint(model, vdir / "torch")  # the server's torch (reference) backend
    report["variants"] = _vit_variants(fused, vdir, opts, eval_images, eval_labels, report)
    report["export_seconds"] = round(time.perf_counter() - start, 1)
    _check(report, vdir)
    return report


def _vit_variants(fused: onnx.ModelProto, vdir: Path, opts: ExportOptions, images: np.ndarray | None,
                  labels: np.ndarray | None, report: dict[str, Any]) -> dict[str, Any]:
    probe = images if images is not None else \
        np.random.default_rng(0).standard_normal((8, *_input_shape(fused))).astype(np.float32)
    return variants.vit_variants(fused, vdir, _wanted(opts, report), probe, labels, opts.on_status)


def _wanted(opts: ExportOptions, report: dict[str, Any]) -> list[str]:
    """The variants to build: int8 and fp16 when asked for; bf16 (OpenVINO) alongside int8 where it can be
    measured here — it needs no file of its own, only its gate (the report says why it was skipped)."""
    wanted = [v for v in ("int8", "fp16") if getattr(opts, v)]
    if opts.int8 and not opts.bf16:
        report["bf16_skipped"] = "not asked for (ExportOptions.bf16 = False)"
    elif opts.int8:
        skip = variants.bf16_skip_reason()
        if skip is None:
            wanted.append("bf16")
        else:
            report["bf16_skipped"] = skip
    return wanted


def _input_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    return tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])


def export_translator_entry(model: Seq2SeqTransformer, tokenizer: Tokenizer, opts: ExportOptions, *,
                            eval_pairs: Sequence[tuple[str, str]] | None = None,
                            max_new_tokens: int | None = None, decoding: DecodingDefaults | None = None
                            ) -> dict[str, Any]:
    """Export the translator's encoder and decoder step to ``REPO/NAME`` and return the report.

    One decoder graph, ``decoder_step_ragged``: it serves continuous batching and decodes a uniform batch
    for request-level batching too, so the decoder's weights are stored (and loaded) once."""
    start = time.perf_counter()
    decoding = decoding or DecodingDefaults()
    decoding = replace(decoding, max_new_tokens=max_new_tokens or decoding.max_new_tokens)
    verify_tokens = min(decoding.max_new_tokens, VERIFY_MAX_NEW_TOKENS)
    cfg, report = model.config, _base_report(opts, "transformer")
    opts.on_status(f"{opts.name}: exporting encoder and decoder_step_ragged (opset {graphs.OPSET})")
    raw = {"encoder": graphs.export_encoder(model.eval()), "decoder_step_ragged": graphs.export_ragged_step(model)}
    expected = {"encoder": cfg.num_encoder_layers, "decoder_step_ragged": 2 * cfg.num_decoder_layers}
    fused: dict[str, onnx.ModelProto] = {}
    for graph, proto in raw.items():
        opts.on_status(f"{opts.name}: graph passes on {graph} (target {opts.target})")
        fused[graph], results = _optimize(proto, opts.target, expected[graph])
        report["passes"] += _passes_report(graph, results)
        report["op_counts_before"][graph], report["op_counts_after"][graph] = op_counts(proto), op_counts(fused[graph])
        report["attention"][graph] = {"expected": expected[graph],
                                      "fused": results[-2].changed.get("attention_blocks", 0)}
    opts.on_status(f"{opts.name}: verifying against PyTorch")
    seq2seq = ort_seq2seq(model, make_session(fused["encoder"].SerializeToString()),
                          make_session(fused["decoder_step_ragged"].SerializeToString()), decoding.rules)
    report.update(_verify_translation(model, tokenizer, seq2seq, eval_pairs, verify_tokens))
    config = repository.translator_config(
        opts.name, num_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads, head_dim=cfg.d_model // cfg.num_heads,
        vocab_size=cfg.vocab_size, bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id, max_len=cfg.max_len,
        decoding=decoding, default=opts.default)
    if opts.languages:
        config["languages"] = opts.languages
    vdir = repository.write_entry(opts.repo, opts.name, opts.version, config, {"tokenizer.json": tokenizer.to_str()})
    opts.on_status(f"{opts.name}: exporting decoder_score and decoder_align (scores and word alignment)")
    scoring = {"decoder_score": graphs.export_score(model),
               "decoder_align": graphs.export_align(model, config["scoring"]["alignment_layer"])}
    save_graphs(vdir, {**fused, **scoring})  # one weights.bin: shared tensors are stored once
    if opts.torch_checkpoint:
        save_checkpoint(model, vdir / "torch")  # the server's torch (reference) backend
    report["generation"] = {"beam_size": decoding.beam_size, "max_new_tokens": decoding.max_new_tokens,
                            **decoding.generation_section()}
    report["variants"] = _translator_variants(model, tokenizer, fused, vdir, opts, eval_pairs, verify_tokens,
                                              report, decoding.rules)
    report["export_seconds"] = round(time.perf_counter() - start, 1)
    _check(report, vdir)
    return report


def ort_seq2seq(model: Seq2SeqTransformer, encoder: Any, decoder: Any,
                rules: GenerationRules | None = None) -> OrtSeq2Seq:
    cfg = model.config
    layout = DecoderLayout(cfg.num_decoder_layers, cfg.num_heads, cfg.d_model // cfg.num_heads, cfg.bos_id,
                           cfg.eos_id, cfg.pad_id)
    return OrtSeq2Seq(encoder, decoder, layout, rules or GenerationRules())


def _verify_translation(model: Seq2SeqTransformer, tokenizer: Tokenizer, seq2seq: OrtSeq2Seq,
                        eval_pairs: Sequence[tuple[str, str]] | None, max_new_tokens: int) -> dict[str, Any]:
    eos = model.config.eos_id
    if eval_pairs:
        sources = [[*e.ids, eos] for e in tokenizer.encode_batch([s for s, _ in eval_pairs])]
        references: list[str] | None = [t for _, t in eval_pairs]
    else:  # no data: random sources still compare tokens
        rng = np.random.default_rng(0)
        sources = [[*rng.integers(4, model.config.vocab_size, int(n)).tolist(), eos] for n in rng.integers(1, 20, 32)]
        references = None
    return verify_translator(model, seq2seq, sources, references, tokenizer.decode_batch, max_new_tokens,
                             rules=seq2seq.rules)


def _translator_variants(model: Seq2SeqTransformer, tokenizer: Tokenizer, fused: dict[str, onnx.ModelProto],
                         vdir: Path, opts: ExportOptions, eval_pairs: Sequence[tuple[str, str]] | None,
                         max_new_tokens: int, report: dict[str, Any], rules: GenerationRules) -> dict[str, Any]:
    """Each variant's parity with PyTorch and exact match (as the fp32 export's), and its gate against the
    fp32 graphs: teacher-forced logits and greedy agreement (:mod:`transerve.export.accuracy_gate`)."""
    built: dict[str, Any] = {}
    encoder, decoder = (make_session(vdir / f"{g}.onnx") for g in ("encoder", "decoder_step_ragged"))
    fp32 = ort_seq2seq(model, encoder, decoder, rules)
    sources = _gate_sources(model, tokenizer, eval_pairs)
    for variant in _wanted(opts, report):
        opts.on_status(f"{opts.name}: {variant} variant")
        built[variant] = variants.build_measured(variant, fused, vdir, functools.partial(
            _translator_variant, model, tokenizer, vdir, variant=variant, fp32=fp32, sources=sources,
            eval_pairs=eval_pairs, max_new_tokens=max_new_tokens, report=report))
    return built


def _translator_variant(model: Seq2SeqTransformer, tokenizer: Tokenizer, vdir: Path, files: dict[str, str],
                        variant: str, fp32: OrtSeq2Seq, sources: list[list[int]],
                        eval_pairs: Sequence[tuple[str, str]] | None, max_new_tokens: int,
                        report: dict[str, Any]) -> dict[str, Any]:
    """One built translator variant: parity and exact match as the fp32 export's, its gate and its speed."""
    entry: dict[str, Any] = {"files": files, "runtime": "openvino" if variant == "bf16" else "onnxruntime",
                             "precision": variant}
    try:
        encoder, decoder = (variants.runner_for(vdir, files[g], variant) for g in ("encoder", "decoder_step_ragged"))
        seq2seq = ort_seq2seq(model, encoder, decoder, fp32.rules)
        checks = _verify_translation(model, tokenizer, seq2seq, eval_pairs, max_new_tokens)
        entry.update(runs_on_cpu=True, token_agreement_vs_pytorch=1.0 - checks["parity"]["sequences_differing"]
                     / max(1, checks["parity"]["sequences_compared"]), **checks)
        gate, speed = variants.translator_gate(seq2seq, fp32, sources, model.config.pad_id, max_new_tokens)
        if checks["accuracy"]:
            gate.update(accuracy=checks["accuracy"]["onnx"], accuracy_fp32=report["accuracy"]["onnx"])
        entry.update(speed_vs_fp32=round(speed, 3), measured_on=cpu_signature(), gate=accuracy_gate.verdict(gate))
    except Exception as e:  # fp16 on the CPU provider may lack kernels: report, do not fail the export
        entry.update(variants.error_entry(e))
    return entry


def _gate_sources(model: Seq2SeqTransformer, tokenizer: Tokenizer,
                  eval_pairs: Sequence[tuple[str, str]] | None, count: int = 64) -> list[list[int]]:
    """Up to ``count`` sources for the gate's teacher-forced comparison: evaluation texts, else random ids."""
    eos = model.config.eos_id
    if eval_pairs:
        return [[*e.ids, eos] for e in tokenizer.encode_batch([s for s, _ in eval_pairs[:count]])]
    rng = np.random.default_rng(1)
    return [[*rng.integers(4, model.config.vocab_size, int(n)).tolist(), eos] for n in rng.integers(1, 20, count)]
