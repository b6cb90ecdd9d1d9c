"""Process settings that make CPU training and decoding faster. Nothing here runs at import.

:func:`tune_allocator` keeps glibc from handing large freed buffers back to the kernel. By default glibc
serves every allocation over a (dynamic) threshold of at most 32 MiB with its own ``mmap`` and ``munmap`` s it
when freed, and trims the heap top; a training step frees and re-allocates the same activation buffers
every step, so the kernel unmaps and faults them back in each time (12-44% of a step measured on a
2-core CPU). With ``M_MMAP_MAX=0`` and a large ``M_TRIM_THRESHOLD`` freed memory stays in the process
for reuse: faster, but the resident size stays at its high-water mark.

:func:`flush_denormals` makes the CPU treat fp32 numbers below 1.2e-38 (denormals) as zero. Gradients of a
small model trained with dropout produce them, and every matrix multiply that reads one drops to a slow
path: fp32 training of the multi30k preset ran 1.9x faster with them flushed (2-core CPU, torch 2.13).
:func:`tune_cpu_training` applies both. A Vaswani model applies it the first time it is put in training mode
on a CPU (:func:`tune_cpu_training_once`, from ``model.train()``, which transformers' ``Trainer`` and training
loops call), so every way of training gets it. The first time a model generates on a CPU, it applies
:func:`tune_allocator` alone (:func:`tune_cpu_decoding_once`, from ``model.generate()``): a beam search
allocates its logits and caches anew at every step. ``VASWANI_TUNE_CPU=0`` in the environment keeps both off.

:func:`has_fast_bf16` tells whether bf16 autocast pays on this machine: a GPU that supports it, or a CPU with
bf16 products (AVX512-BF16 / AMX, Arm's BF16) on which a bf16 matrix product is also measured to be faster than
fp32 (:func:`bf16_speedup`); the demo trains in bf16 only then.

This file is copied next to a saved model (``modeling.py`` imports it), so it imports only torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

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


#: CPU flags of bf16 products; without one, bf16 is emulated (two orders of magnitude slower than fp32).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
#: How much faster than fp32 a bf16 matrix product must run for bf16 autocast to pay: the casts, and the
#: element-wise work autocast leaves in fp32, take back part of what the products gain.
BF16_MIN_SPEEDUP = 1.25


def has_fast_bf16() -> bool:
    """Whether bf16 autocast pays here: on the CUDA GPU if there is one (if it supports bf16), else on a CPU
    that has bf16 products (:data:`BF16_FLAGS` in Linux's ``/proc/cpuinfo``) and runs a bf16 matrix product
    at least :data:`BF16_MIN_SPEEDUP` times as fast as fp32 (:func:`bf16_speedup`, measured once). The flag
    alone does not tell: a CPU with AVX512-BF16 but not AMX gains about 2x on paper, one whose fp32 already
    runs near its memory bandwidth less."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(_cpuinfo()[1] & BF16_FLAGS) and bf16_speedup() >= BF16_MIN_SPEEDUP


def bf16_is_emulated() -> bool:
    """Whether this CPU lacks bf16 products: Linux's ``/proc/cpuinfo`` lists its flags and none of
    :data:`BF16_FLAGS` (False where the flags are unknown). PyTorch then emulates every bf16 product."""
    flags = _cpuinfo()[1]
    return bool(flags) and not flags & BF16_FLAGS


def warn_if_bf16_emulated(task: str) -> None:
    """Warn that ``task`` (e.g. "training") in bf16 on this CPU will crawl, if :func:`bf16_is_emulated`: a user
    who asked for bf16 expects it to be faster than fp32, and where it is emulated it is far slower."""
    if bf16_is_emulated():
        warnings.warn(
            f"{task} in bfloat16 on a CPU without bf16 products ({', '.join(sorted(BF16_FLAGS))} in /proc/cpuinfo): "
            "PyTorch emulates them, many times slower than float32; use float32 on this machine",
            stacklevel=3,
        )


@functools.cache
def bf16_speedup(n: int = 1024, repeats: int = 5) -> float:
    """fp32 time / bf16 time of an ``n × n`` by ``n × n`` matrix product on this CPU (:func:`matmul_seconds`);
    about 0.1 s where bf16 is native. Do not call it where bf16 is emulated."""
    return matmul_seconds(n, torch.float32, repeats) / matmul_seconds(n, torch.bfloat16, repeats)


def matmul_seconds(n: int, dtype: torch.dtype, repeats: int) -> float:
    """Median seconds of an ``n × n`` by ``n × n`` matrix product in ``dtype`` (after one warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tune_cpu_training() -> dict[str, bool]:
    """Both settings of this module, as ``vaswani train`` and ``vaswani demo`` use on a CPU."""
    return {"allocator": tune_allocator(), "flush_denormals": flush_denormals()}


#: ``VASWANI_TUNE_CPU=0`` keeps models from applying these settings when they start training or decoding.
TUNE_ENV = "VASWANI_TUNE_CPU"
_tuned: set[str] = set()


def _tune_once(purpose: str, device: torch.device, apply: Callable[[], object]) -> None:
    """``apply()`` the first time in this process that a model starts ``purpose`` on a CPU, unless
    ``VASWANI_TUNE_CPU=0``."""
    if purpose in _tuned or device.type != "cpu" or os.environ.get(TUNE_ENV, "1") == "0":
        return
    _tuned.add(purpose)
    apply()


def tune_cpu_training_once(device: torch.device) -> None:
    """:func:`tune_cpu_training`, the first time in this process that a model is put in training mode on a CPU,
    unless ``VASWANI_TUNE_CPU=0``: a user of transformers' ``Trainer`` or of a loop of their own then trains
    as ``vaswani train`` does (the allocator setting matters most where large buffers come and go each step)."""
    _tune_once("training", device, tune_cpu_training)


def tune_cpu_decoding_once(device: torch.device) -> None:
    """:func:`tune_allocator`, the first time in this process that a model generates on a CPU, unless
    ``VASWANI_TUNE_CPU=0``: every step of a search allocates its logits (hypotheses × vocabulary), activations
    and growing caches anew, and with glibc's defaults the kernel hands many of them back as fresh zeroed pages,
    one fault per 4 KiB. ``vaswani translate``, :func:`vaswani.translate.translate`, ``pipeline("translation")``
    and ``model.generate()`` all get it. Denormals are left alone: inference does not make them, and flushing
    them would change results."""
    _tune_once("decoding", device, tune_allocator)
