"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), piece by piece.

Reading order follows the paper:

* §3.4 the token embedding scaled by sqrt(d_model), §3.5 :class:`SinusoidalPositionalEncoding`
  (or :class:`LearnedPositionalEmbedding`), summed and dropped out in :class:`EmbeddingWithPositions`.
* §3.2 :func:`scaled_dot_product_attention` and :class:`MultiHeadAttention` (Q/K/V projections, split into
  h heads, attention, concatenation, output projection).
* §3.1 :class:`AddNorm` (residual connection + layer normalization) and §3.3 :class:`PositionwiseFeedForward`.
* §3.1 :class:`EncoderLayer` (self-attention, feed-forward) and :class:`DecoderLayer` (masked
  self-attention, encoder-decoder attention, feed-forward), stacked N times in :class:`VaswaniEncoder`
  and :class:`VaswaniDecoder`.
* :class:`VaswaniModel` (encoder + decoder) and :class:`VaswaniForConditionalGeneration` (+ the
  pre-softmax projection tied to the embeddings, §3.4).
* Input checks that name the fix for bad input.

Speed paths that compute the same live beside this file: :mod:`.unpadded` (training without the padding, a
cheaper CPU dropout, Eq. 1 written out in CPU training), :mod:`.losses` (the label-smoothed loss computed in
blocks) and, for ``generate()``, :mod:`.generation` and :mod:`.decoding` (the paper's decoding and our
incremental search). This file imports only torch, transformers and these siblings, which ``save_pretrained``
copies with it, so that a saved model folder runs with ``trust_remote_code=True`` where this package is not
installed.
"""

import copy
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
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
from .generation import VaswaniGenerationMixin, apply_paper_generation_defaults
from .losses import output_layer_cross_entropy, token_cross_entropy
from .perf import tune_cpu_decoding_once, tune_cpu_training_once
from .unpadded import (
    FastDropout,
    Unpadded,
    additive_mask,
    apply_dropout,
    explicit_attention_is_faster,
    is_plain_linear,
    swap_batch_and_heads,
    unpadded_for,
    up_to_last_real,
)

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
        self.dropout = FastDropout(config.dropout)

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

    def project(
        self, x: torch.Tensor, linears: tuple[nn.Linear, ...], unpadded: Unpadded | None
    ) -> list[torch.Tensor]:
        """``linear(x)`` for each of ``linears``, split into heads (``[batch, heads, len, d_k]``); ``x`` holds the
        real tokens only when ``unpadded`` is given. In training, plain ``nn.Linear`` s (no hooks, no adapters)
        run as one matrix multiply with their weights side by side: fewer, larger products and one padding.
        Decoding keeps them apart, where copying the weights side by side for a few rows would cost more than it
        saves."""
        joinable = all(is_plain_linear(linear) and linear.bias is not None for linear in linears)
        if self.training and len(linears) > 1 and joinable:
            weight = torch.cat([linear.weight for linear in linears])
            bias = torch.cat([linear.bias for linear in linears])
            projected = [(F.linear(x, weight, bias), len(linears))]
        else:
            projected = [(linear(x), 1) for linear in linears]
        if unpadded is not None:
            return [head for y, parts in projected for head in unpadded.pad_heads(y, parts, self.num_heads)]
        return [self.split_heads(part) for y, parts in projected for part in y.chunk(parts, dim=-1)]

    def keys_and_values(
        self, source: torch.Tensor, cache: EncoderDecoderCache | None, unpadded: Unpadded | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Project K and V, reusing or extending the decoding cache (§3.2.3, incremental decoding)."""
        if cache is not None and self.is_cross_attention and cache.is_updated.get(self.layer_idx):
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            return layer.keys, layer.values
        key, value = self.project(source, (self.k_proj, self.v_proj), unpadded)
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
        unpadded: Unpadded | None = None,
        encoder_unpadded: Unpadded | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """In training the stacks may leave out the padding (:mod:`.unpadded`): with ``unpadded``
        (``encoder_unpadded``), ``hidden_states`` (the encoder's ``key_value_states``) are the real tokens only,
        ``[tokens, d_model]``, and so is the result."""
        if cache is None and not self.is_cross_attention:  # self-attention without a cache: Q, K, V together
            query, key, value = self.project(hidden_states, (self.q_proj, self.k_proj, self.v_proj), unpadded)
        else:
            (query,) = self.project(hidden_states, (self.q_proj,), unpadded)
            if self.is_cross_attention:
                key, value = self.keys_and_values(key_value_states, cache, encoder_unpadded)
            else:
                key, value = self.keys_and_values(hidden_states, cache, unpadded)
        return self.attend(query, key, value, attention_mask, unpadded, **kwargs)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        unpadded: Unpadded | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the projected heads (``[batch, heads, len, d_k]``), concatenated and projected by W^O:
        ``[batch, q_len, d_model]`` (the real tokens only with ``unpadded``) and the attention weights (where the
        implementation returns them)."""
        implementation = self.config._attn_implementation
        if implementation == "sdpa" and explicit_attention_is_faster(query, key):
            implementation = "eager"
            lengths = (query.shape[-2], key.shape[-2])
            attention_mask = additive_mask(attention_mask, self.is_causal, *lengths, query.device)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, scaled_dot_product_attention)
        # Padded-again heads are stored heads outermost (Unpadded.pad_heads). Eq. 1 treats both leading dimensions
        # alike, so the written-out function runs on [heads, batch, ...] and its products read them in place.
        heads_outermost = unpadded is not None and attention is scaled_dot_product_attention
        if heads_outermost:
            query, key, value, attention_mask = map(swap_batch_and_heads, (query, key, value, attention_mask))
        dropout = self.dropout if self.training else 0.0
        heads, weights = attention(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
        )
        if heads_outermost:  # [heads, q_len, batch, d_k] -> [batch, q_len, heads, d_k]
            heads, weights = heads.transpose(0, 2), swap_batch_and_heads(weights)
        if unpadded is not None:
            heads = unpadded.unpad(heads)
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
        self.dropout = FastDropout(config.dropout)
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
        self.activation_dropout = FastDropout(config.activation_dropout)
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
        **kwargs,
    ) -> torch.Tensor:
        attended, _ = self.self_attn(
            self.self_attn_add_norm.sublayer_input(hidden_states), attention_mask=attention_mask, **kwargs
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
        **kwargs,
    ) -> torch.Tensor:
        attended, _ = self.self_attn(
            self.self_attn_add_norm.sublayer_input(hidden_states), attention_mask=attention_mask, cache=cache, **kwargs
        )
        hidden_states = self.self_attn_add_norm(hidden_states, attended)
        attended, _ = self.encoder_attn(
            self.encoder_attn_add_norm.sublayer_input(hidden_states),
            key_value_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            cache=cache,
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

    def train(self, mode: bool = True) -> "VaswaniPreTrainedModel":
        """``nn.Module.train``; the first time a model trains on a CPU, it also applies the process settings that
        make CPU training faster (:func:`.perf.tune_cpu_training_once`; ``VASWANI_TUNE_CPU=0`` keeps them off)."""
        if mode:
            tune_cpu_training_once(self.device)
        return super().train(mode)

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
        unpadded = unpadded_for(attention_mask, self.training, kwargs)
        if unpadded is not None:
            hidden_states = unpadded.unpad(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, unpadded=unpadded, **kwargs)
        hidden_states = self.final_norm(hidden_states)
        if unpadded is not None:
            hidden_states = unpadded.pad(hidden_states)
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
        loss_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """``loss_positions`` (``[batch, len]``, optional): the target positions whose outputs the loss reads; in
        training the positions after each row's last one are skipped (:mod:`.unpadded`) and their outputs are
        zeros. Without it, those after each row's last one that ``attention_mask`` keeps."""
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
        needed = up_to_last_real(attention_mask if loss_positions is None else loss_positions)
        unpadded = unpadded_for(needed, self.training, kwargs)
        encoder_unpadded = unpadded_for(encoder_attention_mask, self.training, kwargs)
        if unpadded is not None:
            hidden_states = unpadded.unpad(hidden_states)
        if encoder_unpadded is not None:
            encoder_hidden_states = encoder_unpadded.unpad(encoder_hidden_states)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                self_mask,
                encoder_hidden_states,  # positional, so gradient checkpointing passes it through
                encoder_attention_mask=cross_mask,
                cache=cache,
                unpadded=unpadded,
                encoder_unpadded=encoder_unpadded,
                **kwargs,
            )
        hidden_states = self.final_norm(hidden_states)
        if unpadded is not None:
            hidden_states = unpadded.pad(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, cache=cache)


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
        decoder_loss_positions: torch.Tensor | None = None,
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
            loss_positions=decoder_loss_positions,
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


