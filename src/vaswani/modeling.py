"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), piece by piece.

Reading order follows the paper:

* §3.4 :class:`TokenEmbedding` scaled by sqrt(d_model), §3.5 :class:`SinusoidalPositionalEncoding`
  (or :class:`LearnedPositionalEmbedding`), summed and dropped out in :class:`EmbeddingWithPositions`.
* §3.2 :func:`scaled_dot_product_attention` and :class:`MultiHeadAttention` (Q/K/V projections, split into
  h heads, attention, concatenation, output projection).
* §3.1 :class:`AddNorm` (residual connection + layer normalization) and §3.3 :class:`PositionwiseFeedForward`.
* §3.1 :class:`EncoderLayer` (self-attention, feed-forward) and :class:`DecoderLayer` (masked
  self-attention, encoder-decoder attention, feed-forward), stacked N times in :class:`VaswaniEncoder`
  and :class:`VaswaniDecoder`.
* :class:`VaswaniModel` (encoder + decoder) and :class:`VaswaniForConditionalGeneration` (+ the
  pre-softmax projection tied to the embeddings, §3.4).

This file imports only torch, transformers and its sibling ``configuration.py`` so that a saved model
folder runs with ``trust_remote_code=True`` where this package is not installed.
"""

import math
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple, is_torchdynamo_compiling
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration import VaswaniConfig
from .decoding import IncrementalDecodingMixin
from .generation import PaperDecodingMixin, apply_paper_generation_defaults
from .pipeline import CUSTOM_PIPELINES  # also makes save_pretrained copy pipeline.py for remote code

# ----------------------------------------------------------------------------------------------------------
# §3.4 Embeddings and §3.5 positional encoding
# ----------------------------------------------------------------------------------------------------------


def sinusoidal_positional_encoding(
    positions: torch.Tensor, d_model: int, layout: str = "interleaved"
) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)) (§3.5).

    ``layout="interleaved"`` is the paper's (sin on even, cos on odd dimensions); ``"concatenated"``
    puts all sines first, then all cosines (Marian, fairseq, tensor2tensor). Works for any position.
    """
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32)
        * (-math.log(10000.0) / d_model)
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq
    if layout == "interleaved":
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoids added to the embeddings (§3.5); no parameters and no length limit."""

    def __init__(self, d_model: int, layout: str) -> None:
        super().__init__()
        self.d_model = d_model
        self.layout = layout

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return sinusoidal_positional_encoding(positions, self.d_model, self.layout)


class LearnedPositionalEmbedding(nn.Embedding):
    """Learned positions, the paper's alternative (Table 3, row E); limited to ``max_position_embeddings``."""

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if (
            not is_torchdynamo_compiling()
            and positions.numel()
            and int(positions.max()) >= self.num_embeddings
        ):
            raise ValueError(
                f"Position {int(positions.max())} is beyond the {self.num_embeddings} learned positions; "
                "shorten the input or use position_embedding_type='sinusoidal', which has no length limit."
            )
        return super().forward(positions)


def apply_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Dropout (§5.4): zero each element with probability ``p`` and scale the rest by 1 / (1 - p).

    On a CPU torch draws one random number per element, one at a time, which took up to half of a small
    model's training step (measured: 4M elements in 50 ms). Here each 64-bit random number gives four 16-bit
    draws, and an element is dropped when its draw falls in the lowest ``p`` share of the 2^16 values (``p``
    rounded to a multiple of 2^-16); the kept ones are multiplied by a mask of 0 and 1 / (1 - p). Forward +
    backward of 4M elements: 11 ms instead of 45 ms, from the same seeded generator. Other devices keep
    torch's fused kernel.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    draws = bits.view(torch.int16)[: x.numel()].view(x.shape)
    kept = draws >= round(p * 2**16) - 2**15
    return x * kept.to(x.dtype).mul_(1.0 / (1.0 - p))  # the backward pass multiplies by the same mask


