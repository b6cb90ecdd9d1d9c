"""The decoder layer fused for decoding on the CPU: the same function in fewer, larger operations.

Speed machinery beside the paper's code: :class:`vaswani.modeling.DecoderLayer` stays the reading path. When beam
or greedy search computes one position at a time, a decoder layer multiplies a few rows (tens of hypotheses) by
seven weight matrices, and on a CPU much of a step goes to the operations between those products. A
:class:`FusedDecoderLayer` computes the same layer with

* the masked self-attention's Q, K and V projections (§3.2.2) as one product, their weights side by side;
* each sub-layer's residual connection (§3.1, x + Sublayer(x)) added inside the sub-layer's last product;
* the feed-forward network's ReLU (§3.3, Eq. 2) applied with its first product (inside it, with oneDNN);
* both attentions, a few queries per sentence, as Eq. 1 written out (:func:`attention`), not torch's fused kernel,
  or, where a C compiler built them, in one native call each (:mod:`vaswani.kernels`), the masked self-attention of
  beam search then reading only the keys of each hypothesis' own prefix;

with every weight laid out once for the products' backend (oneDNN or MKL), as
:class:`vaswani.cpu_linears.PackedLinear` does. The sums are taken in another order (differences around 1e-6).
It is a ``DecoderLayer`` with the same parameters, so it saves, trains and converts as before; it takes the
fused path only in eval mode without gradients, on float32 CPU tensors, one position at a time with a decoding
cache whose encoder-decoder keys and values are ready, and with plain linear layers (no adapters or hooks).
Everything else runs the layer's own ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .cpu_linears import (
    Packed,
    PackedLinear,
    can_prepack,
    padded_empty,
    padded_rows,
    prepack,
    product,
    product_backend,
    product_plus,
    row_multiple,
)
from .decoding import IncrementalDecoder, Segment
from .modeling import AddNorm, DecoderLayer

#: Attention implementations whose masks :func:`attention` reads as they are (boolean or additive).
FUSABLE_ATTENTION = ("eager", "sdpa")


def pack(*linears: nn.Linear) -> Packed:
    """The linear layers' weights side by side (their outputs concatenated), laid out for the products
    (:func:`vaswani.cpu_linears.prepack`), and their biases (None where they have none)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    bias = None if linears[0].bias is None else torch.cat([linear.bias.detach() for linear in linears])
    return prepack(weight), bias


@dataclass
class FusedWeights:
    """A decoder layer's weights for the fused path."""

    self_qkv: Packed
    self_out: Packed
    cross_q: Packed
    cross_out: Packed
    ffn_in: Packed
    ffn_out: Packed

    @classmethod
    def of(cls, layer: DecoderLayer) -> FusedWeights:
        q, k, v, self_out, cross_q, cross_out, ffn_in, ffn_out = _linears(layer)
        return cls(
            self_qkv=pack(q, k, v),
            self_out=pack(self_out),
            cross_q=pack(cross_q),
            cross_out=pack(cross_out),
            ffn_in=pack(ffn_in),
            ffn_out=pack(ffn_out),
        )


def _linears(layer: DecoderLayer) -> tuple[nn.Linear, ...]:
    """The linear layers the fused path multiplies with: self-attention Q, K, V, W^O; encoder-decoder Q, W^O; W1, W2."""
    self_attn, cross = layer.self_attn, layer.encoder_attn
    return (self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.out_proj, cross.q_proj, cross.out_proj,
            layer.feed_forward.fc1, layer.feed_forward.fc2)


def _is_plain(linear: nn.Module) -> bool:
    return type(linear) in (nn.Linear, PackedLinear) and not (linear._forward_hooks or linear._forward_pre_hooks)


