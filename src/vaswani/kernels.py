"""Native kernels for one decoding step on the CPU: attention at one position (§3.2.1, Eq. 1) in one call, and
beam search's best continuations (§6.1) without writing a log-softmax over the vocabulary.

Speed machinery beside the paper's code (:mod:`vaswani.fused_decoder` uses it). At one position a decoder layer's
attention is a few queries per sentence against tens of keys: torch runs it as six operations (two products, the
scaling, the mask, the softmax, a copy into the layer's rows), each with a fixed cost per call and a pass over its
operands, and the matrix library packs these small operands before multiplying them. ``kernels.c`` computes the
same numbers in one pass per sentence and head, written straight into the layer's rows. In masked self-attention
it also reads only the keys a hypothesis' own prefix holds (one per position, :func:`attend_slots`), where torch
masks the keys of all k beam slots. Beam search needs each hypothesis' few best next tokens and their
log-probabilities: :func:`log_softmax_top_k` reads each row of logits three times (maximum, normalizer, best
columns) and writes only those, where torch writes the whole log-softmax back and then searches it.

The C source is compiled at first use with the machine's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``)
for the machine's own CPU, cached under ``$VASWANI_CACHE`` (default ``~/.cache/vaswani``), and loaded with ctypes.
Without a compiler, or with ``VASWANI_KERNELS=0``, :func:`available` is False and the callers keep their torch
code. The sums are taken in another order than torch's (differences around 1e-6).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")

#: Compiler flags, best first: the CPU's own instructions and OpenMP threads, then plain optimized code. Without
#: -fno-trapping-math the compiler keeps a branch per element where kernels.c selects between two values (a
#: comparison may raise a floating-point exception flag), and the exponential's loops stay scalar.
FLAGS = (("-O3", "-march=native", "-fopenmp", "-fno-trapping-math"), ("-O3", "-fno-trapping-math"))

_ARGUMENTS = {
    # q, its strides; k, v, their strides; ancestry, its strides; out, its strides; sizes; scale
    "attend_slots": "P LLL PP LLLL P LLL P LLL IIIII F",
    # q, its strides; k, v, their strides; allowed, additive, the mask's strides; out, its strides; sizes; scale
    "attend_keys": "P LLL PP LLL PP LLLL P LLL IIIII F",
    # logits, row stride; rows, vocab, k; skip, skip column; values, columns, normalizers
    "log_softmax_top_k": "P L III P L PPP",
}
_CTYPES = {"P": ctypes.c_void_p, "L": ctypes.c_int64, "I": ctypes.c_int, "F": ctypes.c_float}


def cache_folder() -> Path:
    """Where compiled kernels are kept: ``$VASWANI_CACHE/kernels``, else ``~/.cache/vaswani/kernels``."""
    if os.environ.get("VASWANI_CACHE"):
        return Path(os.environ["VASWANI_CACHE"]) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vaswani" / "kernels"


def available() -> bool:
    """Whether the kernels can be used here (compiled and loaded, and not turned off with ``VASWANI_KERNELS=0``)."""
    return os.environ.get("VASWANI_KERNELS", "1") != "0" and library() is not None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built at the first call, then taken from :func:`cache_folder`), or None where no C
    compiler builds them (logged once)."""
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found ($CC, cc, gcc, clang): decoding uses torch's operations only")
        return None
    errors = []
    for flags in FLAGS:
        try:
            return _declared(ctypes.CDLL(str(_built(compiler, flags))))
        except (OSError, subprocess.CalledProcessError) as error:
            errors.append(getattr(error, "stderr", None) or str(error))
    logger.warning("could not build vaswani's decoding kernels with %s, so decoding uses torch's operations only:\n%s",
                   compiler, errors[-1].strip())
    return None


def _compiler() -> str | None:
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def _built(compiler: str, flags: tuple[str, ...]) -> Path:
    """The shared library compiled from :data:`SOURCE` with ``flags``: one per source, compiler, flags and CPU
    (``-march=native`` code runs only where it was built), written under a temporary name and then renamed, so
    that processes building at once never load a half-written file."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu().encode()]))
    target = cache_folder() / f"kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            command = [compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(built), "-lm"]
            subprocess.run(command, check=True, capture_output=True, text=True)
            os.replace(built, target)
    return target


def _cpu() -> str:
    """The CPU's model and features (Linux), else what the platform module says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    return "".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _declared(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, signature in _ARGUMENTS.items():
        function = getattr(lib, name)
        function.argtypes = [_CTYPES[code] for code in signature.replace(" ", "")]
        function.restype = None
    return lib


