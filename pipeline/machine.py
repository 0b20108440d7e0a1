"""What machine a run or a benchmark ran on, as read from Linux.

Training is bit-exact on one CPU kind, not across kinds (an AMD EPYC with
AVX512-BF16 and an Intel Xeon with AMX give other last digits), so every MLflow
run and every benchmark table names the CPU it was made on.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")  # the first found names the kind


def _cpuinfo() -> str:
    try:
        return CPUINFO.read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU model name, e.g. "AMD EPYC" (else what Python knows of the processor)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def native_bfloat16() -> str | None:
    """The CPU feature that computes bfloat16 natively (`amx_bf16`, `avx512_bf16`), or None."""
    flags = set(_cpuinfo().split())
    return next((flag for flag in BFLOAT16_FLAGS if flag in flags), None)


def cpu_has_native_bfloat16() -> bool:
    return native_bfloat16() is not None


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_description() -> str:
    """One line for a log or a table: `AMD EPYC, 2 cores, avx512_bf16`."""
    feature = native_bfloat16() or "no native bfloat16"
    return f"{cpu_model()}, {usable_cores()} cores, {feature}"


def machine_tags() -> dict[str, str]:
    """The MLflow tags that say which CPU a run computed on."""
    return {
        "cpu.model": cpu_model(),
        "cpu.cores": str(usable_cores()),
        "cpu.bfloat16": native_bfloat16() or "none",
    }