def _weights_key(layer: DecoderLayer) -> tuple | None:
    """What the fused weights were made from (None if a linear layer is not plain): a changed weight (an optimizer
    step, ``load_state_dict``, ``to()``), a replaced layer or another products' backend gives another key."""
    linears = _linears(layer)
    if not all(_is_plain(linear) for linear in linears) or len({linear.bias is None for linear in linears[:3]}) > 1:
        return None
    tensors = [t for linear in linears for t in (linear.weight, linear.bias) if t is not None]
    return (product_backend(), *((t.data_ptr(), t._version) for t in tensors))


def _padded_rows_of(parts: list[torch.Tensor], multiple: int) -> torch.Tensor:
    """The parts' rows one after the other, padded as :func:`vaswani.cpu_linears.padded_rows` pads (one copy)."""
    if len(parts) == 1:
        return padded_rows(parts[0], multiple)
    total = sum(part.shape[0] for part in parts)
    out = padded_empty(total, parts[0].shape[1], parts[0], multiple)
    torch.cat(parts, out=out[:total])
    return out


def attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention at one position (§3.2.1, Eq. 1 written out): softmax(Q Kᵀ / sqrt(d_k)) V for each sentence's
    queries (its beams, ``[sentences, heads, beams, d_k]``) over its keys and values (``[sentences, heads, keys,
    d_k]``, whose last two dimensions contiguous, else ``matmul`` copies them); ``mask`` boolean (True = attend) or
    additive, as the model's sdpa or eager masks are. torch's fused CPU kernel, made for long blocks of queries and
    keys, was no faster on these few queries per sentence with one thread, and slower with two threads
    (benchmarks/HISTORY.md)."""
    scores = torch.matmul(query, keys.transpose(-1, -2)).mul_(query.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)
    return torch.matmul(torch.softmax(scores, dim=-1), values)


def _attention_into(
    out: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
    native: bool,
) -> None:
    """:func:`attention` written into ``out``: in one native call with ``native`` (:func:`vaswani.kernels.attend`)."""
    if native:
        kernels.attend(query, keys, values, mask, out)
    else:
        out.copy_(attention(query, keys, values, mask))


def _residual(add_norm: AddNorm, residual: torch.Tensor, attended: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Add & Norm (§3.1) around a sub-layer whose last product is ``packed``, applied to ``attended``."""
    x = product_plus(attended, packed, residual)
    return x if add_norm.normalize_before else add_norm.layer_norm(x)