def _check(out: torch.Tensor, *tensors: torch.Tensor) -> None:
    """What the C code assumes: float32 CPU tensors whose last dimension is contiguous."""
    for tensor in (out, *tensors):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or tensor.stride(-1) != 1:
            raise ValueError(f"the kernels take float32 CPU tensors with a contiguous last dimension, not "
                             f"{tensor.dtype} on {tensor.device} with strides {tensor.stride()}")


def attend_slots(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ancestry: torch.Tensor, positions: int,
    out: torch.Tensor,
) -> None:
    """Masked self-attention at one position (§3.2.3) over beam slots, written into ``out``: query
    ``[sentences, heads, b, d_k]`` row b of sentence s attends, at each position p < ``positions``, to the key and
    value of slot ``ancestry[s, b, p]`` of ``keys`` / ``values`` (``[sentences, heads, steps, slots, d_k]``), the
    slot its own prefix held there. ``out`` is shaped like ``query``."""
    _check(out, query, keys, values)
    if ancestry.dtype != torch.int64 or keys.stride() != values.stride() or positions > keys.shape[2]:
        raise ValueError("attend_slots takes int64 ancestry, keys and values laid out alike, positions ≤ steps")
    sentences, heads, queries, d_k = query.shape
    library().attend_slots(
        query.data_ptr(), *query.stride()[:3], keys.data_ptr(), values.data_ptr(), *keys.stride()[:4],
        ancestry.data_ptr(), *ancestry.stride(), out.data_ptr(), *out.stride()[:3],
        sentences, heads, queries, positions, d_k, d_k**-0.5,
    )


def attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor
) -> None:
    """Attention (§3.2.1, Eq. 1) of each sentence's queries ``[sentences, heads, queries, d_k]`` over its keys and
    values ``[sentences, heads, keys, d_k]``, written into ``out`` (shaped like ``query``); ``mask`` boolean (True
    = attend) or additive, broadcastable to ``[sentences, heads, queries, keys]``, or None."""
    _check(out, query, keys, values)
    if keys.stride() != values.stride():
        raise ValueError("attend takes keys and values laid out alike")
    sentences, heads, queries, d_k = query.shape
    length = keys.shape[2]
    allowed = additive = None
    strides = (0, 0, 0, 0)
    if mask is not None:
        strides = mask.expand(sentences, heads, queries, length).stride()
        if mask.dtype == torch.bool:
            allowed = mask.data_ptr()
        elif mask.dtype == torch.float32:
            additive = mask.data_ptr()
        else:
            raise ValueError(f"attend takes a boolean or float32 mask, not {mask.dtype}")
    library().attend_keys(
        query.data_ptr(), *query.stride()[:3], keys.data_ptr(), values.data_ptr(), *keys.stride()[:3],
        allowed, additive, *strides, out.data_ptr(), *out.stride()[:3],
        sentences, heads, queries, length, d_k, d_k**-0.5,
    )


def log_softmax_top_k(
    logits: torch.Tensor, count: int, skip: torch.Tensor | None = None, skip_column: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's ``count`` best columns of ``log_softmax(logits)`` (``[rows, vocab]``): their log-probabilities
    and columns (``[rows, count]``, best first; among equal values the first column), and each row's normalizer
    log Σ exp(logits) (``[rows]``). In rows where ``skip`` (boolean, ``[rows]``) is True, ``skip_column`` is not
    chosen (it still counts in the normalizer)."""
    _check(logits)
    rows, vocab = logits.shape
    if not 0 < count <= vocab:
        raise ValueError(f"log_softmax_top_k chooses 1 to {vocab} columns, not {count}")
    if skip is not None:
        skip = skip.to(torch.bool).contiguous()
    values = torch.empty(rows, count)
    columns = torch.empty(rows, count, dtype=torch.int64)
    normalizers = torch.empty(rows)
    library().log_softmax_top_k(
        logits.data_ptr(), logits.stride(0), rows, vocab, count, None if skip is None else skip.data_ptr(),
        skip_column, values.data_ptr(), columns.data_ptr(), normalizers.data_ptr(),
    )
    return values, columns, normalizers
