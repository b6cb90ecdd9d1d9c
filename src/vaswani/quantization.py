"""Int8 inference: every linear layer of a trained model as an 8-bit integer matrix product.

Speed machinery beside the paper's code (the model's modules are unchanged; their ``nn.Linear`` s are swapped).
The scheme is dynamic quantization as in CTranslate2's ``int8`` and torch's former ``quantize_dynamic``:

* weights: symmetric, one scale per output row, ``W ≈ scale_w · W_int8`` with ``W_int8`` in [-127, 127];
* activations: symmetric, one scale per input row, computed at run time from the row's largest magnitude;
* ``x W^T ≈ scale_x · scale_w · (x_int8 W_int8^T)``, the product in int32 (``torch._int_mm``), then the bias.

torch 2.13 deprecates ``torch.ao.quantization.quantize_dynamic`` (its quantized tensor types are to be removed),
so this module quantizes with plain int8 tensors instead. Rounding costs some accuracy: measure the BLEU cost
on your own data (``benchmarks/translate_bench.py`` does on Multi30k).
"""

from __future__ import annotations

import torch
from torch import nn

#: The largest magnitude of a symmetric int8 value (-128 is left out so that negation stays in range).
INT8_MAX = 127.0


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
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        q, scale = quantize_rows(rows)
        y = torch._int_mm(q, self.weight_t).float() * (scale * self.weight_scale)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linear_layers(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (in place; the tied output layer included) by an
    :class:`Int8Linear` and put it in eval mode: for decoding only (int8 weights take no gradient).
    Returns ``model``."""
    model.eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child))
    return model
