"""The training loss: label-smoothed cross-entropy (§5.4) of the next target token, and the output layer with it.

:func:`token_cross_entropy` is the model's loss; :func:`output_layer_cross_entropy` computes the pre-softmax
projection (§3.4) and the loss as one step for a training step that needs no logits. On a CPU both run blocks of
rows that stay in the processor's cache (:class:`SmoothedCrossEntropy`, :class:`OutputLayerCrossEntropy`) instead
of passing over the ``[tokens × V]`` logits several times; elsewhere they are torch's ``F.cross_entropy``.
tests/test_losses.py checks them against it.

This file is copied next to a saved model (``modeling.py`` imports it), so it imports only torch, transformers
and its sibling ``unpadded.py``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.utils import is_torchdynamo_compiling

from .unpadded import is_plain_linear


class SmoothedCrossEntropy(torch.autograd.Function):
    """Summed label-smoothed cross-entropy of ``[tokens, V]`` logits, computed a block of rows at a time.

    Per token, with p = softmax(x) and the target distribution q = (1 - ε)·onehot(y) + ε/V:
    loss = -Σ q·log p = -(1 - ε)·log p_y - ε·mean(log p), and d loss / d x = p - q. The forward keeps only
    log Σ exp(x) per row, the backward recomputes p from it, and each block of rows stays in the CPU cache
    (fewer passes over memory than ``F.cross_entropy(x.float(), label_smoothing=ε)``). Labels equal to
    ``ignore_index`` contribute nothing.
    """

    rows_per_block = 128

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, epsilon: float, ignore_index: int) -> torch.Tensor:
        kept, labels = SmoothedCrossEntropy._kept_labels(labels, ignore_index)
        log_normalizer = logits.new_empty(logits.shape[0], dtype=torch.float32)
        token_loss = torch.empty_like(log_normalizer)
        for rows in SmoothedCrossEntropy._blocks(logits.shape[0]):
            x = logits[rows].float()
            log_p = torch.log_softmax(x, dim=-1)
            log_normalizer[rows] = x[:, 0] - log_p[:, 0]
            token_loss[rows] = SmoothedCrossEntropy._token_loss(log_p, labels[rows], epsilon)
        ctx.save_for_backward(logits, labels, kept, log_normalizer)
        ctx.epsilon = epsilon
        return (token_loss * kept).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits, labels, kept, log_normalizer = ctx.saved_tensors
        weight = (grad_total.float() * kept).unsqueeze(-1)
        grad = torch.empty_like(logits)
        in_place = logits.dtype == torch.float32  # else p is an fp32 block (type promotion), cast on the way out
        for rows in SmoothedCrossEntropy._blocks(logits.shape[0]):
            p = torch.sub(logits[rows], log_normalizer[rows].unsqueeze(-1), out=grad[rows] if in_place else None)
            SmoothedCrossEntropy._gradient(p.exp_(), labels[rows], ctx.epsilon, weight[rows])
            if not in_place:
                grad[rows] = p
        return grad, None, None, None

    @staticmethod
    def _blocks(n: int) -> list[slice]:
        step = SmoothedCrossEntropy.rows_per_block
        return [slice(start, start + step) for start in range(0, n, step)]

    @staticmethod
    def _kept_labels(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which labels count, and the labels as ``[tokens, 1]`` indices (ignored ones pointing at class 0)."""
        kept = labels != ignore_index
        return kept, labels.masked_fill(~kept, 0).unsqueeze(-1)

    @staticmethod
    def _token_loss(log_p: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
        """-(1 - ε)·log p_y - ε·mean(log p) of each row of a block."""
        return -(1.0 - epsilon) * log_p.gather(1, labels).squeeze(1) - epsilon * log_p.mean(1)

    @staticmethod
    def _gradient(
        p: torch.Tensor, labels: torch.Tensor, epsilon: float, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(p - q)·weight in place: the gradient of a block's loss (weighted per row, if given) by its logits."""
        if epsilon:
            p.sub_(epsilon / p.shape[-1])
        p.scatter_add_(1, labels, p.new_full((1, 1), -(1.0 - epsilon)).expand(p.shape[0], 1))
        return p if weight is None else p.mul_(weight)


class OutputLayerCrossEntropy(torch.autograd.Function):
    """The pre-softmax projection (§3.4) and :class:`SmoothedCrossEntropy` as one step, for training steps that
    need the loss but not the logits (``skip_logits``).

    The forward computes the logits x = h Wᵀ (+ b), then, a block of rows at a time, the loss and already its
    gradient by the logits, G = p - q, written over the block's logits while they are in the CPU cache. The
    backward only scales: dh = s·G W, dW = s·Gᵀ h, db = s·Σ G. This saves the passes over the [tokens × V]
    logits that recomputing p from them takes.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        epsilon: float,
        ignore_index: int,
    ) -> torch.Tensor:
        kept, labels = SmoothedCrossEntropy._kept_labels(labels, ignore_index)
        grad = torch.mm(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())  # logits
        token_loss = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        in_place = grad.dtype == torch.float32  # else p is an fp32 block, cast on the way out
        for rows in SmoothedCrossEntropy._blocks(hidden.shape[0]):
            logits = grad[rows]
            log_p = torch.log_softmax(logits.float(), dim=-1)
            token_loss[rows] = SmoothedCrossEntropy._token_loss(log_p, labels[rows], epsilon)
            p = torch.exp(log_p, out=logits) if in_place else log_p.exp_()
            SmoothedCrossEntropy._gradient(p, labels[rows], epsilon)
            if not in_place:
                logits.copy_(p)
        grad.index_fill_(0, kept.logical_not().nonzero().squeeze(-1), 0)  # ignored labels: no gradient
        ctx.save_for_backward(hidden, weight, grad)
        ctx.has_bias = bias is not None
        return (token_loss * kept).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, grad = ctx.saved_tensors
        scale = grad_total.to(grad.dtype)
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        d_hidden = torch.mm(grad, weight).mul_(scale) if needs_hidden else None
        d_weight = torch.mm(grad.t(), hidden).mul_(scale) if needs_weight else None
        d_bias = grad.sum(0, dtype=torch.float32).mul_(scale).to(grad.dtype) if ctx.has_bias and needs_bias else None
        return d_hidden, d_weight, d_bias, None, None, None


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Sum of per-token cross-entropy (in fp32) over labels != ``ignore_index``, divided by
    ``num_items_in_batch`` when given, else by the number of those labels.

    With ``label_smoothing`` ε (§5.4, ε_ls = 0.1 in the paper) the target distribution puts ε/V on every
    class and 1 - ε + ε/V on the label, as ``torch.nn.functional.cross_entropy(label_smoothing=ε)`` does
    (fairseq and tensor2tensor give the label 1 - ε and the others ε/(V - 1)).
    """
    _check_loss_arguments(logits, labels, label_smoothing, "logits", "vocabulary")
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device)
    if is_torchdynamo_compiling() or flat_logits.device.type != "cpu":
        total = F.cross_entropy(
            flat_logits.float(),
            flat_labels,
            reduction="sum",
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )
    else:
        total = SmoothedCrossEntropy.apply(flat_logits, flat_labels, label_smoothing, ignore_index)
    return _per_item(total, labels, num_items_in_batch, ignore_index)


def output_layer_cross_entropy(
    output_layer: nn.Linear,
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``token_cross_entropy(output_layer(hidden_states), labels, ...)`` for a training step that needs no
    logits: :class:`OutputLayerCrossEntropy` where it applies (gradients on, a CPU, eager mode, a plain
    ``nn.Linear`` without hooks), else the two steps."""
    fused = (
        torch.is_grad_enabled()
        and hidden_states.device.type == "cpu"
        and not is_torchdynamo_compiling()
        and is_plain_linear(output_layer)
    )
    if not fused:
        logits = output_layer(hidden_states)
        return token_cross_entropy(logits, labels, num_items_in_batch, label_smoothing, ignore_index)
    _check_loss_arguments(hidden_states, labels, label_smoothing, "hidden states", "model")
    inputs = (hidden_states.reshape(-1, hidden_states.shape[-1]), output_layer.weight, output_layer.bias)
    if torch.is_autocast_enabled("cpu"):  # as autocast runs the linear layer: in its dtype
        dtype = torch.get_autocast_dtype("cpu")
        inputs = tuple(None if tensor is None else tensor.to(dtype) for tensor in inputs)
    with torch.autocast("cpu", enabled=False):
        total = OutputLayerCrossEntropy.apply(*inputs, labels.reshape(-1), label_smoothing, ignore_index)
    return _per_item(total, labels, num_items_in_batch, ignore_index)


def _check_loss_arguments(
    inputs: torch.Tensor, labels: torch.Tensor, label_smoothing: float, name: str, last_dimension: str
) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label smoothing epsilon must be in [0, 1), got {label_smoothing}")
    if labels.shape != inputs.shape[:-1]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but the {name} {tuple(inputs.shape)} need the same shape "
            f"without the {last_dimension} dimension; labels must align with decoder_input_ids "
            "(one per target position)."
        )


def _per_item(
    total: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """A summed loss divided by ``num_items_in_batch``, by default the number of labels != ``ignore_index``."""
    if num_items_in_batch is None:
        num_items_in_batch = (labels != ignore_index).sum()
    # no labelled token (all -100): the summed loss is 0, and so is its gradient, instead of 0 / 0 = NaN
    return total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
