"""Reduced-precision variants of an exported entry, each measured against fp32 and gated.

* ``int8`` — ONNX Runtime dynamic quantization (``*.int8.onnx``), any x86 CPU, in the form (weight scales per
  channel or per tensor, :data:`INT8_FORMS`) that measured fastest on the export's CPU among those that passed
  the gate — the report keeps every form's speed and verdict (``forms``) and which was kept (``form``);
* ``bf16`` — the fp32 files themselves, run by OpenVINO with the bf16 precision hint; measured only where
  OpenVINO is installed and the CPU computes bf16 (elsewhere OpenVINO would silently run f32 and the gate
  would measure the wrong thing);
* ``fp16`` — for GPUs (TensorRT strongly typed builds); ONNX Runtime's CPU provider may lack its kernels.

Each entry in the report's ``variants`` says its files, runtime and precision, and carries ``gate``
(:mod:`transerve.export.accuracy_gate`), which ``precision: auto`` reads at load.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from transerve.export import accuracy_gate, precision
from transerve.export.weights_file import save_graphs
from transerve.server.backends.cpu import bf16_capable, cpu_flags, cpu_signature
from transerve.server.backends.openvino_runner import OpenVinoRunner, openvino_available
from transerve.server.backends.sessions import make_session
from transerve.server.engine.seq2seq import OrtSeq2Seq, pad_ids

Builder = Callable[[onnx.ModelProto], onnx.ModelProto]
INT8_FORMS: dict[str, Builder] = {"per-channel": partial(precision.quantize_int8, per_channel=True),
                                  "per-tensor": partial(precision.quantize_int8, per_channel=False)}
BUILDERS: dict[str, dict[str, Builder]] = {"int8": INT8_FORMS, "fp16": {"fp16": precision.convert_fp16}}


def build_measured(variant: str, fused: dict[str, onnx.ModelProto], vdir: Path,
                   evaluate: Callable[[dict[str, str]], dict[str, Any]]) -> dict[str, Any]:
    """Build ``variant`` of every graph in each of its forms, ``evaluate`` each (gate and speed vs fp32), and
    keep in ``vdir`` the fastest form whose gate passed (else the first form, whose failure the report
    shows). A variant with no file of its own (bf16) is evaluated on the fp32 files."""
    if variant not in BUILDERS:
        return evaluate({g: f"{g}.onnx" for g in fused})
    files = {g: f"{g}.{variant}.onnx" for g in fused}
    built: dict[str, dict[str, onnx.ModelProto]] = {}
    measured: dict[str, dict[str, Any]] = {}
    for form, build in BUILDERS[variant].items():
        built[form] = {g: build(p) for g, p in fused.items()}
        save_graphs(vdir, built[form], f".{variant}")
        measured[form] = evaluate(files)
    kept = pick_form(measured)
    if kept != form:  # the files on disk are the last form's
        save_graphs(vdir, built[kept], f".{variant}")
    if len(measured) == 1:
        return measured[kept]
    return {**measured[kept], "form": kept,
            "forms": {f: {"speed_vs_fp32": m.get("speed_vs_fp32"), "passed": gate_passed(m)}
                      for f, m in measured.items()}}


def gate_passed(entry: dict[str, Any]) -> bool:
    return bool(entry.get("runs_on_cpu") and entry.get("gate", {}).get("passed"))


def pick_form(measured: dict[str, dict[str, Any]]) -> str:
    """The fastest form that passed its gate; the first form when none did."""
    passed = [f for f, m in measured.items() if gate_passed(m)]
    return max(passed, key=lambda f: measured[f]["speed_vs_fp32"]) if passed else next(iter(measured))


def bf16_skip_reason() -> str | None:
    """Why the bf16 variant cannot be measured here, or None when it can."""
    if not openvino_available():
        return "OpenVINO is not installed (pip install 'transerve[openvino]')"
    if not bf16_capable(cpu_flags()):
        return "this CPU has neither AVX512-BF16 nor AMX-BF16"
    return None


def runner_for(vdir: Path, filename: str, variant: str) -> Any:
    """The runner that serves ``variant`` of one graph file (a session-like ``run(names, feeds)``)."""
    if variant == "bf16":
        return OpenVinoRunner(vdir / filename, 2, "bf16")
    return make_session(vdir / filename)


def error_entry(e: Exception) -> dict[str, Any]:
    return {"runs_on_cpu": False, "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}


def run_times(run: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` timed runs after ``warmup`` untimed ones (also the benchmarks' timer)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs after one warm-up: the least noisy figure on a shared machine."""
    return min(run_times(run, repeats))