class Dropout(nn.Dropout):
    """``nn.Dropout`` computed by :func:`apply_dropout` (fast on a CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_dropout(x, self.p, self.training)


class EmbeddingWithPositions(nn.Module):
    """Token embedding × sqrt(d_model) (§3.4) + positional encoding (§3.5), then dropout (§5.4).

    The token embedding table itself is shared and lives on :class:`VaswaniModel`; this module holds the
    positions and receives the looked-up vectors, so that ``inputs_embeds`` (raw lookups, as
    ``model.get_input_embeddings()(ids)`` returns them) and ``input_ids`` give the same result.
    """

    def __init__(self, config: VaswaniConfig) -> None:
        super().__init__()
        self.scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        if config.position_embedding_type == "sinusoidal":
            self.positions = SinusoidalPositionalEncoding(config.d_model, config.sinusoid_layout)
        else:
            self.positions = LearnedPositionalEmbedding(config.max_position_embeddings, config.d_model)
        self.dropout = Dropout(config.dropout)

    def forward(self, token_embeddings: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        positions = torch.arange(
            past_length, past_length + token_embeddings.shape[1], device=token_embeddings.device
        )
        encoded = token_embeddings * self.scale + self.positions(positions).to(token_embeddings.dtype)
        return self.dropout(encoded)


# ----------------------------------------------------------------------------------------------------------
# §3.2 Attention
# ----------------------------------------------------------------------------------------------------------


def scaled_dot_product_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention(Q, K, V) = softmax(Q Kᵀ / sqrt(d_k)) V (§3.2.1, Eq. 1), written out ("eager").

    Shapes: query ``[batch, heads, q_len, d_k]``, key/value ``[batch, heads, kv_len, d_k]``; the mask is
    additive (0 where allowed, a large negative number where not). Returns the output as
    ``[batch, q_len, heads, d_k]`` and the attention probabilities ``[batch, heads, q_len, kv_len]``.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = apply_dropout(weights, dropout, module.training)
    output = torch.matmul(weights, value).transpose(1, 2)
    return output, weights


#: Longest key sequence for which "sdpa" training on a CPU computes Eq. 1 as written (see below).
EXPLICIT_ATTENTION_MAX_KEYS = 128


def _explicit_attention_is_faster(query: torch.Tensor, key: torch.Tensor) -> bool:
    """On a CPU, torch's fused attention (flash attention for CPU) has a slow backward pass for sentence-length
    sequences: measured with torch 2.13 at 30 tokens, forward + backward took 4.6x as long as the written-out
    formula in bf16 and 1.15x in fp32 (break-even near 128 tokens in fp32, 256 in bf16). So when gradients
    are needed, "sdpa" uses :func:`scaled_dot_product_attention` for keys up to
    :data:`EXPLICIT_ATTENTION_MAX_KEYS` long: the same function, rounded differently (softmax in fp32).
    Inference (no gradients) and longer sequences keep torch's kernel, which is faster there."""
    return (
        query.device.type == "cpu"
        and query.requires_grad
        and torch.is_grad_enabled()
        and key.shape[-2] <= EXPLICIT_ATTENTION_MAX_KEYS
        and not is_torchdynamo_compiling()
    )


def _swap_batch_and_heads(x: torch.Tensor | None) -> torch.Tensor | None:
    """``[batch, heads, ...]`` ↔ ``[heads, batch, ...]`` for 4-d tensors (a 2-d mask broadcasts either way)."""
    return x.transpose(0, 1) if x is not None and x.dim() == 4 else x


def _unchanged(x: torch.Tensor | None) -> torch.Tensor | None:
    return x


