"""Translating text with a saved model: loading (folder or Hub id), length-sorted token batches, line alignment.

:func:`translate` is what ``vaswani translate`` runs. Sentences are sorted by token length and packed into
batches of at most ``max_tokens`` source tokens (rows × longest row, as in training, §5.1), decoded with the
model's ``generate()`` (for Vaswani models the paper's beam search, §6.1) and put back in input order. Blank
lines come back as empty lines without being decoded, and a line break in a translation becomes a space,
so output line *i* is always the translation of input line *i*.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .perf import warn_if_bf16_emulated

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Loaded in float32, then every linear layer in int8 (:mod:`vaswani.cpu_linears`; CPU).
INT8 = "int8"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "source.spm", "vocab.json", "spiece.model")


class ModelNotFoundError(FileNotFoundError):
    """A model folder or Hub id that cannot be loaded, with what to do instead."""


def _check_local_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"{folder} has no config.json, so it is not a saved model folder; save one with "
            "model.save_pretrained(folder) (and tokenizer.save_pretrained(folder))."
        )
    _check_model_type(folder / "config.json")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer the model was "
            "trained with into the same folder: tokenizer.save_pretrained(folder)."
        )
    check_weights(folder)


def _check_model_type(config_file: Path) -> None:
    """Refuse a config whose ``model_type`` no installed class handles: transformers would offer to run the
    folder's own code (a y/N prompt) or fail deep inside."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{config_file} is not a JSON object ({err}); save the model again.") from None
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"{config_file} has model_type {model_type!r}, which neither transformers nor vaswani provides; "
            "pass a Vaswani (or other transformers seq2seq) model folder, or install the package that defines it."
        )


def check_weights(folder: str | os.PathLike[str]) -> None:
    """Refuse model weight files in ``folder`` (``model.safetensors`` or its shards ``model-*.safetensors``)
    that are cut short or not safetensors, naming the file (loading them fails with a bare
    ``SafetensorError``). Reads only the headers; other ``.safetensors`` files are not the model's."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(folder).glob("model*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError as err:
            raise ValueError(
                f"{file} is truncated or damaged ({err}); copy or download the model again, or save it again "
                "with save_pretrained()."
            ) from None


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id: starts with ./ ../ / or ~, or has a path separator but is not owner/name."""
    if name in (".", "..") or name.startswith(("./", "../", "/", "~", f".{os.sep}", f"..{os.sep}", os.sep)):
        return True
    return os.sep in name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is None


def check_device(device: str) -> None:
    """Refuse a ``device`` that is malformed or that this machine lacks, with a message instead of a traceback."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device; use cpu, cuda, cuda:1, mps, ...") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                         "use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPUs, numbered from 0")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine; use --device cpu")


def _unreachable(model_id: str, err: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not reach {model_id!r} on the Hugging Face Hub and it is not a local folder ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else 'no details'}). Without a network, download it elsewhere "
        f"(`hf download {model_id} --local-dir MODEL_DIR`), copy the folder here and pass its path instead."
    )


def load_translation_model(
    model_id_or_path: str | os.PathLike[str], device: str = "cpu", dtype: str = "float32", fast_linears: bool = True
) -> tuple[Any, Any]:
    """Load a seq2seq model and its tokenizer from a folder or Hub id, in eval mode on ``device``/``dtype``
    (one of :data:`DTYPES`, or ``"int8"``: float32 with int8 linear layers, on the CPU).

    The model is for translating: with ``fast_linears`` a float32 model on the CPU gets its linear layers'
    weights laid out once for oneDNN or MKL, whichever multiplies faster on this CPU
    (:func:`vaswani.cpu_linears.pack_linear_layers`), and its decoder layers fused
    (:func:`vaswani.fused_decoder.fuse_decoder_layers`): the same function, faster at decoding's few rows per step.
    Pass ``fast_linears=False`` for a model to train, save or convert.

    Vaswani folders load with the package's classes; other transformers seq2seq models (e.g. Marian) too; a
    folder's own code is never run. Raises :class:`ModelNotFoundError` naming the problem (no such folder, no
    config, no tokenizer, Hub unreachable) and ``ValueError`` for damaged weights, an unknown model type or a
    device this machine lacks, before loading anything.
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    import vaswani  # noqa: F401  (registers the Vaswani classes with the Auto classes)

    if dtype not in (*DTYPES, INT8):
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join((*DTYPES, INT8))}")
    check_device(device)
    if dtype == INT8 and torch.device(device).type != "cpu":
        raise ValueError(f"dtype int8 runs on the CPU only (torch's int8 products); use --device cpu, or bfloat16 "
                         f"on {device}")
    if dtype == "bfloat16" and torch.device(device).type == "cpu":
        warn_if_bf16_emulated("translating")
    name = os.fspath(model_id_or_path)
    source = Path(name).expanduser()
    if source.exists():
        if not source.is_dir():
            raise ModelNotFoundError(f"{source} is a file; pass the model folder that holds config.json")
        _check_local_folder(source)
        name = str(source)
    elif _looks_local(name):
        raise ModelNotFoundError(f"no such folder: {name}; pass the folder that holds the model's config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        model = AutoModelForSeq2SeqLM.from_pretrained(
            name, dtype=DTYPES.get(dtype, torch.float32), trust_remote_code=False
        )
    except OSError as err:
        if source.exists():
            raise
        raise _unreachable(name, err) from err
    model = model.to(device).eval()
    from .cpu_linears import pack_linear_layers, quantize_linear_layers
    from .fused_decoder import fuse_decoder_layers

    if dtype == INT8:
        quantize_linear_layers(model)
    elif fast_linears:
        fuse_decoder_layers(pack_linear_layers(model))
    return model, tokenizer


