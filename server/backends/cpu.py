"""What this CPU can compute fast: read once from ``/proc/cpuinfo``, used to pick a precision per model.

The flags decide only what is *possible* (bf16 needs AVX512-BF16 or AMX-BF16 to be worth it; int8 is fast
with VNNI and still beats fp32 on AVX2's ``vpmaddubsw`` path); which variant is served also needs the
variant's accuracy gate (:mod:`transerve.server.backends.precision`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags); ("?", empty) where there is no ``/proc/cpuinfo``."""
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return model, frozenset(flags)


def cpu_flags() -> frozenset[str]:
    return cpu_info()[1]


def bf16_capable(flags: frozenset[str]) -> bool:
    return bool(flags & BF16_FLAGS)


def vnni_capable(flags: frozenset[str]) -> bool:
    return bool(flags & VNNI_FLAGS)


def simd_summary(flags: frozenset[str]) -> str:
    """The flags that matter here, for logs and benchmark tables."""
    simd = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    return " ".join(simd) or "none listed"


def cpu_signature() -> str:
    """Model and SIMD flags: a speed measured at export is trusted at load only on the same signature."""
    model, flags = cpu_info()
    return f"{model} ({simd_summary(flags)})"


def cores() -> int:
    return os.cpu_count() or 1