def _additive_mask(
    mask: torch.Tensor | None, is_causal: bool, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """An sdpa-style mask (boolean, True = attend; or None, causal when ``is_causal``) as the additive float
    mask :func:`scaled_dot_product_attention` adds to the scores."""
    if mask is None and is_causal and q_len > 1:
        positions = torch.arange(kv_len, device=device)
        mask = positions[None, :] <= positions[kv_len - q_len :, None]  # query i sees keys up to its position
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(
        mask.logical_not(), torch.finfo(torch.float32).min
    )


class Packing:
    """The real (non-padding) positions of a padded batch, for training without computing on the padding.

    Everything but attention acts on each position alone (the Q/K/V/output projections, the feed-forward
    network, add & norm, dropout), so in training those pieces can run on the real tokens only, a
    ``[tokens, d_model]`` matrix, and skip the padding a batch of unequal sentences carries (a sixth of the
    positions when lengths vary by ±20%). Attention works on the padded ``[batch, len, ...]`` layout: the
    projected queries, keys and values are unpacked into it and the attended values packed back. The results
    at real positions are those of the padded computation; the outputs at padding positions are zeros.
    """

    #: The packed row count is rounded up to a multiple of this with padding positions (computed, never read),
    #: so that the memory allocator sees a few sizes again and again instead of a new size at every step.
    rows_multiple = 64

    def __init__(self, keep: torch.Tensor) -> None:
        self.shape = tuple(keep.shape)
        keep = keep.flatten()
        index = keep.nonzero().squeeze(-1)
        self.padding = keep.logical_not().nonzero().squeeze(-1)
        extra = -index.numel() % self.rows_multiple
        if extra:
            index = torch.cat([index, self.padding[:extra]])
        self.index = index

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, len, ...]`` → ``[tokens, ...]``."""
        return _PackRows.apply(x.flatten(0, 1), self)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[tokens, ...]`` → ``[batch, len, ...]`` with zeros at the padding positions."""
        return _UnpackRows.apply(x, self).view(*self.shape, *x.shape[1:])

    def unpack_heads(self, x: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
        """``[tokens, parts · heads · d_k]`` (projections side by side) → ``parts`` tensors ``[batch, heads,
        len, d_k]``, stored heads outermost (``[heads, batch, len, d_k]``) so that attention's batched matrix
        products read them in place: one copy instead of an unpacking and a copy per part into the head
        layout."""
        return _UnpackHeads.apply(x, self, parts, heads)

    def scatter(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[tokens, ...]`` → ``[batch · len, ...]`` without autograd: each row to its position, and zeros
        written only at the padding positions (not first over the whole tensor). ``out`` (in any memory
        layout) receives the result; by default a new contiguous tensor."""
        if out is None:
            out = x.new_empty(self.shape[0] * self.shape[1], *x.shape[1:])
        return out.index_copy_(0, self.index, x).index_fill_(0, self.padding, 0)


class _PackRows(torch.autograd.Function):
    """Rows ``packing.index`` of ``[positions, ...]``; the gradient goes back with :meth:`Packing.scatter`,
    laid out in memory as the input was (attention's outputs are stored heads outermost)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        ctx.packing, ctx.layout = packing, (x.shape, x.stride())
        return x.index_select(0, packing.index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.new_empty_strided(*ctx.layout)
        return ctx.packing.scatter(grad, out), None


class _UnpackRows(torch.autograd.Function):
    """:meth:`Packing.scatter` with autograd: the gradient is the rows ``packing.index`` of the output's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        ctx.packing = packing
        return packing.scatter(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.index_select(0, ctx.packing.index), None


class _UnpackHeads(torch.autograd.Function):
    """:meth:`Packing.unpack_heads`: the packed rows scattered into ``[parts, heads, batch · len, d_k]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packing: Packing, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
        ctx.packing = packing
        batch, length = packing.shape
        padded = x.new_empty(parts, heads, batch * length, x.shape[-1] // (parts * heads))
        packing.scatter(x.view(x.shape[0], parts, heads, -1), out=padded.permute(2, 0, 1, 3))
        return tuple(part.view(heads, batch, length, -1).transpose(0, 1) for part in padded)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor, None, None, None]:
        index, given = ctx.packing.index, [grad for grad in grads if grad is not None]
        batch, heads, length, head_dim = given[0].shape
        new = given[0].new_empty if len(given) == len(grads) else given[0].new_zeros
        packed = new(index.numel(), len(grads), heads, head_dim)
        for part, grad in enumerate(grads):
            if grad is not None:  # [batch, heads, len, d_k] → rows [batch · len, heads, d_k]
                torch.index_select(grad.transpose(1, 2).flatten(0, 1), 0, index, out=packed[:, part])
        return packed.flatten(1), None, None, None


#: Packing is used when at least this share of the positions is padding (below it there is little to save).
#: Measured on the CPU: with 17% padding (benchmarks/model_bench.py) an fp32 training step took 7-10% less
#: time; ``vaswani train`` on Multi30k (bf16) ran at 2.33 instead of 2.19 updates/s.
PACKING_MIN_PADDING = 0.125


def packing_for(keep: torch.Tensor | None, training: bool, kwargs: dict) -> Packing | None:
    """A :class:`Packing` of the positions ``keep`` marks (``[batch, len]``) where packing pays: in training,
    when at least :data:`PACKING_MIN_PADDING` of the positions are padding, outside ``torch.compile`` and when
    no per-layer outputs are recorded."""
    if not training or keep is None or keep.dim() != 2 or is_torchdynamo_compiling():
        return None
    if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        return None
    keep = keep.bool()
    kept = int(keep.sum())
    if kept == 0 or kept > (1.0 - PACKING_MIN_PADDING) * keep.numel():  # nothing to compute, or little to save
        return None
    return Packing(keep)


def _is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` itself (not a subclass such as a LoRA or quantized layer) without hooks."""
    hooks = module._forward_hooks or module._forward_pre_hooks
    return type(module) is nn.Linear and not hooks


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    (§3.2.2.) The h projections of size d_k = d_model / h are computed as one d_model × d_model matrix
    each for Q, K and V and then split into heads. Used three ways (§3.2.3): encoder self-attention,
    decoder masked self-attention (``is_causal``) and encoder-decoder attention (``is_cross_attention``:
    queries from the decoder, keys and values from the encoder output).
    """

    def __init__(
        self,
        config: VaswaniConfig,
        num_heads: int,
        is_causal: bool = False,
        is_cross_attention: bool = False,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = config.d_model // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = is_causal
        self.is_cross_attention = is_cross_attention
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, len, d_model]`` → ``[batch, heads, len, d_k]``."""
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def project(self, x: torch.Tensor, linears: tuple[nn.Linear, ...], packing: Packing | None) -> list[torch.Tensor]:
        """``linear(x)`` for each of ``linears``, split into heads (``[batch, heads, len, d_k]``); ``x`` is packed
        when ``packing`` is given. In training, plain ``nn.Linear`` s (no hooks, no adapters) run as one matrix
        multiply with their weights side by side: fewer, larger products and one unpacking. Decoding keeps them
        apart, where copying the weights side by side for a few rows would cost more than it saves."""
        joinable = all(_is_plain_linear(linear) and linear.bias is not None for linear in linears)
        if self.training and len(linears) > 1 and joinable:
            weight = torch.cat([linear.weight for linear in linears])
            bias = torch.cat([linear.bias for linear in linears])
            projected = [(F.linear(x, weight, bias), len(linears))]
        else:
            projected = [(linear(x), 1) for linear in linears]
        if packing is not None:
            return [head for y, parts in projected for head in packing.unpack_heads(y, parts, self.num_heads)]
        return [self.split_heads(part) for y, parts in projected for part in y.chunk(parts, dim=-1)]

    def keys_and_values(
        self, source: torch.Tensor, cache: EncoderDecoderCache | None, packing: Packing | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Project K and V, reusing or extending the decoding cache (§3.2.3, incremental decoding)."""
        if cache is not None and self.is_cross_attention and cache.is_updated.get(self.layer_idx):
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            return layer.keys, layer.values
        key, value = self.project(source, (self.k_proj, self.v_proj), packing)
        if cache is not None:
            if self.is_cross_attention:
                key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
                cache.is_updated[self.layer_idx] = True
            else:
                key, value = cache.self_attention_cache.update(key, value, self.layer_idx)
        return key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        packing: Packing | None = None,
        source_packing: Packing | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states`` (and the encoder's ``key_value_states``) are packed when ``packing``
        (``source_packing``) is given, and so is the result."""
        if cache is None and not self.is_cross_attention:  # self-attention without a cache: Q, K, V together
            query, key, value = self.project(hidden_states, (self.q_proj, self.k_proj, self.v_proj), packing)
        else:
            (query,) = self.project(hidden_states, (self.q_proj,), packing)
            if self.is_cross_attention:
                key, value = self.keys_and_values(key_value_states, cache, source_packing)
            else:
                key, value = self.keys_and_values(hidden_states, cache, packing)
        return self.attend(query, key, value, attention_mask, packing, **kwargs)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        packing: Packing | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the projected heads (``[batch, heads, len, d_k]``), concatenated and projected by W^O:
        ``[batch, q_len, d_model]`` (packed with ``packing``) and the attention weights (where the
        implementation returns them)."""
        implementation = self.config._attn_implementation
        if implementation == "sdpa" and _explicit_attention_is_faster(query, key):
            implementation = "eager"
            lengths = (query.shape[-2], key.shape[-2])
            attention_mask = _additive_mask(attention_mask, self.is_causal, *lengths, query.device)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, scaled_dot_product_attention)
        # Packed heads are stored heads outermost (Packing.unpack_heads). Eq. 1 treats both leading dimensions
        # alike, so the written-out function runs on [heads, batch, ...] and its products read them in place.
        heads_outermost = packing is not None and attention is scaled_dot_product_attention
        swap = _swap_batch_and_heads if heads_outermost else _unchanged
        heads, weights = attention(
            self,
            swap(query),
            swap(key),
            swap(value),
            swap(attention_mask),
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        if heads_outermost:  # [heads, q_len, batch, d_k] -> [batch, q_len, heads, d_k]
            heads, weights = heads.transpose(0, 2), swap(weights)
        if packing is not None:
            heads = packing.pack(heads)
        return self.out_proj(heads.flatten(-2)), weights  # concatenate the heads: [..., heads · d_k]


# ----------------------------------------------------------------------------------------------------------
# §3.1 Add & Norm, §3.3 position-wise feed-forward
# ----------------------------------------------------------------------------------------------------------


class AddNorm(nn.Module):
    """LayerNorm(x + Dropout(Sublayer(x))) (§3.1, dropout from §5.4).

    With ``config.normalize_before`` (pre-norm) the norm moves to the sub-layer's input instead:
    x + Dropout(Sublayer(LayerNorm(x))). :meth:`sublayer_input` gives what the sub-layer should read.
    """

    def __init__(self, config: VaswaniConfig) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)
        self.normalize_before = config.normalize_before

    def sublayer_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x) if self.normalize_before else x

    def forward(self, residual: torch.Tensor, sublayer_output: torch.Tensor) -> torch.Tensor:
        x = residual + self.dropout(sublayer_output)
        return x if self.normalize_before else self.layer_norm(x)


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, applied to each position alike (§3.3, Eq. 2)."""

    def __init__(self, config: VaswaniConfig, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, ffn_dim)
        self.activation = ACT2FN[config.activation_function]
        self.activation_dropout = Dropout(config.activation_dropout)
        self.fc2 = nn.Linear(ffn_dim, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_dropout(self.activation(self.fc1(x))))


# ----------------------------------------------------------------------------------------------------------
# §3.1 Encoder and decoder layers
# ----------------------------------------------------------------------------------------------------------


class EncoderLayer(GradientCheckpointingLayer):
    """Multi-head self-attention, then the feed-forward network, each wrapped in :class:`AddNorm` (§3.1)."""

    def __init__(self, config: VaswaniConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(config, config.encoder_attention_heads)
        self.self_attn_add_norm = AddNorm(config)
        self.feed_forward = PositionwiseFeedForward(config, config.encoder_ffn_dim)
        self.feed_forward_add_norm = AddNorm(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        packing: Packing | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attended, _ = self.self_attn(
            self.self_attn_add_norm.sublayer_input(hidden_states),
            attention_mask=attention_mask,
            packing=packing,
            **kwargs,
        )
        hidden_states = self.self_attn_add_norm(hidden_states, attended)
        transformed = self.feed_forward(self.feed_forward_add_norm.sublayer_input(hidden_states))
        return self.feed_forward_add_norm(hidden_states, transformed)


class DecoderLayer(GradientCheckpointingLayer):
    """Masked self-attention, encoder-decoder attention, feed-forward; each in :class:`AddNorm` (§3.1).

    The mask on self-attention keeps position i from attending to positions after i, so the prediction
    for i depends only on the known outputs before it.
    """

    def __init__(self, config: VaswaniConfig, layer_idx: int) -> None:
        super().__init__()
        heads = config.decoder_attention_heads
        self.self_attn = MultiHeadAttention(config, heads, is_causal=True, layer_idx=layer_idx)
        self.self_attn_add_norm = AddNorm(config)
        self.encoder_attn = MultiHeadAttention(config, heads, is_cross_attention=True, layer_idx=layer_idx)
        self.encoder_attn_add_norm = AddNorm(config)
        self.feed_forward = PositionwiseFeedForward(config, config.decoder_ffn_dim)
        self.feed_forward_add_norm = AddNorm(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        packing: Packing | None = None,
        encoder_packing: Packing | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attended, _ = self.self_attn(
            self.self_attn_add_norm.sublayer_input(hidden_states),
            attention_mask=attention_mask,
            cache=cache,
            packing=packing,
            **kwargs,
        )
        hidden_states = self.self_attn_add_norm(hidden_states, attended)
        attended, _ = self.encoder_attn(
            self.encoder_attn_add_norm.sublayer_input(hidden_states),
            key_value_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            cache=cache,
            packing=packing,
            source_packing=encoder_packing,
            **kwargs,
        )
        hidden_states = self.encoder_attn_add_norm(hidden_states, attended)
        transformed = self.feed_forward(self.feed_forward_add_norm.sublayer_input(hidden_states))
        return self.feed_forward_add_norm(hidden_states, transformed)


# ----------------------------------------------------------------------------------------------------------
# Stacks and models
# ----------------------------------------------------------------------------------------------------------


class VaswaniPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers capabilities shared by every Vaswani model."""

    config: VaswaniConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _no_split_modules = ["EncoderLayer", "DecoderLayer"]

    def mark_tied_weights_as_initialized(self, loading_info) -> None:
        """Keep a tied source that the checkpoint lacks (``shared.weight``) missing, so that it is initialised.

        transformers flags every tied copy as initialised; ours are the source's own Parameter (the encoder and
        decoder hold the ``shared`` module itself), so the flag also lands on the source, and for a model defined
        outside transformers the loader then drops the source from the missing keys and leaves it on the meta device.
        """
        missing_sources = set(self.all_tied_weights_keys.values()) & set(loading_info.missing_keys)
        super().mark_tied_weights_as_initialized(loading_info)
        for name in missing_sources:
            self.get_parameter(name)._is_hf_initialized = False
        loading_info.missing_keys |= missing_sources

    def _init_weights(self, module: nn.Module) -> None:
        """Xavier-uniform projections and N(0, d_model^-0.5) embeddings, as fairseq and tensor2tensor do
        (the paper does not state an initialisation); LayerNorm starts as the identity."""
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.d_model**-0.5)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


def _id_range(ids: torch.Tensor) -> tuple[int, int]:
    """The smallest and largest id, read back in one step (one device sync)."""
    low, high = torch.stack((ids.min(), ids.max())).tolist()
    return low, high


def _check_ids(name: str, ids: torch.Tensor | None, vocab_size: int) -> None:
    """Refuse token ids that are not ``[batch, length]`` with at least one of each, or that lie outside the
    vocabulary, with a message instead of a shape or index error deep in torch."""
    if ids is None:
        return
    _check_shape(name, ids, ("batch", "length"))
    if is_torchdynamo_compiling():
        return
    low, high = _id_range(ids)
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise ValueError(
            f"{name} contains token id {bad}, outside the vocabulary of {vocab_size} ids [0, {vocab_size - 1}]. "
            "Encode the text with this model's tokenizer, or call model.resize_token_embeddings(len(tokenizer)) "
            "after adding tokens."
        )


def _check_shape(name: str, tensor: torch.Tensor, dims: tuple[str, ...]) -> None:
    """``tensor`` has the dimensions ``dims`` (names for the message), none of them empty."""
    if tensor.dim() != len(dims):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but must be [{', '.join(dims)}]; for one sentence add the "
            f"batch dimension ({name}[None]), or let the tokenizer make it: tokenizer([text], return_tensors='pt')."
        )
    if 0 in tensor.shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}: no sentences or no tokens. Pass at least one sentence of at "
            "least one token (the tokenizer gives even an empty string its </s>)."
        )


def _check_labels(labels: torch.Tensor | None, vocab_size: int) -> None:
    """Labels are target ids in the vocabulary or -100 (ignored), ``[batch, length]``."""
    if labels is None:
        return
    _check_shape("labels", labels, ("batch", "length"))
    if is_torchdynamo_compiling():
        return
    low, high = _id_range(labels.masked_fill(labels == -100, 0))
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"labels contain {high if high >= vocab_size else low}, which is neither a token id of the vocabulary "
            f"[0, {vocab_size - 1}] nor -100 (ignored); make labels with this model's tokenizer and -100 for padding."
        )


def _check_embeds(name: str, embeds: torch.Tensor | None) -> None:
    """Given embeddings are ``[batch, length, d_model]`` and finite: a NaN would silently fill its whole row."""
    if embeds is None:
        return
    _check_shape(name, embeds, ("batch", "length", "d_model"))
    if not is_torchdynamo_compiling() and not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"{name} contains NaN or inf values; check what computed them (every output row they "
                         "reach would be NaN).")


def keep_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A ``[batch, len]`` attention mask as True = attend. Masks of 1/0 (the tokenizer's) pass as they are; a
    float mask whose entries are all <= 0 is additive (0 = attend, -inf or a large negative = masked), as some
    transformers code passes, and becomes the boolean mask it means instead of being read inverted."""
    if mask is None or mask.dim() != 2 or not mask.is_floating_point():
        return mask
    return torch.where((mask <= 0).all(), mask == 0, mask != 0)


def _check_mask(name: str, mask: torch.Tensor | None, ids_name: str, shape: torch.Size) -> None:
    if mask is not None and mask.dim() == 2 and tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but {ids_name} has shape {tuple(shape)}; pass the mask the "
            "tokenizer returned with these ids (one row per sentence, one column per token)."
        )


class LayerStack(VaswaniPreTrainedModel):
    """What encoder and decoder share (§3.1): a token embedding table (shared by both by default, §3.4), the
    positional encoding, N identical layers, and for pre-norm the LayerNorm after the last layer."""

    def __init__(
        self, config: VaswaniConfig, vocab_size: int, layers: list[nn.Module], embed_tokens: nn.Embedding | None
    ) -> None:
        super().__init__(config)
        self.embed_tokens = embed_tokens or nn.Embedding(vocab_size, config.d_model, config.pad_token_id)
        self.embed = EmbeddingWithPositions(config)
        self.layers = nn.ModuleList(layers)
        self.layer_norm = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.normalize_before else None
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states if self.layer_norm is None else self.layer_norm(hidden_states)


class VaswaniEncoder(LayerStack):
    """N identical :class:`EncoderLayer` s over embedded, position-encoded source tokens (§3.1)."""

    _can_record_outputs = {"hidden_states": EncoderLayer, "attentions": MultiHeadAttention}

    def __init__(self, config: VaswaniConfig, embed_tokens: nn.Embedding | None = None) -> None:
        layers = [EncoderLayer(config) for _ in range(config.encoder_layers)]
        super().__init__(config, config.vocab_size, layers, embed_tokens)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds to the encoder.")
        _check_embeds("inputs_embeds", inputs_embeds)
        attention_mask = keep_mask(attention_mask)
        if inputs_embeds is None:
            _check_ids("input_ids", input_ids, self.embed_tokens.num_embeddings)
            _check_mask("attention_mask", attention_mask, "input_ids", input_ids.shape)
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = self.embed(inputs_embeds)
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        packing = packing_for(attention_mask, self.training, kwargs)
        if packing is not None:
            hidden_states = packing.pack(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, packing=packing, **kwargs)
        hidden_states = self.final_norm(hidden_states)
        if packing is not None:
            hidden_states = packing.unpack(hidden_states)
        return BaseModelOutput(last_hidden_state=hidden_states)


class VaswaniDecoder(LayerStack):
    """N identical :class:`DecoderLayer` s over the shifted target, attending to the encoder output (§3.1)."""

    _can_record_outputs = {
        "hidden_states": DecoderLayer,
        "attentions": OutputRecorder(MultiHeadAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(MultiHeadAttention, index=1, layer_name="encoder_attn"),
    }

    def __init__(self, config: VaswaniConfig, embed_tokens: nn.Embedding | None = None) -> None:
        layers = [DecoderLayer(config, layer_idx=i) for i in range(config.decoder_layers)]
        super().__init__(config, config.decoder_vocab_size, layers, embed_tokens)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        needed_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """``needed_positions`` (``[batch, len]``, optional): the target positions whose outputs will be used
        (the loss's); in training the others are skipped (see :class:`Packing`) and their outputs are zeros.
        Without it, the positions up to each row's last one that ``attention_mask`` keeps."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of decoder_input_ids or decoder_inputs_embeds to the decoder.")
        if encoder_hidden_states is None:
            raise ValueError("The decoder attends to the encoder output: pass encoder_hidden_states.")
        _check_embeds("decoder_inputs_embeds", inputs_embeds)
        attention_mask, encoder_attention_mask = keep_mask(attention_mask), keep_mask(encoder_attention_mask)
        if inputs_embeds is None:
            _check_ids("decoder_input_ids", input_ids, self.embed_tokens.num_embeddings)
            _check_mask("decoder_attention_mask", attention_mask, "decoder_input_ids", input_ids.shape)
            inputs_embeds = self.embed_tokens(input_ids)
        if inputs_embeds.shape[0] != encoder_hidden_states.shape[0]:
            raise ValueError(
                f"The decoder inputs have batch size {inputs_embeds.shape[0]} but the encoder output has "
                f"{encoder_hidden_states.shape[0]}; pass one target row per source sentence."
            )
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        past_length = cache.get_seq_length() if cache is not None else 0
        hidden_states = self.embed(inputs_embeds, past_length)

        self_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=cache.self_attention_cache if cache is not None else None,
        )
        cross_mask = create_bidirectional_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=encoder_attention_mask,
            encoder_hidden_states=encoder_hidden_states,
        )
        # A target position is needed up to the last one used: causal self-attention lets only later positions
        # read it.
        needed = _up_to_last_kept(attention_mask if needed_positions is None else needed_positions)
        packing = packing_for(needed, self.training, kwargs)
        encoder_packing = packing_for(encoder_attention_mask, self.training, kwargs)
        if packing is not None:
            hidden_states = packing.pack(hidden_states)
        if encoder_packing is not None:
            encoder_hidden_states = encoder_packing.pack(encoder_hidden_states)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                self_mask,
                encoder_hidden_states,  # positional, so gradient checkpointing passes it through
                encoder_attention_mask=cross_mask,
                cache=cache,
                packing=packing,
                encoder_packing=encoder_packing,
                **kwargs,
            )
        hidden_states = self.final_norm(hidden_states)
        if packing is not None:
            hidden_states = packing.unpack(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, cache=cache)


def _up_to_last_kept(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[batch, len]`` mask → True at every position up to the row's last kept one."""
    if mask is None or mask.dim() != 2:
        return mask
    return mask.bool().flip(-1).cummax(-1).values.flip(-1)


def shift_tokens_right(
    labels: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int | None
) -> torch.Tensor:
    """Decoder inputs are the targets shifted one position right, starting with ``decoder_start_token_id``
    ("output embeddings are offset by one position", §3.1); ignored labels (-100) become padding."""
    if decoder_start_token_id is None or pad_token_id is None:
        raise ValueError(
            "Cannot make decoder_input_ids from labels: the config needs decoder_start_token_id and pad_token_id "
            f"(got {decoder_start_token_id} and {pad_token_id}). Set them from the tokenizer, e.g. "
            "config.decoder_start_token_id = tokenizer.bos_token_id, config.pad_token_id = tokenizer.pad_token_id."
        )
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


class VaswaniModel(VaswaniPreTrainedModel):
    """Encoder + decoder (Figure 1) with one token embedding shared by both when the vocabulary is shared."""

    def __init__(self, config: VaswaniConfig) -> None:
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id)
        if config.share_encoder_decoder_embeddings:
            self._tied_weights_keys = {
                "encoder.embed_tokens.weight": "shared.weight",
                "decoder.embed_tokens.weight": "shared.weight",
            }
            self.encoder = VaswaniEncoder(config, self.shared)
            self.decoder = VaswaniDecoder(config, self.shared)
        else:
            self._tied_weights_keys = {"encoder.embed_tokens.weight": "shared.weight"}
            self.encoder = VaswaniEncoder(config, self.shared)
            self.decoder = VaswaniDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.shared = value
        self.encoder.embed_tokens = value
        if self.config.share_encoder_decoder_embeddings:
            self.decoder.embed_tokens = value

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: tuple[torch.Tensor] | BaseModelOutput | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        decoder_needed_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> Seq2SeqModelOutput:
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        encoder_states = encoder_outputs.last_hidden_state
        if attention_mask is not None and attention_mask.shape[0] != encoder_states.shape[0]:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[0]} rows but there are {encoder_states.shape[0]} "
                "source sentences; pass the mask the tokenizer returned with input_ids."
            )
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_states,
            encoder_attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            needed_positions=decoder_needed_positions,
            **kwargs,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_states,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class VaswaniForConditionalGeneration(
    VaswaniPreTrainedModel, IncrementalDecodingMixin, PaperDecodingMixin, GenerationMixin
):
    """The translation model: :class:`VaswaniModel` + the pre-softmax linear projection (§3.4).

    ``generate()`` decodes with our incremental beam / greedy search (:mod:`.decoding`) where it supports the
    request and with transformers' loops otherwise (or when asked with ``decoding_loop="transformers"``).

    With ``labels`` the loss is the cross-entropy of the next target token, summed over non-ignored
    positions and divided by ``num_items_in_batch`` when the Trainer passes it (so that gradient
    accumulation matches one large batch), else by the number of those positions.
    """

    def __init__(self, config: VaswaniConfig) -> None:
        super().__init__(config)
        self.model = VaswaniModel(config)
        self.lm_head = nn.Linear(config.d_model, config.decoder_vocab_size, bias=config.lm_head_bias)
        target_embedding = (
            "model.shared.weight"
            if config.share_encoder_decoder_embeddings
            else ("model.decoder.embed_tokens.weight")
        )
        self._tied_weights_keys = {"lm_head.weight": target_embedding}
        self.post_init()
        apply_paper_generation_defaults(self.generation_config)
        self.config.custom_pipelines = {task: dict(spec) for task, spec in CUSTOM_PIPELINES.items()}

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self.lm_head and not self.config.tie_word_embeddings:
            init.normal_(module.weight, mean=0.0, std=self.config.d_model**-0.5)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: tuple[torch.Tensor] | BaseModelOutput | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        smoothing: float = 0.0,
        skip_logits: bool = False,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        """With ``labels``: the loss, label-smoothed by ``smoothing`` = ε_ls (§5.4; named without "label" so
        that transformers' Trainer takes only ``labels`` for a label column). In training only the
        positions up to each row's last label are computed (see :class:`Packing`), and the output layer and
        loss run on the labelled positions alone; ``logits`` are zeros at the others. ``skip_logits=True`` (the
        name liger-kernel models use) returns ``logits=None`` instead of laying them out as ``[batch, len,
        vocab]``: a training step reads only the loss, and accelerate's mixed precision would copy them to fp32."""
        if labels is not None:
            _check_labels(labels, self.config.decoder_vocab_size)
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        labelled = None if labels is None else labels != -100
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            decoder_needed_positions=labelled,
            **kwargs,
        )
        hidden_states, loss, logits = outputs.last_hidden_state, None, None
        packing = None if labels is None else packing_for(labelled, self.training, kwargs)
        if packing is not None:  # the output layer and the loss on the labelled positions
            hidden_states, labels = packing.pack(hidden_states), packing.pack(labels)
        if labels is not None and skip_logits:
            loss = output_layer_cross_entropy(self.lm_head, hidden_states, labels, num_items_in_batch, smoothing)
        else:
            logits = self.lm_head(hidden_states)
            if labels is not None:
                loss = token_cross_entropy(logits, labels, num_items_in_batch, smoothing)
            if skip_logits:
                logits = None
            elif packing is not None:
                logits = packing.unpack(logits)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )

    def generate(
        self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
    ):
        """``generate()`` reading an additive float ``attention_mask`` as the keep-mask it means (see
        :func:`keep_mask`) in every step, the source lengths of the output limit included."""
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = keep_mask(kwargs["attention_mask"])
        return super().generate(inputs, generation_config=generation_config, **kwargs)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Used by ``DataCollatorForSeq2Seq(model=...)`` so label-smoothed Trainer runs get decoder inputs."""
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def _reorder_cache(self, cache: Cache, beam_idx: torch.LongTensor) -> Cache:
        """Beam search: give each row the cached states of the beam it continues. The encoder-decoder keys and
        values stay where they are when the move would not change them (all beams of a sentence attend to the
        same source), instead of being copied at every step as ``EncoderDecoderCache.reorder_cache`` does."""
        if not isinstance(cache, EncoderDecoderCache):
            cache.reorder_cache(beam_idx)
            return cache
        cache.self_attention_cache.reorder_cache(beam_idx)
        cross = cache.cross_attention_cache
        classes = _identical_row_classes(cross)
        if classes is None:
            cross.reorder_cache(beam_idx)
        elif not torch.equal(classes[beam_idx.to(classes.device)], classes):
            cross.reorder_cache(beam_idx)
            _remember_row_classes(cross, classes[beam_idx.to(classes.device)])
        return cache


def _cross_tensors(cross: Cache) -> list[torch.Tensor] | None:
    """The keys and values of a filled cross-attention cache made of ``DynamicLayer`` s (which replace their
    tensors rather than writing into them), else None."""
    layers = getattr(cross, "layers", None)
    if not layers or not all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers):
        return None
    tensors = [t for layer in layers for t in (layer.keys, layer.values)]
    return tensors if all(t is not None and t.numel() for t in tensors) else None


def _remember_row_classes(cross: Cache, classes: torch.Tensor) -> None:
    tensors = _cross_tensors(cross)
    cross._vaswani_row_classes = None if tensors is None else ([weakref.ref(t) for t in tensors], classes)


def _identical_row_classes(cross: Cache) -> torch.Tensor | None:
    """One class id per batch row of a filled cross-attention cache: rows of one class hold bitwise-equal keys
    and values in every layer (the beams of one sentence). Computed with one pass over the cache and kept
    while the cache holds the same tensors; None where this cannot be known."""
    tensors = _cross_tensors(cross)
    if tensors is None:
        return None
    remembered = getattr(cross, "_vaswani_row_classes", None)
    if remembered is not None and len(remembered[0]) == len(tensors):
        if all(ref() is t for ref, t in zip(remembered[0], tensors)):
            return remembered[1]
    _, classes = torch.unique(tensors[0].flatten(1), dim=0, return_inverse=True)
    rows = torch.arange(classes.numel(), device=classes.device)
    first = torch.full_like(rows, classes.numel()).scatter_reduce_(0, classes, rows, "amin")[classes]
    if not all(torch.equal(t, t[first]) for t in tensors):
        classes = rows  # equal first-layer keys but different states elsewhere: treat every row as its own
    _remember_row_classes(cross, classes)
    return classes


class SmoothedCrossEntropy(torch.autograd.Function):
    """Summed label-smoothed cross-entropy of ``[tokens, V]`` logits, computed a block of rows at a time.

    Per token, with p = softmax(x) and the target distribution q = (1 - ε)·onehot(y) + ε/V:
    loss = -Σ q·log p = -(1 - ε)·log p_y - ε·mean(log p), and d loss / d x = p - q. The forward keeps only
    log Σ exp(x) per row, the backward recomputes p from it, and each block of rows stays in the CPU cache
    (about half the time of ``F.cross_entropy(x.float(), label_smoothing=ε)`` forward + backward on a
    [3800 × 8000] bf16 batch, 2-core CPU). Labels equal to ``ignore_index`` contribute nothing.
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
        and _is_plain_linear(output_layer)
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
        raise ValueError(f"label_smoothing (epsilon) must be in [0, 1), got {label_smoothing}")
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