def _one_line(text: str) -> str:
    """A translation on one line: line breaks (which would shift the output lines) become spaces."""
    return " ".join(text.splitlines())


#: Source tokens per translation batch. Each decoding step has a fixed cost (Python, small products, the beam
#: step) that a larger batch shares among more sentences; beyond a few thousand tokens the caches grow with
#: little gain.
DEFAULT_MAX_TOKENS = 2048


def token_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first) and packed so that rows × longest row <= ``max_tokens``
    (a single longer sentence gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


#: Lower bounds of ``generate`` arguments that would otherwise fail deep inside or give empty translations.
GENERATE_MINIMUMS = {"num_beams": (1, "--beam"), "max_len_a": (0, "--max-len-a"), "max_len_b": (0, "--max-len-b")}


def check_generate_kwargs(generate_kwargs: dict[str, Any]) -> None:
    """Refuse a beam size below 1 and a negative output limit (a·source length + b) with the option to fix."""
    for key, (minimum, option) in GENERATE_MINIMUMS.items():
        value = generate_kwargs.get(key)
        if value is not None and value < minimum:
            raise ValueError(f"{key} ({option}) must be >= {minimum}, got {value}")


@torch.inference_mode()
def translate(
    model: Any,
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_input_tokens: int | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
    continuous_batching: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """Translate ``sentences``; returns one string per sentence, in input order.

    Args:
        model, tokenizer: e.g. from :func:`load_translation_model`.
        sentences: one sentence per item; blank ones give ``""`` without being decoded.
        max_tokens: source tokens per batch (rows × longest row, padding included).
        max_input_tokens: longer sources are cut to this many tokens (default: the tokenizer's
            ``model_max_length``) and reported through ``warn``.
        progress: show a progress bar (sentences) on stderr.
        warn: called with a message for every truncated sentence (default: print to stderr).
        continuous_batching: for Vaswani models, the sentences of the next batches join the beam search as those
            of the current ones end (``model.generate_stream``; same translations, wider steps); False runs one
            ``generate()`` per batch.
        generate_kwargs: passed to ``model.generate`` (``num_beams``, ``max_len_a``, ``max_len_b``,
            ``length_penalty``, ``length_penalty_type``, ...); unset ones come from the generation config.
    """
    if generate_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("translate returns one translation per sentence; drop num_return_sequences")
    check_generate_kwargs(generate_kwargs)
    device = model.device

    def padded(batch: list[list[int]]) -> dict[str, torch.Tensor]:
        inputs = tokenizer.pad({"input_ids": batch}, return_tensors="pt")
        return {"input_ids": inputs["input_ids"].to(device), "attention_mask": inputs["attention_mask"].to(device)}

    def generate(batches: Iterator[list[list[int]]]) -> Iterator[torch.Tensor]:
        inputs = map(padded, batches)
        if continuous_batching and hasattr(model, "generate_stream"):
            return model.generate_stream(inputs, **generate_kwargs)
        return (model.generate(**batch, **generate_kwargs) for batch in inputs)

    return translate_with(
        generate, tokenizer, sentences, max_tokens=max_tokens, max_input_tokens=max_input_tokens, progress=progress,
        warn=warn,
    )


def translate_with(
    decode: Callable[[Iterator[list[list[int]]]], Iterable[Any]],
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_input_tokens: int | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[str]:
    """The line handling of :func:`translate` around any decoder: ``decode`` maps batches of source id lists
    (``</s>`` included, unpadded) to each batch's output id sequences, in order (a list or padded tensor per batch;
    special tokens are dropped), taking the batches as it needs them.
    Blank lines, the input cut at ``max_input_tokens``, the length-sorted ``max_tokens`` batches, the progress bar
    and one output line per input line are the same for every engine."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    warn = warn or (lambda message: print(message, file=sys.stderr))
    limit = max_input_tokens or tokenizer.model_max_length
    outputs = [""] * len(sentences)
    todo = [i for i, text in enumerate(sentences) if text.strip()]
    encoded = tokenizer([sentences[i] for i in todo], add_special_tokens=True)["input_ids"] if todo else []
    for position, ids in enumerate(encoded):
        if len(ids) > limit:
            warn(
                f"sentence {todo[position] + 1}: {len(ids)} tokens, cut to the first {limit} "
                "(raise max_input_tokens / --max-input-tokens to keep more)"
            )
            encoded[position] = ids[: limit - 1] + ids[-1:]  # keep the final </s>
    batches = token_batches([len(ids) for ids in encoded], max_tokens)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sentences), unit="sent", file=sys.stderr)
        bar.update(len(sentences) - len(todo))
    sources = ([encoded[i] for i in batch] for batch in batches)
    for batch, output in zip(batches, decode(sources), strict=True):
        texts = tokenizer.batch_decode(output, skip_special_tokens=True)
        for i, text in zip(batch, texts):
            outputs[todo[i]] = _one_line(text)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return outputs
