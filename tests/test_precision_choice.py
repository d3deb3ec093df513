"""``precision: auto | fp32 | int8 | bf16``: which variant serves, on which CPU, and why.

The rules (transerve/server/backends/precision.py): only variants whose accuracy gate passed; the fastest when the
export timed them on this very CPU; else bf16 where the CPU has bf16 instructions, int8 where it has VNNI,
else fp32. Explicit precisions are refused, with the reason, rather than replaced.
"""

from __future__ import annotations

from typing import Any

import pytest
from transerve.server.backends import precision
from transerve.server.backends.cpu import cpu_signature
from transerve.server.backends.precision import choose
from transerve.server.exceptions import PrecisionError

FP32 = {"model": "model.onnx"}
AMX = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})
VNNI_ONLY = frozenset({"avx2", "avx512f", "avx512_vnni"})
AVX2 = frozenset({"avx2", "fma"})


def variant(name: str, passed: bool = True, speed: float | None = None, here: bool = False) -> dict[str, Any]:
    gate = {"logit_mae": 0.004, "logit_mae_bound": 0.01, "passed": passed, **({} if passed else {"why": "MAE"})}
    entry: dict[str, Any] = {"files": FP32 if name == "bf16" else {"model": f"model.{name}.onnx"},
                             "runtime": "openvino" if name == "bf16" else "onnxruntime", "precision": name,
                             "runs_on_cpu": True, "gate": gate}
    if speed is not None:
        entry.update(speed_vs_fp32=speed, measured_on=cpu_signature() if here else "another CPU (avx2)")
    return entry


@pytest.fixture(autouse=True)
def openvino_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "openvino_available", lambda: True)


@pytest.mark.parametrize(("flags", "variants", "expected"), [
    (AMX, {"int8": variant("int8"), "bf16": variant("bf16")}, "bf16"),  # by flags: bf16 first
    (VNNI_ONLY, {"int8": variant("int8"), "bf16": variant("bf16")}, "int8"),  # no bf16 instructions
    (AVX2, {"int8": variant("int8"), "bf16": variant("bf16")}, "fp32"),  # no VNNI: int8 not measured there
    (AMX, {"int8": variant("int8"), "bf16": variant("bf16", passed=False)}, "int8"),  # bf16 failed its gate
    (AMX, {"int8": variant("int8", passed=False)}, "fp32"),
    (AMX, {}, "fp32"),  # exported without variants
])
def test_auto_by_cpu_flags_and_gates(flags: frozenset[str], variants: dict[str, Any], expected: str) -> None:
    choice = choose("auto", FP32, variants, flags)
    assert choice.precision == expected, choice.reason
    assert choice.reason.startswith("auto")
    assert choice.runtime == ("openvino" if expected == "bf16" else "onnxruntime")


def test_auto_takes_the_fastest_measured_on_this_cpu() -> None:
    flags = AMX
    measured = {"int8": variant("int8", speed=1.8, here=True), "bf16": variant("bf16", speed=0.7, here=True)}
    choice = choose("auto", FP32, measured, flags)
    assert (choice.precision, choice.files) == ("int8", {"model": "model.int8.onnx"})
    assert "1.80× fp32" in choice.reason
    slower = {"int8": variant("int8", speed=0.9, here=True)}
    assert choose("auto", FP32, slower, flags).precision == "fp32"  # nothing beats fp32 here
    tie = {"bf16": variant("bf16", speed=1.02, here=True)}
    assert "under the 1.05× a reduced precision must gain" in choose("auto", FP32, tie, flags).reason
    elsewhere = {"int8": variant("int8", speed=1.8), "bf16": variant("bf16", speed=0.7)}
    assert choose("auto", FP32, elsewhere, flags).precision == "bf16"  # timed on another CPU: flags decide


def test_auto_skips_ungated_variants_from_old_exports() -> None:
    old = {"int8": {"file": "model.int8.onnx", "runs_on_cpu": True}}
    choice = choose("auto", FP32, old, AMX)
    assert choice.precision == "fp32" and "no accuracy gate" in choice.reason


def test_explicit_precisions() -> None:
    assert choose("fp32", FP32, {"int8": variant("int8")}, AMX).files == FP32
    old = {"int8": {"file": "model.int8.onnx", "runs_on_cpu": True}}
    assert choose("int8", FP32, old, AVX2).files == {"model": "model.int8.onnx"}  # asked for: served, noted
    with pytest.raises(PrecisionError, match="failed its accuracy gate"):
        choose("int8", FP32, {"int8": variant("int8", passed=False)}, AMX)
    with pytest.raises(PrecisionError, match="no int8 variant"):
        choose("int8", FP32, {}, AMX)
    with pytest.raises(PrecisionError, match="AVX512-BF16 or AMX-BF16"):
        choose("bf16", FP32, {"bf16": variant("bf16")}, VNNI_ONLY)


def test_bf16_needs_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "openvino_available", lambda: False)
    with pytest.raises(PrecisionError, match="OpenVINO"):
        choose("bf16", FP32, {"bf16": variant("bf16")}, AMX)
    assert choose("auto", FP32, {"bf16": variant("bf16"), "int8": variant("int8")}, AMX).precision == "int8"