class FusedDecoderLayer(DecoderLayer):
    """A :class:`DecoderLayer` whose one-position-at-a-time inference on the CPU runs fused (see the module)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> torch.Tensor:
        extras = any(value is not None and value is not False for value in kwargs.values())  # e.g. unpadded=None
        weights = None if extras else self._fused_weights(hidden_states, attention_mask, cache)
        if weights is None:
            return super().forward(
                hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, cache=cache, **kwargs
            )
        segment = Segment(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, cache)
        return self._fused_forward(weights, [segment])[0]

    def forward_segments(self, segments: list[Segment]) -> list[torch.Tensor]:
        """The layer over several batches at once (continuous batching, :func:`vaswani.decoding.next_token_logits_of`):
        each segment is one batch's inputs. The products run over the rows of all (each weight is read once),
        attention within each batch. Returns each batch's output."""
        first = segments[0]
        weights = self._fused_weights(first.hidden, first.self_mask, first.cache)
        if weights is None or not all(self._fusable(s.hidden, s.self_mask, s.cache) for s in segments[1:]):
            return [self(s.hidden, s.self_mask, s.encoder_states, s.cross_mask, cache=s.cache) for s in segments]
        return self._fused_forward(weights, segments)

    def _fused_forward(self, weights: FusedWeights, segments: list[Segment]) -> list[torch.Tensor]:
        heads, d_k, layer = self.self_attn.num_heads, self.self_attn.head_dim, self.self_attn.layer_idx
        shapes = [segment.hidden.shape for segment in segments]
        rows = [batch * length for batch, length, _ in shapes]
        total = sum(rows)
        # The rows stay padded to the products' multiple (cpu_linears.row_multiple) from layer input to output:
        # only the attention outputs are written into padded buffers, not every product's input copied.
        multiple = row_multiple()
        hidden = [segment.hidden.reshape(-1, shape[-1]) for segment, shape in zip(segments, shapes)]
        x = _padded_rows_of(hidden, multiple)

        def per_batch(projected: torch.Tensor, attend) -> torch.Tensor:
            """The heads ``[batch, heads, length, ·]`` of each batch's rows of ``projected``, attended by
            ``attend`` into their place in rows padded as ``x``'s (the padding zero), heads concatenated (§3.2.2)."""
            out = padded_empty(total, heads * d_k, projected, multiple)
            parts = zip(projected[:total].split(rows), out[:total].split(rows), shapes, segments)
            for part, dest, (batch, length, _), segment in parts:
                part_heads = part.view(batch, length, -1, heads, d_k).transpose(1, 3).squeeze(2)
                attend(part_heads, segment, dest.view(batch, length, heads, d_k).transpose(1, 2))
            return out

        native = kernels.available()

        def self_attention(qkv: torch.Tensor, segment: Segment, out: torch.Tensor) -> None:
            query, key, value = qkv.unbind(2)
            cache = segment.cache.self_attention_cache
            keys, values = cache.update(key, value, layer)
            if native and isinstance(cache, IncrementalDecoder):
                kernels.attend_slots(query, *cache.slot_buffers(layer), cache.ancestry, cache.step + 1, out)
            else:
                _attention_into(out, query, keys, values, segment.self_mask, native)

        def cross_attention(query: torch.Tensor, segment: Segment, out: torch.Tensor) -> None:
            source = segment.cache.cross_attention_cache.layers[layer]
            _attention_into(out, query, source.keys, source.values, segment.cross_mask, native)

        qkv = product(self.self_attn_add_norm.sublayer_input(x), weights.self_qkv)
        x = _residual(self.self_attn_add_norm, x, per_batch(qkv, self_attention), weights.self_out)

        query = product(self.encoder_attn_add_norm.sublayer_input(x), weights.cross_q)
        x = _residual(self.encoder_attn_add_norm, x, per_batch(query, cross_attention), weights.cross_out)

        activation = self.feed_forward.activation
        fused_relu = type(activation) is nn.ReLU
        inner = product(self.feed_forward_add_norm.sublayer_input(x), weights.ffn_in, "relu" if fused_relu else "none")
        if not fused_relu:
            inner = activation(inner)
        x = _residual(self.feed_forward_add_norm, x, inner, weights.ffn_out)
        return [part.view(shape) for part, shape in zip(x[:total].split(rows), shapes)]

    def _fusable(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> bool:
        """Whether these inputs may take the fused path (the weights aside, see :meth:`_fused_weights`)."""
        return (
            not self.training
            and not torch.is_grad_enabled()
            and hidden_states.dtype == torch.float32
            and hidden_states.device.type == "cpu"
            and self.self_attn.config._attn_implementation in FUSABLE_ATTENTION
            # several positions need a mask: without one, a cached prefix would make "causal" misaligned
            and (attention_mask is not None or hidden_states.shape[1] == 1)
            and cache is not None
            and cache.is_updated.get(self.self_attn.layer_idx, False)
        )

    def _fused_weights(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache
    ) -> FusedWeights | None:
        """The laid-out weights if this call may take the fused path (made again when the weights changed)."""
        key = _weights_key(self) if self._fusable(hidden_states, attention_mask, cache) else None
        if key is None:
            return None
        if getattr(self, "_fused_key", None) != key:
            self._fused, self._fused_key = FusedWeights.of(self), key
        return self._fused


def fuse_decoder_layers(model: nn.Module) -> nn.Module:
    """Every :class:`DecoderLayer` of ``model`` made a :class:`FusedDecoderLayer` (in place, the same module and
    parameters; unchanged where :func:`vaswani.cpu_linears.can_prepack` is False). Returns ``model``."""
    if can_prepack():
        for module in model.modules():
            if type(module) is DecoderLayer:
                module.__class__ = FusedDecoderLayer
    return model
