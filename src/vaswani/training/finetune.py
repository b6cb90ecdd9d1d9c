"""``vaswani train --init-from``: start from a trained checkpoint instead of random weights.

The source is a Vaswani model folder or Hub id (weights, config and tokenizer reused) or a ``MarianMTModel``
one (OPUS-MT): converted in memory by :func:`vaswani.convert.marian_to_vaswani`, it keeps its SentencePiece
``MarianTokenizer`` and so its vocabulary. Everything that would silently train something else is refused
before anything is written: a checkpoint that is not a seq2seq translation model, weights that are missing,
truncated or do not fill the model (``from_pretrained`` would initialise the rest at random), a tokenizer
whose vocabulary is not the checkpoint's, and model settings that contradict the checkpoint's shape.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, MarianMTModel, PreTrainedConfig

from ..configuration import SHAPE_KEYS, WRITTEN_BY_TRANSFORMERS, VaswaniConfig
from ..convert import marian_to_vaswani
from ..modeling import VaswaniForConditionalGeneration
from ..translate import _looks_local, _unreachable, check_weights

#: Config fields a fine-tuning run may change: regularisation, not the shape of any weight (§5.4).
FINE_TUNING_KEYS = ("dropout", "attention_dropout", "activation_dropout")
#: Files that hold a transformers model's weights (whole or sharded).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: Parameters a checkpoint never stores: fixed sinusoid tables, rebuilt from the config.
_NOT_STORED = ("embed_positions",)


def _load_name(source: str) -> str:
    """What ``from_pretrained`` gets for ``source``: a local folder as its expanded path, else the Hub id."""
    path = Path(source).expanduser()
    return str(path) if path.exists() else source


def source_config(source: str) -> PreTrainedConfig:
    """The checkpoint's config, refusing a folder without one, an unreachable Hub id and anything that is not a
    Vaswani or Marian translation model."""
    path = Path(source).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(
            f"--init-from {source}: no config.json there, so it is not a saved model folder; pass the folder "
            "that save_pretrained() wrote (or a Hub id)."
        )
    if not path.exists() and _looks_local(source):
        raise ValueError(f"--init-from {source}: no such folder; pass a model folder or a Hub id.")
    try:
        config = AutoConfig.from_pretrained(_load_name(source))
    except OSError as err:
        raise _unreachable(source, err) from err
    except ValueError as err:  # an unknown model_type
        raise ValueError(f"--init-from {source}: {str(err).splitlines()[0]}") from None
    if config.model_type not in ("vaswani", "marian"):
        kind = "a seq2seq model of another architecture" if config.is_encoder_decoder else "not a seq2seq model"
        raise ValueError(
            f"--init-from {source}: a {config.model_type!r} checkpoint is {kind}; --init-from takes a Vaswani model "
            "(from `vaswani train` or `vaswani convert marian`) or a MarianMTModel (Helsinki-NLP/opus-mt-*). "
            "Train from scratch without --init-from otherwise."
        )
    return config


def _check_weight_files(source: str) -> None:
    """A local folder must hold readable weights: without them ``from_pretrained`` starts from random ones."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return  # a Hub id: the download is checked by from_pretrained's loading report
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(
            f"--init-from {source}: no weights there (none of {', '.join(WEIGHT_FILES)}); fine-tuning would start "
            "from random weights. Copy the model's weights into the folder, or train from scratch without "
            "--init-from."
        )
    check_weights(folder)


def _check_loading(source: str, info: Mapping[str, list]) -> None:
    """Refuse weights that left part of the model to random initialisation or did not fit it."""
    missing = [key for key in info.get("missing_keys", []) if not any(part in key for part in _NOT_STORED)]
    mismatched = [str(item[0] if isinstance(item, tuple) else item) for item in info.get("mismatched_keys", [])]
    if missing or mismatched:
        raise ValueError(
            f"--init-from {source}: the weights do not fill the model (missing {missing[:3]}, wrong shape "
            f"{mismatched[:3]}); they would start at random. Save the checkpoint again with save_pretrained()."
        )


