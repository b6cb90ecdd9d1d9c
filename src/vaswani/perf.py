"""Opt-in process settings that make CPU training and decoding faster. Nothing here runs at import.

:func:`tune_allocator` keeps glibc from handing large freed buffers back to the kernel. By default glibc
serves every allocation over a (dynamic) threshold of at most 32 MiB with its own ``mmap`` and ``munmap`` s it
when freed, and trims the heap top; a training step frees and re-allocates the same activation buffers
every step, so the kernel unmaps and faults them back in each time (12-44% of a step measured on a
2-core CPU). With ``M_MMAP_MAX=0`` and a large ``M_TRIM_THRESHOLD`` freed memory stays in the process
for reuse: faster, but the resident size stays at its high-water mark.

:func:`flush_denormals` makes the CPU treat fp32 numbers below 1.2e-38 (denormals) as zero. Gradients of a
small model trained with dropout produce them, and every matrix multiply that reads one drops to a slow
path: fp32 training of the multi30k preset ran 1.9x faster with them flushed (2-core CPU, torch 2.13).
:func:`tune_cpu_training` applies both; ``vaswani train`` and ``vaswani demo`` call it when training on a CPU.

:func:`has_fast_bf16` tells whether bf16 autocast runs on bf16 hardware (a GPU that supports it, or a CPU
with AVX512-BF16 / AMX or Arm's BF16 instructions) rather than being emulated; the demo trains in bf16 only
then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied: dict[str, int] | None = None


def tune_allocator(trim_threshold: int = 2**31 - 1, mmap_max: int = 0) -> bool:
    """Set glibc's ``M_MMAP_MAX`` (default 0: no per-allocation ``mmap``) and ``M_TRIM_THRESHOLD`` (default
    2 GiB, the largest mallopt takes: keep up to that much free heap top) for this process, as ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=...`` in the environment would.

    Call it once at start-up, before large tensors exist. Returns True if glibc accepted both settings,
    False where the C library is not glibc (macOS, Windows, musl), in which case nothing changes.
    """
    global _applied
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = min(int(trim_threshold), 2**31 - 1)  # mallopt takes a C int
    ok = bool(mallopt(_M_MMAP_MAX, int(mmap_max))) and bool(mallopt(_M_TRIM_THRESHOLD, trim))
    if ok:
        _applied = {"mmap_max": int(mmap_max), "trim_threshold": trim}
    return ok


def allocator_settings() -> dict[str, int] | None:
    """What :func:`tune_allocator` set in this process (None if it was not called or did not apply)."""
    return _applied


def flush_denormals() -> bool:
    """Flush denormal floats to zero on the CPU from now on (``torch.set_flush_denormal(True)``; x86 with
    SSE3 and ARM). Returns False where the CPU does not support it, in which case nothing changes."""
    return bool(torch.set_flush_denormal(True))


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags from Linux's ``/proc/cpuinfo`` (empty elsewhere)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[-1].split())
                elif line.startswith("model name") and not name:
                    name = line.split(":", 1)[-1].strip()
    except OSError:
        pass
    return name, flags


#: The instruction sets that decide which CPU kernels pay (bf16 products, AMX tiles, AVX-512 or only AVX2).
SPEED_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "bf16")


def cpu_description() -> str:
    """One line for benchmark reports: the CPU model, its logical cores and the speed-relevant flags it has."""
    import os
    import platform

    name, flags = _cpuinfo()
    present = [flag for flag in SPEED_FLAGS if flag in flags]
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, " + (
        ", ".join(present) if present else "none of " + "/".join(SPEED_FLAGS)
    )


def has_fast_bf16() -> bool:
    """Whether bf16 matrix products run natively: on the CUDA GPU if there is one, else on this CPU (the
    ``avx512_bf16`` / ``amx_bf16`` or Arm ``bf16`` flag in Linux's ``/proc/cpuinfo``; False elsewhere)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(_cpuinfo()[1] & {"avx512_bf16", "amx_bf16", "bf16"})


def tune_cpu_training() -> dict[str, bool]:
    """Both settings of this module, as ``vaswani train`` and ``vaswani demo`` use on a CPU."""
    return {"allocator": tune_allocator(), "flush_denormals": flush_denormals()}
