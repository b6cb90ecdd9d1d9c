"""Convert between transformers' ``MarianMTModel`` (OPUS-MT checkpoints) and :class:`VaswaniForConditionalGeneration`.

Marian is the same architecture (post-norm, sinusoidal positions, tied embeddings) with three choices
that the Vaswani config expresses: ``[sin | cos]`` positions (``sinusoid_layout="concatenated"``), a bias
on the output projection (``lm_head_bias``) and, in OPUS-MT, the swish activation. Weights are renamed,
not changed, so the converted model computes the same function.
"""

from __future__ import annotations

import re

import torch
from transformers import GenerationConfig, MarianConfig, MarianMTModel

from .configuration import VaswaniConfig
from .modeling import VaswaniForConditionalGeneration

#: (Marian name fragment, Vaswani name fragment); applied in order, each regex anchored on dots.
_NAME_MAP = [
    (r"\.self_attn_layer_norm\.", ".self_attn_add_norm.layer_norm."),
    (r"\.encoder_attn_layer_norm\.", ".encoder_attn_add_norm.layer_norm."),
    (r"\.final_layer_norm\.", ".feed_forward_add_norm.layer_norm."),
    (r"\.fc1\.", ".feed_forward.fc1."),
    (r"\.fc2\.", ".feed_forward.fc2."),
]
#: With separate vocabularies Marian has no ``shared`` table; Vaswani keeps the source table there.
_SOURCE_EMBEDDING = ("model.encoder.embed_tokens.weight", "model.shared.weight")


def _rename(name: str, to_vaswani: bool, shared_vocabulary: bool) -> str:
    if not shared_vocabulary and name in _SOURCE_EMBEDDING:
        return _SOURCE_EMBEDDING[1] if to_vaswani else _SOURCE_EMBEDDING[0]
    for marian, vaswani in _NAME_MAP:
        pattern, replacement = (marian, vaswani) if to_vaswani else (re.escape(vaswani), marian.replace("\\", ""))
        name = re.sub(pattern, replacement, name)
    return name


#: Hyper-parameters that Marian and Vaswani configs both have, under the same name and meaning.
_SHARED_CONFIG_FIELDS = (
    "vocab_size",
    "decoder_vocab_size",
    "share_encoder_decoder_embeddings",
    "tie_word_embeddings",
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "activation_function",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "max_position_embeddings",
    "scale_embedding",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
)


def _shared_fields(config: MarianConfig | VaswaniConfig) -> dict:
    return {name: getattr(config, name) for name in _SHARED_CONFIG_FIELDS}


def vaswani_config_from_marian(config: MarianConfig) -> VaswaniConfig:
    """The Vaswani config that computes what a Marian config computes; refuses what it cannot express."""
    if getattr(config, "normalize_before", False) or getattr(config, "add_final_layer_norm", False):
        raise ValueError(
            "This Marian checkpoint uses pre-norm layers, which Marian checkpoints never do; cannot convert."
        )
    if config.encoder_layerdrop or config.decoder_layerdrop:
        raise ValueError(
            "LayerDrop is not part of the Vaswani model; set encoder/decoder_layerdrop=0 before converting."
        )
    if config.activation_function not in ("relu", "gelu", "gelu_new", "silu", "swish"):
        raise ValueError(f"Marian activation {config.activation_function!r} has no Vaswani equivalent.")
    return VaswaniConfig(**_shared_fields(config), sinusoid_layout="concatenated", lm_head_bias=True)


def marian_config_from_vaswani(config: VaswaniConfig) -> MarianConfig:
    """The Marian config for a Vaswani model; refuses options Marian does not have (pre-norm, learned or
    interleaved positions)."""
    problems = []
    if config.normalize_before:
        problems.append("normalize_before=True (Marian is post-norm)")
    if config.position_embedding_type != "sinusoidal" or config.sinusoid_layout != "concatenated":
        problems.append(
            f"positions {config.position_embedding_type}/{config.sinusoid_layout} (Marian has concatenated sinusoids)"
        )
    if problems:
        raise ValueError("Cannot export to Marian: " + "; ".join(problems) + ".")
    return MarianConfig(**_shared_fields(config), forced_eos_token_id=None)


def _without_positions(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if "embed_positions" not in k}


def marian_to_vaswani(marian: MarianMTModel) -> VaswaniForConditionalGeneration:
    """A :class:`VaswaniForConditionalGeneration` with the weights of ``marian`` (same outputs)."""
    config = vaswani_config_from_marian(marian.config)
    model = VaswaniForConditionalGeneration(config).to(marian.dtype)
    state = {}
    for name, tensor in _without_positions(marian.state_dict()).items():
        if name == "final_logits_bias":
            state["lm_head.bias"] = tensor.reshape(-1)
        else:
            state[_rename(name, True, config.share_encoder_decoder_embeddings)] = tensor
    _load_exactly(model, state)
    model.generation_config = GenerationConfig.from_dict(marian.generation_config.to_dict())
    return model.eval()


def vaswani_to_marian(model: VaswaniForConditionalGeneration) -> MarianMTModel:
    """A transformers ``MarianMTModel`` with the weights of ``model`` (e.g. for CTranslate2's converter)."""
    marian = MarianMTModel(marian_config_from_vaswani(model.config)).to(model.dtype)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.bias":
            state["final_logits_bias"] = tensor.reshape(1, -1)
        else:
            state[_rename(name, False, model.config.share_encoder_decoder_embeddings)] = tensor
    if "final_logits_bias" not in state:
        state["final_logits_bias"] = torch.zeros(1, model.config.decoder_vocab_size, dtype=model.dtype)
    _load_exactly(marian, state)
    marian.generation_config = GenerationConfig.from_dict(model.generation_config.to_dict())
    return marian.eval()


def _load_exactly(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state``; every parameter of ``model`` except fixed position tables must be filled."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if "embed_positions" not in k]
    tied = {k for k in missing if k.endswith("embed_tokens.weight") or k == "lm_head.weight"}
    missing = [k for k in missing if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Weights do not match the converted architecture: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}."
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def convert_marian_checkpoint(path_or_id: str, output_dir: str) -> VaswaniForConditionalGeneration:
    """``vaswani convert marian``: a ``MarianMTModel`` folder or Hub id (OPUS-MT) → a Vaswani model folder.

    The weights are converted by :func:`marian_to_vaswani` and the generation config is Marian's, so the
    folder translates as the original does. The tokenizer is saved as it is (``MarianTokenizer``: the
    SentencePiece models ``source.spm``/``target.spm`` and ``vocab.json``); it cannot become the package's
    byte-level BPE without changing every token id, and it needs ``sentencepiece`` installed to load.
    """
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    out = Path(output_dir)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a model (config.json); choose a new output folder.")
    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load {path_or_id!r} as a local model folder or reach it on the Hugging Face Hub "
            f"({str(err).splitlines()[0]}). Without a network, download it elsewhere "
            f"(`hf download {path_or_id} --local-dir DIR`) and pass the folder."
        ) from err
    if config.model_type != "marian":
        raise ValueError(
            f"{path_or_id!r} is a {config.model_type!r} checkpoint; only MarianMTModel checkpoints "
            "(model_type 'marian', e.g. Helsinki-NLP/opus-mt-*) convert."
        )
    vaswani_config_from_marian(config)  # refuses what cannot be expressed before loading the weights
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    except ImportError as err:
        raise ImportError(
            f"The Marian tokenizer needs sentencepiece ({err}); install it: pip install sentencepiece"
        ) from err
    model = marian_to_vaswani(MarianMTModel.from_pretrained(path_or_id))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model