def load_source_model(source: str) -> VaswaniForConditionalGeneration:
    """The checkpoint's weights as a Vaswani model: a Vaswani folder as it is, a Marian one converted."""
    config = source_config(source)
    _check_weight_files(source)
    cls = MarianMTModel if config.model_type == "marian" else VaswaniForConditionalGeneration
    model, info = cls.from_pretrained(_load_name(source), output_loading_info=True)
    _check_loading(source, info)
    if config.model_type == "marian":
        model = marian_to_vaswani(model)
    return model.train()


def load_source_tokenizer(source: str, tokenizer: str | os.PathLike[str] | None = None) -> Any:
    """The checkpoint's own tokenizer, or ``tokenizer`` when given; either must have its vocabulary."""
    try:
        own = AutoTokenizer.from_pretrained(_load_name(source))
    except ImportError as err:
        raise ImportError(f"the Marian tokenizer needs sentencepiece ({err}); pip install sentencepiece") from err
    except (OSError, ValueError, TypeError) as err:
        if tokenizer is None:
            raise ValueError(
                f"--init-from {source}: no tokenizer there ({str(err).splitlines()[0]}); save the tokenizer the "
                "model was trained with into the folder, or pass it with --tokenizer."
            ) from None
        own = None
    if tokenizer is None:
        return own
    given = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    if own is not None and given.get_vocab() != own.get_vocab():
        differ = len(set(given.get_vocab().items()) ^ set(own.get_vocab().items()))
        raise ValueError(
            f"--tokenizer {tokenizer} has another vocabulary than {source}'s own tokenizer ({differ} token-id "
            "pairs differ), so every id would mean another word; leave out --tokenizer to use the checkpoint's."
        )
    return given


def check_tokenizer_matches(config: VaswaniConfig, tokenizer: Any, source: str) -> None:
    """The tokenizer's ids must be the checkpoint's: no id past its vocabulary, the same special tokens."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but {source} has a vocabulary of {config.vocab_size}; "
            "use the tokenizer saved with the checkpoint (leave out --tokenizer)."
        )
    wrong = [
        f"{name}={getattr(config, name)} there but {getattr(tokenizer, name)} in the tokenizer"
        for name in ("pad_token_id", "eos_token_id")
        if getattr(config, name) != getattr(tokenizer, name)
    ]
    if wrong:
        raise ValueError(
            f"the tokenizer does not match {source}: {', '.join(wrong)}; use the tokenizer saved with the checkpoint."
        )


def _contradictions(wanted: Mapping[str, Any], config: VaswaniConfig) -> list[str]:
    return [
        f"{key}={value!r} but the checkpoint has {getattr(config, key, None)!r}"
        for key, value in wanted.items()
        if key not in FINE_TUNING_KEYS and key not in WRITTEN_BY_TRANSFORMERS and getattr(config, key, None) != value
    ]


def fine_tuning_config(
    config: VaswaniConfig,
    source: str,
    preset: str | None,
    config_file: Path | None,
    overrides: Mapping[str, Any],
) -> VaswaniConfig:
    """The checkpoint's config with the fine-tuning settings (dropouts) of ``overrides`` applied; a
    ``preset``, config.json file or override that would change its shape is refused."""
    problems = []
    if preset is not None:
        shape = VaswaniConfig.from_preset(preset)
        wrong = _contradictions({key: getattr(shape, key) for key in SHAPE_KEYS}, config)
        problems += [f"--preset {preset}: {item}" for item in wrong]
    if config_file is not None:
        saved = json.loads(config_file.read_text())
        problems += [f"--model-config {config_file}: {item}" for item in _contradictions(saved, config)]
    problems += [f"--set {item}" for item in _contradictions(overrides, config)]
    if problems:
        raise ValueError(
            f"--init-from {source} keeps the checkpoint's shape, which these contradict: {'; '.join(problems)}. "
            f"Leave them out (with --init-from only {', '.join(FINE_TUNING_KEYS)} can be --set)."
        )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


__all__ = [
    "FINE_TUNING_KEYS",
    "check_tokenizer_matches",
    "fine_tuning_config",
    "load_source_model",
    "load_source_tokenizer",
    "source_config",
]
