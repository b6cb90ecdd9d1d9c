"""Convert between transformers' ``MarianMTModel`` (OPUS-MT checkpoints) and :class:`VaswaniForConditionalGeneration`.

Marian is the same architecture (post-norm, sinusoidal positions, tied embeddings) with three choices
that the Vaswani config expresses: ``[sin | cos]`` positions (``sinusoid_layout="concatenated"``), a bias
on the output projection (``lm_head_bias``) and, in OPUS-MT, the swish activation. Weights are renamed,
not changed, so the converted model computes the same function.

The other way (``vaswani export marian``), the paper's interleaved positions (sin on even, cos on odd
dimensions) are a fixed permutation of Marian's ``[sin | cos]``. Permuting the model dimension (the residual
stream) everywhere at once (embeddings, every matrix that reads from or writes to it, the LayerNorms) computes
the same function, so an interleaved model exports exactly too.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, MarianConfig, MarianMTModel

from .configuration import SHAPE_KEYS, VaswaniConfig
from .generation import PAPER_DECODING_FIELDS
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
    *SHAPE_KEYS,
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


#: Marian's LayerNorms use torch's default epsilon.
_MARIAN_LAYER_NORM_EPS = 1e-5


def marian_config_from_vaswani(config: VaswaniConfig) -> MarianConfig:
    """The Marian config for a Vaswani model; refuses options Marian does not have (pre-norm, learned
    positions, another LayerNorm epsilon). Either sinusoid layout is fine (see :func:`residual_permutation`)."""
    problems = []
    if config.normalize_before:
        problems.append("normalize_before=True (Marian is post-norm)")
    if config.position_embedding_type != "sinusoidal":
        problems.append(f"{config.position_embedding_type} positions (Marian has fixed sinusoids)")
    if config.layer_norm_eps != _MARIAN_LAYER_NORM_EPS:
        problems.append(f"layer_norm_eps={config.layer_norm_eps} (Marian's LayerNorms use {_MARIAN_LAYER_NORM_EPS})")
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


def residual_permutation(config: VaswaniConfig) -> torch.Tensor | None:
    """Marian's dimension ``j`` of the model dimension is ours ``permutation[j]``: ``[0, 2, 4, ..., 1, 3, 5, ...]``
    puts the interleaved sines (even) and cosines (odd) into Marian's ``[sin | cos]``. None when no permutation
    is needed (concatenated layout)."""
    if config.sinusoid_layout == "concatenated":
        return None
    return torch.cat((torch.arange(0, config.d_model, 2), torch.arange(1, config.d_model, 2)))


#: (name ending, axes along the model dimension) for every Vaswani weight: the residual stream is read by the
#: embeddings' rows (and the tied output layer), by Q/K/V and fc1 (their inputs), written by out_proj and fc2
#: (their outputs and biases) and normalised by the LayerNorms; the other biases and the output bias lie elsewhere.
_RESIDUAL_AXES = (
    (r"(shared|embed_tokens|lm_head)\.weight", (1,)),
    (r"(q_proj|k_proj|v_proj|fc1)\.weight", (1,)),
    (r"(out_proj|fc2)\.(weight|bias)", (0,)),
    (r"layer_norm\.(weight|bias)", (0,)),
    (r"(q_proj|k_proj|v_proj|fc1|lm_head)\.bias", ()),
)


def _residual_axes(name: str) -> tuple[int, ...]:
    for pattern, axes in _RESIDUAL_AXES:
        if re.search(rf"(^|\.){pattern}$", name):
            return axes
    raise ValueError(f"Cannot export to Marian: weight {name!r} has no Marian counterpart.")


def permute_residual_stream(state: dict[str, torch.Tensor], permutation: torch.Tensor) -> dict[str, torch.Tensor]:
    """``state`` with the model dimension of every weight reordered by ``permutation`` (same function)."""
    permuted = {}
    for name, tensor in state.items():
        for axis in _residual_axes(name):
            tensor = tensor.index_select(axis, permutation.to(tensor.device))
        permuted[name] = tensor
    return permuted


def vaswani_to_marian(model: VaswaniForConditionalGeneration) -> MarianMTModel:
    """A transformers ``MarianMTModel`` with the weights of ``model``, computing the same function (for
    ``vaswani export marian`` and CTranslate2's converter); interleaved positions become Marian's ``[sin | cos]``
    by :func:`permute_residual_stream`."""
    marian = MarianMTModel(marian_config_from_vaswani(model.config)).to(model.dtype)
    weights = model.state_dict()
    permutation = residual_permutation(model.config)
    if permutation is not None:
        weights = permute_residual_stream(weights, permutation)
    state = {}
    for name, tensor in weights.items():
        if name == "lm_head.bias":
            state["final_logits_bias"] = tensor.reshape(1, -1)
        else:
            state[_rename(name, False, model.config.share_encoder_decoder_embeddings)] = tensor
    if "final_logits_bias" not in state:
        state["final_logits_bias"] = torch.zeros(1, model.config.decoder_vocab_size, dtype=model.dtype)
    _load_exactly(marian, state)
    marian.generation_config = marian_generation_config(model.generation_config, model.config)
    return marian.eval()


def marian_generation_config(generation_config: GenerationConfig, config: VaswaniConfig) -> GenerationConfig:
    """``generation_config`` for transformers' own ``generate()``: beam size, length penalty α, special ids and
    early stopping carry over; the paper's additions (:data:`PAPER_DECODING_FIELDS`) cannot, and a warning says
    what changes. The per-sentence limit ``max_len_a`` · source length + ``max_len_b`` becomes one limit,
    ``max_length`` = the position table's size (the longest output Marian can decode)."""
    settings = generation_config.to_dict()
    paper = {name: settings.pop(name, None) for name in (*PAPER_DECODING_FIELDS, "decoding_loop")}
    if paper["length_penalty_type"] == "gnmt":
        warnings.warn(
            f"MarianMTModel has no GNMT length penalty ((5 + |Y|) / 6)^alpha: its beam search divides by |Y|^alpha "
            f"(alpha = {settings.get('length_penalty', 1.0)}), so a few beam translations may differ.",
            stacklevel=2,
        )
    if paper["max_len_a"] is not None or paper["max_len_b"] is not None:
        if settings.get("max_length") is None and settings.get("max_new_tokens") is None:
            settings["max_length"] = config.max_position_embeddings
        warnings.warn(
            f"MarianMTModel has no per-sentence output limit (max_len_a={paper['max_len_a']} * source length + "
            f"max_len_b={paper['max_len_b']}); the export stops at max_length={settings.get('max_length')} tokens "
            "instead (pass max_new_tokens to generate() for another limit).",
            stacklevel=2,
        )
    return GenerationConfig.from_dict(settings)


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


def export_marian(model_dir: str | Path, output_dir: str | Path, overwrite: bool = False) -> MarianMTModel:
    """``vaswani export marian``: a Vaswani model folder (or Hub id) → a ``MarianMTModel`` folder with its
    tokenizer, which plain transformers loads without this package and without remote code.

    The weights come from :func:`vaswani_to_marian` (same function), the generation config from
    :func:`marian_generation_config`, the tokenizer is saved as it is (a ``PreTrainedTokenizerFast`` or Marian's
    SentencePiece files), so the ids are the same. The folder is written next to ``output_dir`` and moved there
    when complete: a failure leaves nothing half-written. An ``output_dir`` that holds a model is replaced only
    with ``overwrite``; one that holds other files is refused.
    """
    out = Path(output_dir)
    check_export_folder(out, overwrite)
    model, tokenizer = load_vaswani_for_export(model_dir)
    marian = vaswani_to_marian(model)

    def write(folder: Path) -> None:
        marian.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_folder_whole(out, write)
    return marian


def load_vaswani_for_export(model_dir: str | Path) -> tuple[VaswaniForConditionalGeneration, Any]:
    """The Vaswani model and tokenizer in ``model_dir``; any other model type is refused."""
    from .translate import load_translation_model

    model, tokenizer = load_translation_model(str(model_dir), fast_linears=False)
    if not isinstance(model, VaswaniForConditionalGeneration):
        raise ValueError(
            f"{model_dir} holds a {model.config.model_type!r} model, not a Vaswani one; export takes a folder "
            "saved by `vaswani train` or VaswaniForConditionalGeneration.save_pretrained()."
        )
    return model, tokenizer


def write_folder_whole(out: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a new folder beside ``out`` and move it to ``out`` once complete: a failure leaves
    nothing half-written, and a model already in ``out`` is replaced only by a finished one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as staging:
        new = Path(staging) / "model"
        write(new)
        old = Path(staging) / "old"
        if out.exists():
            out.rename(old)  # deleted with the staging folder once the new one is in place
        try:
            new.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)
            raise


def check_export_folder(out: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, a folder holding a model (unless ``overwrite``) or other files."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a new folder for the exported model.")
    if (out / "config.json").exists():
        if not overwrite:
            raise FileExistsError(f"{out} already holds a model (config.json); pass --overwrite to replace it "
                                  "or choose a new folder.")
    elif out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} holds files but no model; choose a new or empty folder.")
