"""Faster linear layers for decoding on the CPU: float32 weights laid out once for oneDNN or MKL, or int8 products.

Speed machinery beside the paper's code: the model's modules are unchanged, and their ``nn.Linear`` s are swapped
for one of these when a model is loaded for translation (:func:`vaswani.translate.load_translation_model`).

* :class:`PackedLinear`: an ``nn.Linear`` whose float32 inference on the CPU uses a copy of the weight laid out
  once for the products' backend (:func:`product_backend`): oneDNN's inner product on the weight reordered into
  its blocked layout, or MKL's sgemm on the weight transposed. A plain ``F.linear`` lays the weight out for the
  kernel again on every call, which costs most at decoding's few rows per step (tens of hypotheses against a
  vocabulary-sized output layer). Same function, the sums taken in another order (differences around 1e-6); the
  model still trains and saves. Neither backend is the faster on every CPU (each picks its kernels by CPU model
  and instruction set; docs/performance.md has the measurements), so the faster is measured once per process.
  oneDNN compiles a kernel for every row count it multiplies and keeps the last 1,024; decoding's row counts
  (live hypotheses, source tokens per batch) vary from step to step and batch to batch, so its products pad their
  rows to a multiple of :data:`ROW_MULTIPLE` (:func:`padded_rows`): a few kernels, compiled once, instead of one per
  count, evicted and compiled again on a long or varied input.
* :class:`Int8Linear`: dynamic quantization, as CTranslate2's ``int8`` and torch's former ``quantize_dynamic``:
  weights symmetric with one scale per output row, activations symmetric with one scale per input row from the
  row's largest magnitude, the product in int32 (``torch._int_mm``), then the bias. torch 2.13 deprecates
  ``torch.ao.quantization.quantize_dynamic`` (its quantized tensor types are to be removed), so this uses plain
  int8 tensors. Rounding costs some accuracy: measure the BLEU cost on your own data
  (``benchmarks/translate_bench.py`` does on Multi30k).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from functools import cache

import torch
from torch import nn

#: The largest magnitude of a symmetric int8 value (-128 is left out so that negation stays in range).
INT8_MAX = 127.0


@cache
def can_prepack() -> bool:
    """Whether this torch has oneDNN's prepacked float32 linear (x86 and ARM builds with mkldnn) and it runs."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        with torch.no_grad():
            product(torch.zeros(2, 8), (prepack(torch.zeros(4, 8), "onednn"), None), backend="onednn")
    except (RuntimeError, AttributeError):
        return False
    return True


#: The backends of the float32 CPU products, as ``VASWANI_CPU_PRODUCTS`` names them.
PRODUCT_BACKENDS = ("onednn", "mkl")

#: MKL is chosen when its product takes at most 1 - this of oneDNN's time (a clear win, not noise).
MKL_MARGIN = 0.05


@cache
def product_backend() -> str:
    """Where the float32 CPU products run: ``"onednn"`` or ``"mkl"`` (see the module). ``VASWANI_CPU_PRODUCTS``
    chooses; unset, the one whose kernels are the faster on this CPU, measured once per process
    (:func:`measure_backends`, :func:`faster_backend`), or oneDNN where this torch has no MKL."""
    name = os.environ.get("VASWANI_CPU_PRODUCTS", "").strip().lower()
    if name and name not in PRODUCT_BACKENDS:
        raise ValueError(f"VASWANI_CPU_PRODUCTS={name!r} is not a backend: use one of {', '.join(PRODUCT_BACKENDS)}, "
                         "or leave it unset to use the faster on this CPU")
    if name == "mkl" and not torch.backends.mkl.is_available():
        raise ValueError("VASWANI_CPU_PRODUCTS=mkl, but this torch has no MKL: use onednn, or leave it unset")
    if name:
        return name
    return faster_backend(measure_backends()) if torch.backends.mkl.is_available() else "onednn"


def faster_backend(seconds: dict[str, float]) -> str:
    """``"mkl"`` if its products took at most 1 - :data:`MKL_MARGIN` of oneDNN's time, else ``"onednn"``."""
    return "mkl" if seconds["mkl"] <= (1 - MKL_MARGIN) * seconds["onednn"] else "onednn"


#: The products :func:`measure_backends` times: (in, out) features of a decoder's feed-forward layers and of an
#: output layer, for :data:`MEASURED_ROWS` rows (a step of beam search over a batch).
MEASURED_FEATURES = ((512, 2048), (2048, 512), (512, 4096))
MEASURED_ROWS = 128


def measure_backends(rounds: int = 5) -> dict[str, float]:
    """The median seconds of :data:`MEASURED_FEATURES`' products with each backend, the two taking turns (a
    few tenths of a second in all), on one thread: what differs between CPUs is the backends' kernels. Timed
    alone, a backend's products with more threads did not predict a translation's speed (benchmarks/HISTORY.md),
    and the choice holds for any thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _median_seconds(rounds)
    finally:
        torch.set_num_threads(threads)


def _median_seconds(rounds: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    layers = []
    for features_in, features_out in MEASURED_FEATURES:
        x = torch.randn(MEASURED_ROWS, features_in, generator=generator)
        weight, bias = torch.randn(features_out, features_in, generator=generator), torch.zeros(features_out)
        layers.append((x, {backend: (prepack(weight, backend), bias) for backend in PRODUCT_BACKENDS}))
    seconds: dict[str, list[float]] = {backend: [] for backend in PRODUCT_BACKENDS}
    with torch.no_grad():
        for _ in range(rounds + 1):  # the first round warms up
            for backend in PRODUCT_BACKENDS:
                start = time.perf_counter()
                for x, packed in layers:
                    product(x, packed[backend], backend=backend)
                seconds[backend].append(time.perf_counter() - start)
    return {backend: statistics.median(times[1:]) for backend, times in seconds.items()}


#: A weight laid out for the products (:func:`prepack`) and its bias.
Packed = tuple[torch.Tensor, torch.Tensor | None]


def prepack(weight: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``weight`` (``[out, in]``) laid out once for :func:`product` with ``backend`` (default
    :func:`product_backend`): reordered into oneDNN's blocked layout, or transposed (``[in, out]``) for MKL."""
    if (backend or product_backend()) == "mkl":
        return weight.detach().t().contiguous()
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