def vit_variants(fused: onnx.ModelProto, vdir: Path, wanted: Sequence[str], probe: np.ndarray,
                 labels: np.ndarray | None, on_status: Callable[[str], None]) -> dict[str, Any]:
    """The ViT's variants, gated on ``probe`` images (the evaluation set when there is one) and timed on them
    against fp32."""
    fp32 = make_session(vdir / "model.onnx")
    reference = run_batches(fp32, probe)
    fp32_seconds = best_seconds(lambda: run_batches(fp32, probe))
    variants: dict[str, Any] = {}
    for variant in wanted:
        on_status(f"{vdir.parent.name}: {variant} variant")

        def evaluate(files: dict[str, str], v: str = variant) -> dict[str, Any]:
            return {"files": files, **_runtime(v), **vit_gate(vdir, files, v, probe, reference, labels, fp32_seconds)}

        variants[variant] = build_measured(variant, {"model": fused}, vdir, evaluate)
    return variants


def _runtime(variant: str) -> dict[str, str]:
    return {"runtime": "openvino" if variant == "bf16" else "onnxruntime", "precision": variant}


def run_batches(runner: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([runner.run(None, {"images": images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


def vit_gate(vdir: Path, files: dict[str, str], variant: str, probe: np.ndarray, reference: np.ndarray,
             labels: np.ndarray | None, fp32_seconds: float) -> dict[str, Any]:
    try:
        runner = runner_for(vdir, files["model"], variant)
        logits = run_batches(runner, probe)
        speed = fp32_seconds / best_seconds(lambda: run_batches(runner, probe))
    except Exception as e:  # e.g. fp16 kernels missing on the CPU provider: report, do not fail the export
        return error_entry(e)
    checks: dict[str, Any] = accuracy_gate.logit_checks(logits, reference)
    if labels is not None:
        checks.update(accuracy=float((logits.argmax(-1) == labels).mean()),
                      accuracy_fp32=float((reference.argmax(-1) == labels).mean()))
    return {"runs_on_cpu": True, "max_abs_diff_vs_fp32": checks["logit_max_abs"],
            **({"accuracy": checks["accuracy"]} if labels is not None else {}),
            "speed_vs_fp32": round(speed, 3), "measured_on": cpu_signature(), "gate": accuracy_gate.verdict(checks)}


def teacher_forced_logits(seq2seq: OrtSeq2Seq, ids: np.ndarray, mask: np.ndarray,
                          targets: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[N, T, V]`` with the decoder fed ``targets`` (after BOS) instead of its own choices, and the
    positions that count (each target's tokens and the EOS after them)."""
    layout, n = seq2seq.layout, len(targets)
    steps = 1 + max(len(t) for t in targets)
    forced = np.full((n, steps), layout.pad_id, np.int64)
    forced[:, 0] = layout.bos_id
    valid = np.zeros((n, steps), bool)
    for row, target in enumerate(targets):
        forced[row, 1:1 + len(target)] = target
        valid[row, :len(target) + 1] = True
    cross, past, logits = seq2seq.encode(ids, mask), seq2seq.empty_cache(n), []
    for step in range(steps):
        out, past = seq2seq.step(forced[:, step], mask, past, cross)
        logits.append(out)
    return np.stack(logits, 1), valid


def translator_gate(variant: OrtSeq2Seq, fp32: OrtSeq2Seq, sources: Sequence[Sequence[int]], pad_id: int,
                    max_new_tokens: int) -> tuple[dict[str, Any], float]:
    """Teacher-forced logit error and greedy agreement of ``variant`` against ``fp32``, on ``sources``; and the
    variant's greedy decoding speed relative to fp32's (the decode loop, batch ``len(sources)``)."""
    ids, mask = pad_ids(sources, pad_id)
    greedy_fp32 = fp32.generate(ids, mask, max_new_tokens)
    greedy = variant.generate(ids, mask, max_new_tokens)
    speed = best_seconds(lambda: fp32.generate(ids, mask, max_new_tokens)) / \
        best_seconds(lambda: variant.generate(ids, mask, max_new_tokens))
    logits, valid = teacher_forced_logits(variant, ids, mask, greedy_fp32)
    reference, _ = teacher_forced_logits(fp32, ids, mask, greedy_fp32)
    checks: dict[str, Any] = accuracy_gate.logit_checks(logits, reference, valid)
    checks["token_agreement"] = float(np.mean([a == b for a, b in zip(greedy, greedy_fp32, strict=True)]))
    return checks, speed
