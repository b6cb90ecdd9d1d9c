"""CTranslate2 (``pip install vaswani[ct2]``): ``vaswani export ctranslate2`` and ``vaswani translate --engine
ctranslate2``.

The export goes through the Marian form (:func:`~vaswani.convert.vaswani_to_marian`, exact for both sinusoid
layouts), converted by CTranslate2's transformers converter with two changes to its Marian loader: a Vaswani model
starts decoding from the ``<s>`` embedding (Marian from a zero vector) and keeps ``<pad>`` at id 0 (Marian has it
last). The tokenizer is saved next to the CTranslate2 model, and :data:`DECODING_FILE` keeps the model's decoding
settings (beam, α, length limit) for ``translate``.

Decoding uses the same line handling, batches and input cut as the PyTorch path
(:func:`~vaswani.translate.translate_with`). Two things differ from the paper's decoding:

* The per-sentence limit ``max_len_a`` · source length + ``max_len_b`` is exact: CTranslate2 has one limit per
  call, so each batch is decoded in groups of sentences that share a limit. At the limit, PyTorch forces ``</s>``
  on the last token and CTranslate2 stops; the kept tokens are the same for greedy decoding, a beam may rank them
  differently.
* CTranslate2's length penalty divides by |Y|^α (transformers' ``length_penalty_type="hf"``), not the paper's GNMT
  ((5 + |Y|) / 6)^α, and its beam search stops once the best hypothesis has ended; so a few beam translations may
  differ from ``vaswani translate``. Greedy decoding (``--beam 1``) computes the same tokens up to float rounding.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .translate import DEFAULT_MAX_TOKENS

#: The decoding settings of the exported model, read by :func:`translate_ctranslate2`.
DECODING_FILE = "vaswani_decoding.json"
QUANTIZATIONS = ("float32", "int8", "int8_float32", "bfloat16")
DECODING_SETTINGS = ("num_beams", "length_penalty", "length_penalty_type", "max_len_a", "max_len_b")


def _import_ctranslate2() -> Any:
    try:
        import ctranslate2
    except ImportError as err:
        raise ImportError(f"CTranslate2 is not installed ({err}); install it: pip install vaswani[ct2]") from None
    return ctranslate2


def check_quantization(quantization: str) -> None:
    """Refuse a quantization that is unknown or that the installed CTranslate2 cannot run on this CPU."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    supported = _import_ctranslate2().get_supported_compute_types("cpu")
    if quantization not in supported:
        raise ValueError(
            f"quantization {quantization!r} is not supported by this CTranslate2 build on this CPU (supported: "
            f"{', '.join(sorted(supported))}); choose one of those."
        )


def convert_marian_folder(marian_dir: str | Path, output_dir: str | Path, quantization: str = "float32") -> None:
    """Convert a ``MarianMTModel`` folder exported from a Vaswani model (:func:`~vaswani.convert.export_marian`)
    into a CTranslate2 model folder, with CTranslate2's Marian loader adapted to the Vaswani start token and ids."""
    _import_ctranslate2()
    from ctranslate2.converters import transformers as ct2_transformers

    class VaswaniAsMarianLoader(ct2_transformers.MarianMTLoader):
        def get_model_spec(self, model):
            model.config.normalize_before = False
            model.config.normalize_embedding = False
            return ct2_transformers.BartLoader.get_model_spec(self, model)

        def set_config(self, config, model, tokenizer):
            config.bos_token, config.eos_token = tokenizer.bos_token, tokenizer.eos_token
            config.unk_token, config.decoder_start_token = tokenizer.unk_token, tokenizer.bos_token

        def set_decoder(self, spec, decoder):
            ct2_transformers.BartLoader.set_decoder(self, spec, decoder)

        def get_vocabulary(self, model, tokenizer):
            return ct2_transformers.ModelLoader.get_vocabulary(self, model, tokenizer)

    loaders = ct2_transformers._MODEL_LOADERS
    previous = loaders["MarianConfig"]
    loaders["MarianConfig"] = VaswaniAsMarianLoader()
    try:
        ct2_transformers.TransformersConverter(str(marian_dir)).convert(str(output_dir), quantization=quantization)
    finally:
        loaders["MarianConfig"] = previous


def decoding_settings(generation_config: Any) -> dict[str, Any]:
    """The settings of :data:`DECODING_SETTINGS` from a generation config, the paper's where it has none."""
    from .generation import PAPER_GENERATION_DEFAULTS

    settings = {name: getattr(generation_config, name, None) for name in DECODING_SETTINGS}
    return {name: PAPER_GENERATION_DEFAULTS[name] if value is None else value for name, value in settings.items()}