#: oneDNN's products in :func:`product` and :func:`product_plus` run over a multiple of this many rows.
ROW_MULTIPLE = 16


def row_multiple() -> int:
    """What :func:`product_backend`'s products want their row counts to be a multiple of: :data:`ROW_MULTIPLE`
    for oneDNN, 1 for MKL, which compiles nothing per row count (padding would only add rows to multiply)."""
    return ROW_MULTIPLE if product_backend() == "onednn" else 1


def padded_rows(x: torch.Tensor, multiple: int = ROW_MULTIPLE) -> torch.Tensor:
    """``x`` (2-D) with zero rows appended up to a multiple of ``multiple`` (``x`` itself if it is one)."""
    extra = -x.shape[0] % multiple
    return torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra else x


def padded_empty(rows: int, columns: int, like: torch.Tensor, multiple: int = ROW_MULTIPLE) -> torch.Tensor:
    """A ``[rows, columns]`` tensor (``like``'s dtype and device) to be written, followed by zero rows up to a
    multiple of ``multiple``, as :func:`padded_rows` would give it."""
    out = like.new_empty(rows + -rows % multiple, columns)
    out[rows:].zero_()
    return out


def product(x: torch.Tensor, packed: Packed, activation: str = "none", backend: str | None = None) -> torch.Tensor:
    """``activation(x Wᵀ + b)`` for the rows of ``x`` (``"none"`` or ``"relu"``; oneDNN applies it inside the
    product), with ``backend`` (default :func:`product_backend`, as the weight was laid out)."""
    weight, bias = packed
    if (backend or product_backend()) == "mkl":
        y = torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
        return y.relu_() if activation == "relu" else y
    return torch.ops.mkldnn._linear_pointwise(padded_rows(x), weight, bias, activation, [], "")[: x.shape[0]]


def product_plus(x: torch.Tensor, packed: Packed, residual: torch.Tensor) -> torch.Tensor:
    """``residual + x Wᵀ + b``, the residual added by the product itself (oneDNN's sum, MKL's beta = 1)."""
    weight, bias = packed
    if product_backend() == "mkl":
        y = torch.addmm(residual, x, weight)
        return y if bias is None else y.add_(bias)
    return torch.ops.mkldnn._linear_pointwise.binary(
        padded_rows(x), padded_rows(residual), weight, bias, "add"
    )[: x.shape[0]]


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (the same parameters: saved, tied and trained as before) that, when no gradient is
    wanted, multiplies float32 CPU inputs with a copy of its weight laid out for the products (:func:`prepack`).
    The copy is made on first use and again whenever the weight (an optimizer step, ``load_state_dict``,
    ``to()``) or the backend has changed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)) or not (
            x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
        ):
            return super().forward(x)
        key = (product_backend(), weight.data_ptr(), weight._version)
        if getattr(self, "_packed_key", None) != key:
            self._packed = prepack(weight)
            self._packed_key = key
        bias = None if self.bias is None else self.bias.detach()
        y = product(x.reshape(-1, self.in_features), (self._packed, bias))
        return y.view(*x.shape[:-1], self.out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        """A ``PackedLinear`` holding ``linear``'s own parameter objects (so weight tying is kept)."""
        packed = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        packed.weight, packed.bias = linear.weight, linear.bias
        return packed


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (2-D, float) as int8 with one scale per row: ``x ≈ scale · q``; returns ``(q, scale [rows, 1])``."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX
    return torch.round(x / scale).to(torch.int8), scale


class Int8Linear(nn.Module):
    """An ``nn.Linear`` for inference with int8 weights (per output row) and int8 activations (per input row)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", weight.t().contiguous())  # [in, out]: _int_mm's right operand
        self.register_buffer("weight_scale", scale.view(1, -1))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        q, scale = quantize_rows(rows)
        y = torch._int_mm(q, self.weight_t).float() * (scale * self.weight_scale)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """Every ``nn.Linear`` in ``model`` (the tied output layer included) replaced by ``make(linear)``, in place.
    Returns ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))
    return model


def pack_linear_layers(model: nn.Module) -> nn.Module:
    """``model`` with every linear layer a :class:`PackedLinear` (in place; unchanged where :func:`can_prepack`
    is False). It saves, converts and trains as before; inference in float32 on the CPU gets faster. The products'
    backend is chosen here (:func:`product_backend`), not in the first translation. Returns ``model``."""
    if not can_prepack():
        return model
    product_backend()
    return _replace_linears(model, PackedLinear.from_linear)


def quantize_linear_layers(model: nn.Module) -> nn.Module:
    """Every linear layer of ``model`` an :class:`Int8Linear`, and ``model`` in eval mode (CPU; for decoding
    only: it no longer trains or saves). Returns ``model``."""
    return _replace_linears(model.eval(), Int8Linear)
