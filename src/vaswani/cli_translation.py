"""``vaswani translate``, ``vaswani push``, ``vaswani convert marian`` and ``vaswani export marian|ctranslate2``
(sub-commands of :mod:`vaswani.cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "translate",
        help="translate text with a model folder or Hub id (paper decoding, §6.1); one output line per input line",
    )
    p.add_argument("model", help="model folder (with its tokenizer) or Hub id")
    p.add_argument("text", nargs="*", help="sentences to translate; without them, --input or stdin is read")
    p.add_argument("-i", "--input", help="file with one sentence per line (plain or .gz; '-' for stdin)")
    p.add_argument("-o", "--output", help="write translations here instead of stdout")
    p.add_argument("--beam", type=int, help="beam size (default: the model's generation config; paper: 4)")
    p.add_argument("--max-len-a", type=float, help="output limit a in a·source length + b (paper: 1)")
    p.add_argument("--max-len-b", type=int, help="output limit b in a·source length + b (paper: 50)")
    p.add_argument("--length-penalty", type=float, help="α of the length penalty (paper: 0.6)")
    p.add_argument("--length-penalty-type", choices=["gnmt", "hf"],
                   help="gnmt: ((5+|Y|)/6)^α as in the paper; hf: transformers' |Y|^α")
    p.add_argument("--max-tokens", type=int, default=512, help="source tokens per batch (default 512)")
    p.add_argument("--max-input-tokens", type=int,
                   help="cut longer sentences to this many tokens (default: the tokenizer's model_max_length)")
    p.add_argument("--engine", default="torch", choices=["torch", "ctranslate2"],
                   help="torch (default): the model folder with PyTorch; ctranslate2: a folder written by "
                        "`vaswani export ctranslate2` (pip install vaswani[ct2])")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's, usually the number of cores)")
    p.add_argument("--device", help="torch engine: cpu, cuda, cuda:1, mps, ... (default cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="torch engine: weights and computation (default float32; bfloat16 is fast on CPUs with "
                        "AMX/AVX-512); CTranslate2 computes in its export's --quantization")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar shown for files")
    p.set_defaults(func=_run_translate)


def _read_input(args: argparse.Namespace) -> list[str]:
    if args.text and args.input:
        raise ValueError("give sentences as arguments or --input, not both")
    if args.text:
        return list(args.text)
    from .training.data import decode_lines, read_lines

    if args.input and args.input != "-":
        return list(read_lines(args.input))
    return list(decode_lines(sys.stdin.buffer, "stdin"))


def _check_output_file(path: str) -> None:
    """Refuse an output file that cannot be written before translating anything."""
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"-o {path}: folder {folder} does not exist; create it or choose another path")
    if target.is_dir():
        raise IsADirectoryError(f"-o {path} is a folder; give a file name")
    if not os.access(target if target.exists() else folder, os.W_OK):
        raise PermissionError(f"-o {path}: {target if target.exists() else folder} is not writable")


def _run_translate(args: argparse.Namespace) -> None:
    from .translate import check_generate_kwargs

    if args.output:
        _check_output_file(args.output)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.engine == "ctranslate2" and (args.device not in (None, "cpu") or args.dtype is not None):
        raise ValueError("--device and --dtype are for --engine torch; CTranslate2 runs on the CPU in the type its "
                         "export chose (vaswani export ctranslate2 --quantization)")
    sentences = _read_input(args)
    generate_kwargs = {
        key: value
        for key, value in {
            "num_beams": args.beam, "max_len_a": args.max_len_a, "max_len_b": args.max_len_b,
            "length_penalty": args.length_penalty, "length_penalty_type": args.length_penalty_type,
        }.items()
        if value is not None
    }
    check_generate_kwargs(generate_kwargs)
    translations: list[str] = []
    if sentences:
        options = {
            "max_tokens": args.max_tokens, "max_input_tokens": args.max_input_tokens,
            "progress": bool(args.input) and args.input != "-" and not args.no_progress, **generate_kwargs,
        }
        try:
            translations = _translate_with_engine(args, sentences, options)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"nothing was written{f' to {args.output}' if args.output else ''}") from None
    text = "".join(line + "\n" for line in translations)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def _translate_with_engine(args: argparse.Namespace, sentences: list[str], options: dict) -> list[str]:
    """Decode with PyTorch (the model folder) or CTranslate2 (an exported folder); notes go to stderr."""
    if args.engine == "ctranslate2":
        from .ct2 import translate_ctranslate2

        return _printing_notes(lambda: translate_ctranslate2(args.model, sentences, threads=args.threads, **options))
    import torch

    from .translate import load_translation_model, translate

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_translation_model(args.model, device=args.device or "cpu", dtype=args.dtype or "float32")
    return translate(model, tokenizer, sentences, **options)


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a model folder to the Hugging Face Hub with a generated model card")
    p.add_argument("model_dir", type=Path, help="saved model folder (weights, config, tokenizer, code)")
    p.add_argument("repo_id", help="Hub repository, e.g. your-name/vaswani-multi30k-en-de")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    p.add_argument("--source-lang", help="source language code for the card, e.g. en")
    p.add_argument("--target-lang", help="target language code for the card, e.g. de")
    p.add_argument("--dataset", help="training data as a Hub dataset id, e.g. bentrevett/multi30k")
    p.add_argument("--test-set", help="name of the test set the BLEU score is on, e.g. 'Multi30k test_2016_flickr'")
    p.add_argument("--bleu", type=float, help="test BLEU for the card (default: validation BLEU of `vaswani train`)")
    p.add_argument("--license", default="apache-2.0", help="license of the weights (default apache-2.0)")
    p.add_argument("--message", default="Upload Vaswani Transformer model", help="commit message")
    p.set_defaults(func=_run_push)


def _run_push(args: argparse.Namespace) -> None:
    from .hub import CardInfo, files_to_upload, push_model_folder

    names = [path.name for path in files_to_upload(args.model_dir)] + ["README.md (generated model card)"]
    print(f"uploading to {args.repo_id}: {', '.join(names)}", flush=True)
    info = CardInfo(
        source_lang=args.source_lang, target_lang=args.target_lang, dataset=args.dataset,
        dataset_name=args.test_set, bleu=args.bleu, license=args.license,
    )
    try:
        url = push_model_folder(
            args.model_dir, args.repo_id, info=info, private=args.private, token=args.token,
            commit_message=args.message,
        )
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # network and Hub errors come in many types (httpx, huggingface_hub)
        raise ValueError(
            f"could not upload {args.model_dir} to {args.repo_id!r} ({type(err).__name__}: {err}); check the "
            "network (HF_ENDPOINT) and the token (--token, HF_TOKEN or `hf auth login`)."
        ) from err
    print(f"pushed {args.model_dir} to {args.repo_id}: {url}")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert pretrained checkpoints into Vaswani model folders")
    csub = p.add_subparsers(dest="convert_command", required=True)
    m = csub.add_parser("marian", help="an OPUS-MT / MarianMTModel checkpoint and its tokenizer → a Vaswani folder")
    m.add_argument("source", help="MarianMTModel folder or Hub id (e.g. Helsinki-NLP/opus-mt-en-de)")
    m.add_argument("output", help="new folder for the Vaswani model")
    m.set_defaults(func=_run_convert_marian)


def _run_convert_marian(args: argparse.Namespace) -> None:
    from .convert import convert_marian_checkpoint

    model = convert_marian_checkpoint(args.source, args.output)
    print(f"converted {args.source} ({model.num_parameters():,} parameters) into {args.output}")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a Vaswani model folder for other engines")
    esub = p.add_subparsers(dest="export_command", required=True)
    m = esub.add_parser(
        "marian", help="a Vaswani folder → a MarianMTModel folder that plain transformers loads (no remote code)"
    )
    m.add_argument("model", help="Vaswani model folder (with its tokenizer) or Hub id")
    m.add_argument("output", help="new folder for the MarianMTModel and its tokenizer")
    m.add_argument("--overwrite", action="store_true", help="replace a model already in the output folder")
    m.set_defaults(func=_run_export_marian)
    c = esub.add_parser(
        "ctranslate2", help="a Vaswani folder → a CTranslate2 model folder with its tokenizer (needs vaswani[ct2])",
    )
    c.add_argument("model", help="Vaswani model folder (with its tokenizer) or Hub id")
    c.add_argument("output", help="new folder for the CTranslate2 model, its tokenizer and decoding settings")
    c.add_argument("--quantization", default="float32", choices=["float32", "int8", "int8_float32", "bfloat16"],
                   help="weight type (default float32); int8 is the fastest on CPUs")
    c.add_argument("--overwrite", action="store_true", help="replace a model already in the output folder")
    c.set_defaults(func=_run_export_ctranslate2)


def _printing_notes(export: Callable[[], Any]) -> Any:
    """Run ``export``; what it warns about (what does not carry over) is printed as notes on stderr."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = export()
    for warning in caught:
        print(f"note: {warning.message}", file=sys.stderr)
    return result


def _run_export_marian(args: argparse.Namespace) -> None:
    from .convert import export_marian

    marian = _printing_notes(lambda: export_marian(args.model, args.output, overwrite=args.overwrite))
    print(f"exported {args.model} ({marian.num_parameters():,} parameters) as a MarianMTModel into {args.output}")


def _run_export_ctranslate2(args: argparse.Namespace) -> None:
    from .ct2 import export_ctranslate2

    settings = _printing_notes(
        lambda: export_ctranslate2(args.model, args.output, args.quantization, overwrite=args.overwrite)
    )
    print(f"exported {args.model} as a CTranslate2 model ({args.quantization}) into {args.output}; decoding: "
          + ", ".join(f"{key}={value}" for key, value in settings.items()))


TRANSLATION_COMMANDS = [_add_translate, _add_push, _add_convert, _add_export]
