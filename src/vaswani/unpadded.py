"""Training speed paths beside the paper's model: no work on padding, a cheaper CPU dropout, Eq. 1 written out.

Each computes what :mod:`.modeling` computes without it (tests/test_unpadded.py holds the equivalence tests):

* :class:`Unpadded`: in training every piece but attention acts on each position alone, so those pieces run on
  the real tokens of a padded batch only, a ``[tokens, d_model]`` matrix. Only ``MultiHeadAttention`` and the
  two stacks see it: the stacks unpad their input and pad their output, and attention receives the
  :class:`Unpadded` through the keyword arguments that reach it (as transformers passes ``cu_seq_lens``).
* :func:`apply_dropout`: dropout (§5.4) with a few random bits per element instead of one random number.
* :func:`explicit_attention_is_faster`: when "sdpa" training computes Eq. 1 as written instead of torch's fused
  kernel, whose backward pass is slow on a CPU for sentence-length sequences.

This file is copied next to a saved model (``modeling.py`` imports it), so it imports only torch and transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.utils import is_torchdynamo_compiling

# ----------------------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------------------


def apply_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Dropout (§5.4): zero each element with probability ``p`` and scale the rest by 1 / (1 - p).

    On a CPU torch draws one random number per element, one at a time, which can take a large share of a small
    model's training step. Here each 64-bit random number gives four 16-bit draws, and an element is dropped
    when its draw falls in the lowest ``p`` share of the 2^16 values (``p`` rounded to a multiple of 2^-16); the
    kept ones are multiplied by a mask of 0 and 1 / (1 - p). The same seeded generator decides, so runs repeat.
    Other devices keep torch's fused kernel.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    draws = bits.view(torch.int16)[: x.numel()].view(x.shape)
    kept = draws >= round(p * 2**16) - 2**15
    return x * kept.to(x.dtype).mul_(1.0 / (1.0 - p))  # the backward pass multiplies by the same mask


class FastDropout(nn.Dropout):
    """``nn.Dropout`` computed by :func:`apply_dropout` (fewer random draws on a CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_dropout(x, self.p, self.training)


# ----------------------------------------------------------------------------------------------------------
# Eq. 1 written out in CPU training
# ----------------------------------------------------------------------------------------------------------

#: Longest key sequence for which "sdpa" training on a CPU computes Eq. 1 as written (see below).
EXPLICIT_ATTENTION_MAX_KEYS = 128


def explicit_attention_is_faster(query: torch.Tensor, key: torch.Tensor) -> bool:
    """On a CPU, torch's fused attention (flash attention for CPU) has a slow backward pass for sentence-length
    sequences, slower than the written-out formula (and by more in bf16 than in fp32) up to about
    :data:`EXPLICIT_ATTENTION_MAX_KEYS` keys. So when gradients are needed, "sdpa" computes Eq. 1 as written for
    keys up to that length: the same function, rounded differently (softmax in fp32). Inference (no gradients)
    and longer sequences keep torch's kernel, which is faster there (measurements:
    benchmarks/results/speed_paths.md)."""
    return (
        query.device.type == "cpu"
        and query.requires_grad
        and torch.is_grad_enabled()
        and key.shape[-2] <= EXPLICIT_ATTENTION_MAX_KEYS
        and not is_torchdynamo_compiling()
    )


def additive_mask(
    mask: torch.Tensor | None, is_causal: bool, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """An sdpa-style mask (boolean, True = attend; or None, causal when ``is_causal``) as the additive float
    mask the written-out attention adds to the scores."""
    if mask is None and is_causal and q_len > 1:
        positions = torch.arange(kv_len, device=device)
        mask = positions[None, :] <= positions[kv_len - q_len :, None]  # query i sees keys up to its position
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(
        mask.logical_not(), torch.finfo(torch.float32).min
    )


def swap_batch_and_heads(x: torch.Tensor | None) -> torch.Tensor | None:
    """``[batch, heads, ...]`` ↔ ``[heads, batch, ...]`` for 4-d tensors (a 2-d mask broadcasts either way)."""
    return x.transpose(0, 1) if x is not None and x.dim() == 4 else x


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` itself (not a subclass such as a LoRA or quantized layer) without hooks: one whose
    product a speed path may compute from its weights."""
    hooks = module._forward_hooks or module._forward_pre_hooks
    return type(module) is nn.Linear and not hooks


# ----------------------------------------------------------------------------------------------------------
# Training without the padding
# ----------------------------------------------------------------------------------------------------------


class Unpadded:
    """The real (non-padding) positions of a padded batch, for training without computing on the padding.

    Everything but attention acts on each position alone (the Q/K/V/output projections, the feed-forward
    network, add & norm, dropout), so in training those pieces can run on the real tokens only, a
    ``[tokens, d_model]`` matrix, and skip the padding a batch of unequal sentences carries. Attention works on
    the padded ``[batch, len, ...]`` layout: the projected queries, keys and values are padded into it and the
    attended values unpadded again. The results at real positions are those of the padded computation; the
    outputs at padding positions are zeros.
    """

    #: The row count of unpadded tensors is rounded up to a multiple of this with padding positions (computed,
    #: never read), so that the memory allocator sees a few sizes again and again instead of a new size at every
    #: step.
    rows_multiple = 64

    def __init__(self, real_tokens: torch.Tensor) -> None:
        self.shape = tuple(real_tokens.shape)
        real_tokens = real_tokens.flatten()
        index = real_tokens.nonzero().squeeze(-1)
        self.padding = real_tokens.logical_not().nonzero().squeeze(-1)
        extra = -index.numel() % self.rows_multiple
        if extra:
            index = torch.cat([index, self.padding[:extra]])
        self.index = index

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, len, ...]`` → ``[tokens, ...]``."""
        return _UnpadRows.apply(x.flatten(0, 1), self)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, ...]`` → ``[batch, len, ...]`` with zeros at the padding positions."""
        return _PadRows.apply(x, self)

    def pad_heads(self, x: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
        """``[tokens, parts · heads · d_k]`` (projections side by side) → ``parts`` tensors ``[batch, heads,
        len, d_k]``, stored heads outermost (``[heads, batch, len, d_k]``) so that attention's batched matrix
        products read them in place: one copy instead of a padding and a copy per part into the head layout."""
        return _PadHeads.apply(x, self, parts, heads)

    def scatter(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[tokens, ...]`` → ``[batch · len, ...]`` without autograd: each row to its position, and zeros
        written only at the padding positions (not first over the whole tensor). ``out`` (in any memory
        layout) receives the result; by default a new contiguous tensor."""
        if out is None:
            out = x.new_empty(self.shape[0] * self.shape[1], *x.shape[1:])
        return out.index_copy_(0, self.index, x).index_fill_(0, self.padding, 0)


class _UnpadRows(torch.autograd.Function):
    """Rows ``unpadded.index`` of ``[positions, ...]``; the gradient goes back with :meth:`Unpadded.scatter`,
    laid out in memory as the input was (attention's outputs are stored heads outermost)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, unpadded: Unpadded) -> torch.Tensor:
        ctx.unpadded, ctx.layout = unpadded, (x.shape, x.stride())
        return x.index_select(0, unpadded.index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.new_empty_strided(*ctx.layout)
        return ctx.unpadded.scatter(grad, out), None


class _PadRows(torch.autograd.Function):
    """:meth:`Unpadded.scatter` with autograd, shaped ``[batch, len, ...]``: the gradient is the rows
    ``unpadded.index`` of the output's. The output is a tensor of its own, not a view (FSDP2 warns of views)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, unpadded: Unpadded) -> torch.Tensor:
        ctx.unpadded = unpadded
        out = x.new_empty(*unpadded.shape, *x.shape[1:])
        unpadded.scatter(x, out.flatten(0, 1))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.flatten(0, 1).index_select(0, ctx.unpadded.index), None


class _PadHeads(torch.autograd.Function):
    """:meth:`Unpadded.pad_heads`: the unpadded rows scattered into ``[parts, heads, batch · len, d_k]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, unpadded: Unpadded, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
        ctx.unpadded = unpadded
        batch, length = unpadded.shape
        padded = x.new_empty(parts, heads, batch * length, x.shape[-1] // (parts * heads))
        unpadded.scatter(x.view(x.shape[0], parts, heads, -1), out=padded.permute(2, 0, 1, 3))
        return tuple(part.view(heads, batch, length, -1).transpose(0, 1) for part in padded)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor, None, None, None]:
        index, given = ctx.unpadded.index, [grad for grad in grads if grad is not None]
        batch, heads, length, head_dim = given[0].shape
        new = given[0].new_empty if len(given) == len(grads) else given[0].new_zeros
        rows = new(index.numel(), len(grads), heads, head_dim)
        for part, grad in enumerate(grads):
            if grad is not None:  # [batch, heads, len, d_k] → rows [batch · len, heads, d_k]
                torch.index_select(grad.transpose(1, 2).flatten(0, 1), 0, index, out=rows[:, part])
        return rows.flatten(1), None, None, None


#: Padding is removed when at least this share of the positions is padding (below it there is little to save;
#: benchmarks/results/speed_paths.md has the measurements).
UNPAD_MIN_PADDING = 0.125


def unpadded_for(real_tokens: torch.Tensor | None, training: bool, kwargs: dict) -> Unpadded | None:
    """An :class:`Unpadded` of the positions ``real_tokens`` marks (``[batch, len]``) where removing the padding
    pays: in training, when at least :data:`UNPAD_MIN_PADDING` of the positions are padding, outside
    ``torch.compile`` and when no per-layer outputs are recorded."""
    if not training or real_tokens is None or real_tokens.dim() != 2 or is_torchdynamo_compiling():
        return None
    if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        return None
    real_tokens = real_tokens.bool()
    count = int(real_tokens.sum())
    if count == 0 or count > (1.0 - UNPAD_MIN_PADDING) * real_tokens.numel():  # nothing to compute, or little to save
        return None
    return Unpadded(real_tokens)


def up_to_last_real(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[batch, len]`` mask → True at every position up to the row's last True one: the target positions the
    decoder must compute, since causal self-attention lets only later positions read a position."""
    if mask is None or mask.dim() != 2:
        return mask
    return mask.bool().flip(-1).cummax(-1).values.flip(-1)
