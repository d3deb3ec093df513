"""Which precision and runtime serve an entry: ``precision: auto | fp32 | int8 | bf16``.

A variant can serve only if this install and CPU can run it (bf16 needs OpenVINO and AVX512-BF16/AMX-BF16)
and its accuracy gate passed at export (the entry's ``export_report.json``; see
:mod:`transerve.export.accuracy_gate`). Among those, ``auto`` takes

* the fastest, when the export timed every one of them on this very CPU (same model and SIMD flags): the
  export measures each variant against fp32 on the gate's inputs (``speed_vs_fp32``), and fp32 wins unless
  one is at least ``MIN_GAIN`` (5 %) faster — a tie is noise, not a reason to give up precision;
* otherwise the first in the order that measured fastest on the Xeon with AMX (bench/RESULTS.md): ``bf16``
  where the CPU has bf16 instructions, then ``int8`` where it has VNNI. Without VNNI, int8 runs through
  AVX2's saturating ``vpmaddubsw`` path, where neither its speed nor its gate was measured, so ``auto`` stays
  fp32 there unless the export timed it on that CPU.

An explicit precision is served if it can be, and refused with the reason if its gate failed or this machine
cannot run it — never silently replaced. The choice and its reason are logged and reported in ModelMetadata.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from transerve.server.backends.cpu import bf16_capable, cpu_flags, cpu_signature, simd_summary, vnni_capable
from transerve.server.backends.openvino_runner import openvino_available
from transerve.server.exceptions import PrecisionError

log = logging.getLogger(__name__)

PrecisionName = Literal["auto", "fp32", "int8", "bf16"]
REPORT_FILE = "export_report.json"
MIN_GAIN = 1.05  # a reduced precision must beat fp32 by this much where it was timed: not for noise

@dataclass(frozen=True)
class Choice:
    precision: str  # fp32 | int8 | bf16
    runtime: str  # onnxruntime | openvino
    files: dict[str, str]
    reason: str


def read_variants(vdir: Path) -> dict[str, Any]:
    path = vdir / REPORT_FILE
    try:
        return dict(json.loads(path.read_text()).get("variants", {})) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _unusable(name: str, variant: dict[str, Any] | None, flags: frozenset[str]) -> str | None:
    """Why ``name`` cannot serve here (None: it can)."""
    if variant is None:
        return f"the export wrote no {name} variant (transerve export --int8)"
    if not variant.get("runs_on_cpu", True):
        return f"{name} does not run on this CPU runtime ({variant.get('error', '')})"
    gate = variant.get("gate")
    if gate is not None and not gate.get("passed"):
        return f"{name} failed its accuracy gate at export ({gate.get('why', '')})"
    if name == "bf16":
        if not bf16_capable(flags):
            return "bf16 needs AVX512-BF16 or AMX-BF16, which this CPU lacks"
        if not openvino_available():
            return "bf16 runs on OpenVINO, which is not installed (pip install 'transerve[openvino]')"
    return None


def choose(setting: PrecisionName, fp32_files: dict[str, str], variants: dict[str, Any],
           flags: frozenset[str] | None = None) -> Choice:
    """The variant to serve for ``setting``; raises :class:`PrecisionError` for an explicit one that cannot."""
    flags = cpu_flags() if flags is None else flags
    fp32 = Choice("fp32", "onnxruntime", dict(fp32_files), "fp32 asked for" if setting == "fp32" else "")
    if setting == "fp32":
        return fp32
    if setting != "auto":
        why = _unusable(setting, variants.get(setting), flags)
        if why:
            raise PrecisionError(f"precision {setting}: {why}")
        return _choice(setting, variants[setting], f"{setting} asked for")
    usable, skipped = [], []
    for name in ("bf16", "int8"):
        why = _unusable(name, variants.get(name), flags)
        if why is None and "gate" not in variants[name]:
            why = f"{name} has no accuracy gate in its export report (exported before gates: re-export)"
        (skipped.append(why) if why else usable.append(name))
    measured = [n for n in usable if variants[n].get("measured_on") == cpu_signature()]
    if usable and len(measured) == len(usable):  # timed at export on this very CPU: the fastest wins
        best = max(usable, key=lambda n: float(variants[n]["speed_vs_fp32"]))
        speed = float(variants[best]["speed_vs_fp32"])
        if speed >= MIN_GAIN:
            return _choice(best, variants[best], f"auto: {best} measured {speed:.2f}× fp32 at export on this CPU")
        return replace(fp32, reason=f"auto: fp32, as fast on this CPU as {best} ({speed:.2f}× fp32 at export, "
                       f"under the {MIN_GAIN}× a reduced precision must gain)")
    fast_here = {"bf16": bf16_capable(flags), "int8": vnni_capable(flags)}
    for name in usable:  # not timed on this CPU: the order that measured fastest where we measured
        if fast_here[name]:
            return _choice(name, variants[name], f"auto: {name}, first gated variant for this CPU's flags "
                           f"({simd_summary(flags)}; speed not measured on this CPU)")
        skipped.append(f"{name}: no {'bf16' if name == 'bf16' else 'VNNI'} instructions on this CPU")
    return replace(fp32, reason="auto: fp32, because " + "; ".join(skipped))


def _choice(name: str, variant: dict[str, Any], reason: str) -> Choice:
    gate = variant.get("gate")
    if gate is None:
        reason += " (no accuracy gate recorded: exported before gates existed)"
    else:
        reason += f" (gate passed: logit MAE {gate['logit_mae']:.3g} ≤ {gate['logit_mae_bound']:.3g})"
    files = variant.get("files") or {"model": variant["file"]}  # reports before 2026-12 named one file
    return Choice(name, variant.get("runtime", "onnxruntime"), dict(files), reason)
