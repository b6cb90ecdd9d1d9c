"""``vaswani translate``, ``vaswani push``, ``vaswani convert marian`` and ``vaswani export marian`` (sub-commands of
:mod:`vaswani.cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


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
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ... (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and computation (bfloat16 is fast on CPUs with AMX/AVX-512)")
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
    from .translate import check_generate_kwargs, load_translation_model, translate

    if args.output:
        _check_output_file(args.output)
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
        model, tokenizer = load_translation_model(args.model, device=args.device, dtype=args.dtype)
        show_progress = bool(args.input) and args.input != "-" and not args.no_progress
        try:
            translations = translate(
                model, tokenizer, sentences, max_tokens=args.max_tokens, max_input_tokens=args.max_input_tokens,
                progress=show_progress, **generate_kwargs,
            )
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"nothing was written{f' to {args.output}' if args.output else ''}") from None
    text = "".join(line + "\n" for line in translations)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


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


def _run_export_marian(args: argparse.Namespace) -> None:
    import warnings

    from .convert import export_marian

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        marian = export_marian(args.model, args.output, overwrite=args.overwrite)
    for warning in caught:
        print(f"note: {warning.message}", file=sys.stderr)
    print(f"exported {args.model} ({marian.num_parameters():,} parameters) as a MarianMTModel into {args.output}")


TRANSLATION_COMMANDS = [_add_translate, _add_push, _add_convert, _add_export]
