"""Label-smoothed cross-entropy (Vaswani et al. 2017, §5.4: ε_ls = 0.1).

Convention: the smoothing mass ε is spread uniformly over the *whole* vocabulary, target included, so the
target class gets ``1 - ε + ε/V`` and every other class ``ε/V``. Per token the loss is
``(1 - ε) · NLL + ε · mean_v(-log p_v)``. This is the convention of ``torch.nn.functional.cross_entropy(
label_smoothing=ε)`` and of transformers' ``LabelSmoother``; fairseq and tensor2tensor instead give the
target ``1 - ε`` and each other class ``ε/(V-1)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..losses import token_cross_entropy


def label_smoothed_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float = 0.1,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Label-smoothed cross-entropy of ``logits`` (``(..., V)``) against ``labels`` (``(...)``), in fp32.

    The per-token losses of positions whose label is not ``ignore_index`` are summed and divided by
    ``num_items_in_batch`` when given (the Trainer's count of target tokens over all gradient-accumulation
    micro-batches), else by the number of non-ignored tokens (0 if there are none). Labels must already be
    aligned with the logits (no shift; for an encoder-decoder the decoder inputs are the shifted ones).
    The model's own loss (``labels=..., smoothing=ε``) is this function.
    """
    return token_cross_entropy(logits, labels, num_items_in_batch, epsilon, ignore_index)


def make_compute_loss_func(epsilon: float = 0.1, ignore_index: int = -100) -> Callable[..., torch.Tensor]:
    """``Trainer(compute_loss_func=...)`` applying ``label_smoothed_cross_entropy`` to ``outputs.logits``.

    The Trainer pops ``labels`` before calling the model and passes them here with ``num_items_in_batch``.
    """

    def compute_loss(
        outputs: Any, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return label_smoothed_cross_entropy(logits, labels, epsilon, ignore_index, num_items_in_batch)

    return compute_loss