def export_ctranslate2(
    model_dir: str | Path, output_dir: str | Path, quantization: str = "float32", overwrite: bool = False
) -> dict[str, Any]:
    """``vaswani export ctranslate2``: a Vaswani model folder → a CTranslate2 model folder with the tokenizer
    files and :data:`DECODING_FILE` next to it; returns the decoding settings written.

    Same folder rules as :func:`~vaswani.convert.export_marian`: a model in ``output_dir`` is replaced only with
    ``overwrite``, and nothing is half-written. A GNMT length penalty is warned about (CTranslate2 has |Y|^α).
    """
    import tempfile

    from .convert import check_export_folder, load_vaswani_for_export, vaswani_to_marian, write_folder_whole

    out = Path(output_dir)
    check_export_folder(out, overwrite)
    check_quantization(quantization)
    model, tokenizer = load_vaswani_for_export(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # about Marian's generate(); CTranslate2's differences below
        marian = vaswani_to_marian(model)
    settings = decoding_settings(model.generation_config)
    if settings["length_penalty_type"] == "gnmt":
        warnings.warn(_gnmt_note(settings["length_penalty"]), stacklevel=2)

    def write(folder: Path) -> None:
        with tempfile.TemporaryDirectory() as marian_dir:
            marian.save_pretrained(marian_dir)
            tokenizer.save_pretrained(marian_dir)
            convert_marian_folder(marian_dir, folder, quantization)
        tokenizer.save_pretrained(folder)
        (folder / DECODING_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")

    write_folder_whole(out, write)
    return settings


def _gnmt_note(alpha: float) -> str:
    return (
        f"CTranslate2 has no GNMT length penalty ((5 + |Y|) / 6)^alpha: its beam search divides by |Y|^alpha "
        f"(alpha = {alpha}), so a few beam translations may differ from vaswani translate (greedy ones do not)."
    )


def load_ctranslate2(folder: str | Path, threads: int | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """The ``ctranslate2.Translator`` (CPU, in the type the model was exported with, ``threads`` threads for one
    batch at a time), the tokenizer and the decoding settings of a folder written by :func:`export_ctranslate2`."""
    from transformers import AutoTokenizer

    ctranslate2 = _import_ctranslate2()
    path = Path(folder).expanduser()
    if not (path / "model.bin").is_file() or not (path / DECODING_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a folder written by `vaswani export ctranslate2` (no model.bin or {DECODING_FILE}); "
            "export one with: vaswani export ctranslate2 MODEL OUT"
        )
    settings = json.loads((path / DECODING_FILE).read_text(encoding="utf-8"))
    translator = ctranslate2.Translator(
        str(path), device="cpu", compute_type="default", intra_threads=threads or torch.get_num_threads(),
        inter_threads=1,
    )
    return translator, AutoTokenizer.from_pretrained(str(path), trust_remote_code=False), settings


def translate_ctranslate2(
    folder: str | Path,
    sentences: Sequence[str],
    *,
    threads: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_input_tokens: int | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
    **decoding: Any,
) -> list[str]:
    """:func:`~vaswani.translate.translate` with CTranslate2: one string per sentence, in input order.

    ``decoding`` (``num_beams``, ``length_penalty``, ``length_penalty_type``, ``max_len_a``, ``max_len_b``)
    overrides the exported settings. ``length_penalty_type="gnmt"`` cannot be expressed and is warned about.
    """
    from .generation import sentence_length_limits
    from .translate import check_generate_kwargs, translate_with

    unknown = set(decoding) - set(DECODING_SETTINGS)
    if unknown:
        raise ValueError(f"CTranslate2 decoding takes {', '.join(DECODING_SETTINGS)}, not {', '.join(sorted(unknown))}")
    check_generate_kwargs(decoding)
    translator, tokenizer, settings = load_ctranslate2(folder, threads)
    settings.update(decoding)
    if settings["length_penalty_type"] == "gnmt" and settings["num_beams"] > 1:
        warnings.warn(_gnmt_note(settings["length_penalty"]), stacklevel=2)

    def decode(batch: list[list[int]]) -> list[list[int]]:
        limits = sentence_length_limits(
            torch.tensor([len(ids) for ids in batch]), settings["max_len_a"], settings["max_len_b"]
        ).tolist()
        outputs: list[list[int]] = [[] for _ in batch]
        for limit in sorted(set(limits)):
            group = [i for i, own in enumerate(limits) if own == limit]
            if limit == 1:  # only the forced </s>
                continue
            results = translator.translate_batch(
                [tokenizer.convert_ids_to_tokens(batch[i]) for i in group],
                beam_size=settings["num_beams"], length_penalty=settings["length_penalty"],
                max_decoding_length=limit - 1,  # PyTorch's limit counts the final </s>, CTranslate2's does not
                max_input_length=0, max_batch_size=len(group),
            )
            for i, result in zip(group, results):
                outputs[i] = tokenizer.convert_tokens_to_ids(result.hypotheses[0])
        return outputs

    return translate_with(
        partial(map, decode), tokenizer, sentences, max_tokens=max_tokens, max_input_tokens=max_input_tokens,
        progress=progress, warn=warn,
    )