class VaswaniForConditionalGeneration(VaswaniPreTrainedModel, VaswaniGenerationMixin, GenerationMixin):
    """The translation model: :class:`VaswaniModel` + the pre-softmax linear projection (§3.4).

    ``generate()`` decodes with our incremental beam / greedy search (:mod:`.decoding`) where it supports the
    request and with transformers' loops otherwise (or when asked with ``decoding_loop="transformers"``).

    With ``labels`` the loss is the cross-entropy of the next target token, summed over non-ignored
    positions and divided by ``num_items_in_batch`` when the Trainer passes it (so that gradient
    accumulation matches one large batch), else by the number of those positions.
    """

    #: Pipelines a saved model declares in config.json (``custom_pipelines``, task → spec), their code copied
    #: beside the model's: ``import vaswani`` puts its translation pipelines (``pipeline.py``) here.
    saved_pipelines: dict[str, dict] = {}

    def __init__(self, config: VaswaniConfig) -> None:
        super().__init__(config)
        self.model = VaswaniModel(config)
        self.lm_head = nn.Linear(config.d_model, config.decoder_vocab_size, bias=config.lm_head_bias)
        shared = config.share_encoder_decoder_embeddings
        target_embedding = "model.shared.weight" if shared else "model.decoder.embed_tokens.weight"
        self._tied_weights_keys = {"lm_head.weight": target_embedding}
        self.post_init()
        apply_paper_generation_defaults(self.generation_config)

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
        skip_logits: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        """With ``labels``: the loss, label-smoothed by ``smoothing`` = ε_ls (§5.4; named without "label" so
        that transformers' Trainer takes only ``labels`` for a label column). In training only the
        positions up to each row's last label are computed (:mod:`.unpadded`), and the output layer and
        loss run on the labelled positions alone; ``logits`` are zeros at the others.

        ``skip_logits=True`` (the name and default liger-kernel models use) returns ``logits=None`` instead of
        laying them out as ``[batch, len, vocab]``: a training step reads only the loss, and accelerate's mixed
        precision would copy them to fp32. Left at None it is True in training with ``labels`` unless
        ``config.training_logits`` is set."""
        if skip_logits is None:
            skip_logits = self.training and labels is not None and not self.config.training_logits
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
            decoder_loss_positions=labelled,
            **kwargs,
        )
        hidden_states, loss, logits = outputs.last_hidden_state, None, None
        unpadded = None if labels is None else unpadded_for(labelled, self.training, kwargs)
        if unpadded is not None:  # the output layer and the loss on the labelled positions
            hidden_states, labels = unpadded.unpad(hidden_states), unpadded.unpad(labels)
        if labels is not None and skip_logits:
            loss = output_layer_cross_entropy(self.lm_head, hidden_states, labels, num_items_in_batch, smoothing)
        else:
            logits = self.lm_head(hidden_states)
            if labels is not None:
                loss = token_cross_entropy(logits, labels, num_items_in_batch, smoothing)
            if skip_logits:
                logits = None
            elif unpadded is not None:
                logits = unpadded.pad(logits)
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
        :func:`keep_mask`) in every step, the source lengths of the output limit included. The first time a model
        generates on a CPU, the process keeps freed memory for reuse (:func:`.perf.tune_cpu_decoding_once`;
        ``VASWANI_TUNE_CPU=0`` keeps it off)."""
        tune_cpu_decoding_once(self.device)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = keep_mask(kwargs["attention_mask"])
        return super().generate(inputs, generation_config=generation_config, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """``PreTrainedModel.save_pretrained``, declaring the :attr:`saved_pipelines` (or those the loaded config
        declared) and copying their code beside the model's, so that ``pipeline(task, model=folder,
        trust_remote_code=True)`` works where this package is not installed. A model sharded by FSDP2 is saved as
        an unsharded one: its own class, each tied weight once."""
        if self.saved_pipelines:
            self.config.custom_pipelines = copy.deepcopy(self.saved_pipelines)
        if not os.path.isfile(save_directory):  # else transformers reports the file
            os.makedirs(save_directory, exist_ok=True)
            for spec in (getattr(self.config, "custom_pipelines", None) or {}).values():
                code = Path(__file__).with_name(f"{spec['impl'].split('.')[0]}.py")
                if code.is_file():
                    shutil.copyfile(code, Path(save_directory) / code.name)
        state_dict = kwargs.get("state_dict")
        if state_dict is not None:  # gathered from FSDP's shards, a tied weight comes once per name: keep its source
            tied = self.all_tied_weights_keys
            kwargs["state_dict"] = {name: v for name, v in state_dict.items() if tied.get(name) not in state_dict}
        # FSDP2's fully_shard swaps the class for FSDP<Name>, defined in torch: transformers would copy torch's
        # files as the model's code and name that class in auto_map, so the model is saved as its own class
        sharded_class, self.__class__ = type(self), _unsharded_class(type(self))
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = sharded_class

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Used by ``DataCollatorForSeq2Seq(model=...)`` so label-smoothed Trainer runs get decoder inputs."""
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)


def _unsharded_class(cls: type) -> type:
    """The class a model was built as: FSDP2's ``fully_shard`` makes it ``FSDP<Name>(FSDPModule, Name)``."""
    own = cls.__bases__[-1]
    return own if cls.__name__ == f"FSDP{own.__name__}" else cls


# ----------------------------------------------------------------------------------------------------------
# Input checks: bad input fails here with the fix, not deep in torch
# ----------------------------------------------------------------------------------------------------------


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
