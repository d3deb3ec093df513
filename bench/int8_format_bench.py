"""Which int8 graph decodes fastest, by batch size: the choice behind the translator's int8 variant.

Usage: ``python bench/int8_format_bench.py [--work /tmp/transerve-bench] [--repeats 5]``

The opus-mt-en-de-shaped translator (``opus_model.py``), the offline greedy loop of ``ct2_bench.py`` (32 new
tokens, 2 threads), three int8 forms of the same fp32 graphs, each with the tied output projection
pre-transposed so that it is quantized too:

* ``matmulinteger-per-channel`` — ``quantize_dynamic``, per-channel QInt8 weights: what ``--int8`` writes;
* ``matmulinteger-per-tensor`` — the same, one scale per weight tensor;
* ``matmulnbits-8bit`` — weight-only ``MatMulNBits`` (8 bits, block 128, symmetric, ``accuracy_level`` 4:
  int8 activations on VNNI/AMX).

Tokens/s, median (min–max) over ``--repeats`` at batch 1, 4 and 16, and greedy-token agreement with the
fp32 graphs. If one form won at small batches and another at large ones by more than 5 %, the scheduler
would keep both and pick per step; the section says whether that is so on this CPU.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from ct2_bench import SOURCE_LEN, TranserveLoop, tokens_per_second
from export_bench import command_line, machine, markdown, write_section
from opus_model import exported

BATCHES = (1, 4, 16)
SWITCH_GAIN = 1.05


def quantized_forms(vdir: Path, out: Path) -> list[str]:
    """Write each int8 form of both graphs under ``out`` (suffixes ``.<form>``); returns the form names."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from transerve.export.precision import fold_weight_transposes

    logging.getLogger().setLevel(logging.ERROR)  # the quantizers log every node at INFO
    forms = ["matmulinteger-per-channel", "matmulinteger-per-tensor", "matmulnbits-8bit"]
    for graph in ("encoder", "decoder_step_ragged"):
        model = onnx.load_model(str(vdir / f"{graph}.onnx"))
        model.graph.ClearField("value_info")
        fold_weight_transposes(model)
        source = out / f"{graph}.fp32.onnx"
        onnx.save_model(copy.deepcopy(model), str(source), save_as_external_data=True,  # the copy goes external
                        location=f"{graph}.fp32.weights")
        for form, per_channel in (("matmulinteger-per-channel", True), ("matmulinteger-per-tensor", False)):
            quantize_dynamic(str(source), str(out / f"{graph}.{form}.onnx"), per_channel=per_channel,
                             weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        nbits = MatMulNBitsQuantizer(model, bits=8, block_size=128, is_symmetric=True, accuracy_level=4)
        nbits.process()
        onnx.save_model(nbits.model.model, str(out / f"{graph}.matmulnbits-8bit.onnx"),
                        save_as_external_data=True, location=f"{graph}.matmulnbits-8bit.weights")
    return forms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/transerve-bench"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    vdir = exported(args.work) / "opus-shaped" / "1"
    config = yaml.safe_load((vdir.parent / "config.yaml").read_text())
    sources = np.random.default_rng(0).integers(4, config["decoder"]["vocab_size"],
                                                (16, SOURCE_LEN)).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        forms = quantized_forms(vdir, folder)
        loops = {"fp32": TranserveLoop(vdir, config), **{f: TranserveLoop(folder, config, f".{f}") for f in forms}}
        reference = loops["fp32"](sources)
        agreement = {f: float((loops[f](sources) == reference).mean()) for f in forms}
        rows, best = [], {}
        for batch in BATCHES:
            runs: dict[str, list[float]] = {f: [] for f in forms}
            for _ in range(args.repeats):  # alternating, so drift hits every form alike
                for form in forms:
                    runs[form].append(tokens_per_second(loops[form], sources, batch))
            medians = {f: statistics.median(v) for f, v in runs.items()}
            best[batch] = max(medians, key=lambda f: medians[f])
            rows.append({"batch": batch, **{f: f"{medians[f]:.0f} ({min(v):.0f}–{max(v):.0f})"
                                            for f, v in runs.items()}, "fastest": best[batch]})
            print(rows[-1], flush=True)
    rows.append({"batch": "token agreement vs fp32", **{f: f"{agreement[f]:.3f}" for f in forms}, "fastest": ""})
    table = markdown(rows)
    verdict = verdict_text(rows[:-1], forms)
    print(machine(), table, verdict, sep="\n\n")
    write_section(Path(__file__).with_name("RESULTS.md"), "## int8 forms",
                  f"## int8 forms for the translator: tokens/s by batch (median of {args.repeats}, min–max)\n\n"
                  f"{machine()}\n\n{command_line()}\n\n{table}\n\n{verdict}\n")


def verdict_text(rows: list[dict[str, object]], forms: list[str]) -> str:
    """What the figures mean for the variant: keep the default form, change it, or switch per step — only
    when no single form stays within ``SWITCH_GAIN`` of the fastest at every batch size."""
    default = "matmulinteger-per-channel"
    medians = [{f: float(str(row[f]).split()[0]) for f in forms} for row in rows]
    worst = {f: min(m[f] / max(m.values()) for m in medians) for f in forms}  # its worst share of the best
    single = max(forms, key=lambda f: (worst[f], f == default))
    shown = ", ".join(f"batch {row['batch']}: {max(m, key=lambda f: m[f])} {max(m.values()) / m[default]:.2f}×"
                      for row, m in zip(rows, medians, strict=True))
    if worst[default] * SWITCH_GAIN >= 1:
        return (f"Verdict: `{default}` (what `--int8` writes) stays: it is within {SWITCH_GAIN}× of the fastest "
                f"form at every batch size here (fastest over it: {shown}); one decoder graph, no per-step switching.")
    if worst[single] * SWITCH_GAIN >= 1:
        return (f"Verdict: `{single}` is within {SWITCH_GAIN}× of the fastest at every batch size and beats "
                f"`{default}` by up to {1 / worst[default]:.2f}× ({shown}): one form throughout, so per-step "
                "switching would not pay. Per-tensor scales trade accuracy for it; the export keeps per-channel "
                "until the gate can pick the form per CPU (next step).")
    return (f"Verdict: no single form stays within {SWITCH_GAIN}× of the fastest at every batch size ({shown}): "
            "per-step switching between two decoder graphs would pay on this CPU.")


if __name__ == "__main__":
    main()
