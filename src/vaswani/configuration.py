"""Hyper-parameters of the Transformer (Vaswani et al., 2017), with the paper's values as defaults.

Field names follow transformers' Marian/BART configs (``d_model``, ``encoder_layers``,
``encoder_attention_heads``, ``encoder_ffn_dim``, ...) so that generation, caches and the Trainer find
them; the docstring maps each to the paper's symbol.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from transformers import PreTrainedConfig

ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swish")
POSITION_TYPES = ("sinusoidal", "learned")
SINUSOID_LAYOUTS = ("interleaved", "concatenated")

#: The fields that give the weights their shapes in a preset (Table 3's N, d_model, d_ff, h).
SHAPE_KEYS = (
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
)

#: d_model 256, 3+3 layers of 4 heads, d_ff 1024: the shape of the "small" and "multi30k" presets.
SMALL_SHAPE: dict[str, Any] = {
    "d_model": 256,
    "encoder_layers": 3,
    "decoder_layers": 3,
    "encoder_ffn_dim": 1024,
    "decoder_ffn_dim": 1024,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
}

#: Rows of Table 3 and the small shapes this package trains on a CPU. Values not named keep the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # Table 3, "base": N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1 (65M parameters).
    "base": {},
    # Table 3, "big": N=6, d_model=1024, d_ff=4096, h=16, P_drop=0.3 (213M parameters).
    "big": {
        "d_model": 1024,
        "encoder_ffn_dim": 4096,
        "decoder_ffn_dim": 4096,
        "encoder_attention_heads": 16,
        "decoder_attention_heads": 16,
        "dropout": 0.3,
    },
    # The benchmark's small shape: d_model 256, 3+3 layers.
    "small": SMALL_SHAPE,
    # Multi30k (29k pairs) wants the small shape strongly regularised (as fairseq's "tiny" with dropout 0.3 shows).
    "multi30k": {**SMALL_SHAPE, "dropout": 0.3, "attention_dropout": 0.1, "activation_dropout": 0.1},
    # fairseq's "transformer_tiny" as Wu et al. (2021, "Good for misconceived reasons") trained it on Multi30k: 4+4
    # layers, d_model 128, d_ff 256, dropout 0.3 and none on attention weights or inside the FFN (fairseq's defaults).
    "multi30k-tiny": {
        "d_model": 128,
        "encoder_layers": 4,
        "decoder_layers": 4,
        "encoder_ffn_dim": 256,
        "decoder_ffn_dim": 256,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "dropout": 0.3,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
    },
    # A model that trains in minutes on a laptop CPU (the demo).
    "tiny": {
        "d_model": 128,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_ffn_dim": 512,
        "decoder_ffn_dim": 512,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
    },
}


class VaswaniConfig(PreTrainedConfig):
    r"""Configuration of [`VaswaniModel`] / [`VaswaniForConditionalGeneration`].

    Paper symbols (§3): ``d_model`` = d_model, ``encoder_layers``/``decoder_layers`` = N,
    ``*_attention_heads`` = h (d_k = d_v = d_model / h), ``*_ffn_dim`` = d_ff, ``dropout`` = P_drop (§5.4,
    on every sub-layer output and on the embedding + position sums).

    Options beyond the paper, as fairseq / tensor2tensor users expect them:
        attention_dropout: dropout on the attention probabilities.
        activation_dropout: dropout after the feed-forward activation.
        normalize_before: pre-norm ``x + Sublayer(LayerNorm(x))`` instead of the paper's post-norm
            ``LayerNorm(x + Sublayer(x))``; adds a final LayerNorm to encoder and decoder.
        position_embedding_type: ``"sinusoidal"`` (§3.5, any length) or ``"learned"`` (Table 3 row E,
            limited to ``max_position_embeddings``).
        sinusoid_layout: ``"interleaved"`` (the paper: sin on even, cos on odd dimensions) or
            ``"concatenated"`` (``[sin | cos]``, as Marian, fairseq and tensor2tensor).
        scale_embedding: multiply embeddings by sqrt(d_model) (§3.4).
        share_encoder_decoder_embeddings: one vocabulary for source and target (§3.4). When False the
            target vocabulary has ``decoder_vocab_size`` entries.
        tie_word_embeddings: tie the pre-softmax projection to the (target) embedding (§3.4).
        lm_head_bias: a bias on the pre-softmax projection (Marian checkpoints carry one).
        training_logits: whether a forward with ``labels`` in training mode also returns the logits. By default
            it returns only the loss, as liger-kernel's models do (``skip_logits``): transformers' ``Trainer``
            and hand-written loops read only the loss, and leaving the ``[batch, len, vocab]`` logits out lets
            the output layer and loss run as one step. Set True where a training loop reads ``outputs.logits``.
    """

    model_type = "vaswani"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "encoder_attention_heads",
        "num_hidden_layers": "encoder_layers",
    }

    vocab_size: int = 37000
    decoder_vocab_size: int | None = None
    d_model: int = 512
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    activation_function: str = "relu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    normalize_before: bool = False
    layer_norm_eps: float = 1e-5
    position_embedding_type: str = "sinusoidal"
    sinusoid_layout: str = "interleaved"
    max_position_embeddings: int = 1024
    scale_embedding: bool = True
    share_encoder_decoder_embeddings: bool = True
    tie_word_embeddings: bool = True
    lm_head_bias: bool = False
    training_logits: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | None = 3
    decoder_start_token_id: int | None = 2
    use_cache: bool = True
    is_encoder_decoder: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if self.decoder_vocab_size is None or self.share_encoder_decoder_embeddings:
            self.decoder_vocab_size = self.vocab_size
        super().__post_init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix for any value the network cannot use."""
        for name in ("vocab_size", "decoder_vocab_size", *SHAPE_KEYS, "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VaswaniConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            heads = getattr(self, name)
            if self.d_model % heads:
                raise ValueError(
                    f"VaswaniConfig.d_model ({self.d_model}) must be divisible by {name} ({heads}) so that "
                    f"d_k = d_v = d_model / h is whole (§3.2.2); choose e.g. {name}="
                    f"{_largest_divisor_at_most(self.d_model, heads)} or a d_model that is a multiple of {heads}."
                )
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"VaswaniConfig.{name} must be a probability in [0, 1), got {p!r}.")
        _check_choice("activation_function", self.activation_function, ACTIVATIONS)
        _check_choice("position_embedding_type", self.position_embedding_type, POSITION_TYPES)
        _check_choice("sinusoid_layout", self.sinusoid_layout, SINUSOID_LAYOUTS)
        if self.position_embedding_type == "sinusoidal" and self.d_model % 2:
            raise ValueError(
                f"VaswaniConfig.d_model ({self.d_model}) must be even for sinusoidal positions (§3.5: "
                "sin/cos pairs); use an even d_model or position_embedding_type='learned'."
            )
        vocab = min(self.vocab_size, self.decoder_vocab_size)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            token_id = getattr(self, name)
            if token_id is not None and not 0 <= token_id < vocab:
                raise ValueError(
                    f"VaswaniConfig.{name}={token_id} is outside the vocabulary (size {vocab}); set it to the "
                    "tokenizer's id for that special token or enlarge vocab_size."
                )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VaswaniConfig:
        """A config for a named row of Table 3 (``"base"``, ``"big"``) or a small CPU shape.

        >>> VaswaniConfig.from_preset("big", vocab_size=32000).d_model
        1024
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


#: Keys transformers writes into a config.json besides the config class's own fields.
WRITTEN_BY_TRANSFORMERS = (
    "_name_or_path", "architectures", "auto_map", "custom_pipelines", "dtype", "model_type", "torch_dtype",
    "transformers_version",
)


#: Fields earlier versions wrote that nothing reads any more: accepted in a config.json, and ignored.
RETIRED_KEYS = ("init_std",)


def known_config_keys() -> set[str]:
    """Every key a ``VaswaniConfig`` understands: its fields and aliases, the standard ``PreTrainedConfig``
    ones (``architectures``, ``auto_map``, ``dtype``, ...) that transformers reads and writes, and the
    :data:`RETIRED_KEYS` of older config.json files."""
    keys = set(VaswaniConfig().to_dict()) | set(VaswaniConfig.attribute_map) | set(WRITTEN_BY_TRANSFORMERS)
    keys |= set(RETIRED_KEYS)
    for cls in VaswaniConfig.__mro__:
        keys |= {name for name in getattr(cls, "__annotations__", {}) if not name.startswith("_")}
    return keys


def check_known_keys(keys: Iterable[str], known: Collection[str], where: str) -> None:
    """Raise ``ValueError`` for the first key not in ``known``, naming the nearest known one: a misspelt
    setting would otherwise be stored and ignored, and the run would train (or decode) something else."""
    for key in keys:
        if key not in known:
            nearest = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {nearest[0]!r}?" if nearest else "remove it or check the spelling."
            raise ValueError(f"{where}: unknown key {key!r}; {hint}")


def check_config_dict(config: Mapping[str, Any], where: str) -> None:
    """Unknown keys of a Vaswani config.json are errors; a config.json of another model type (written by
    another tool) only gets a warning listing the keys that will be ignored."""
    if config.get("model_type", VaswaniConfig.model_type) == VaswaniConfig.model_type:
        check_known_keys(config, known_config_keys(), where)
        return
    if ignored := sorted(set(config) - known_config_keys()):
        warnings.warn(
            f"{where} is a {config['model_type']!r} config, not a Vaswani one; its keys {', '.join(ignored)} "
            "are ignored.",
            stacklevel=2,
        )


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"VaswaniConfig.{field}={value!r} is not supported; use one of {', '.join(choices)}."
        )


def _largest_divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, k + 1) if n % d == 0)
