"""``vaswani translate``: one output line per input line, with the paper's decoding (§6.1) or CTranslate2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import printing_notes


def _add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "translate",
        help="translate text with a model folder or Hub id (paper decoding, §6.1); one output line per input line",
    )
    p.add_argument("model", help="model folder (with its tokenizer) or Hub id")
    p.add_argument("text", nargs="*", help="sentences to translate; without them, --input or stdin is read")
    p.add_argument(
        "-i",
        "--input",
        help="file with one sentence per line (plain or .gz; '-' for stdin; default: the text arguments, else stdin)",
    )
    p.add_argument("-o", "--output-file", help="file to write the translations to (default: stdout)")
    p.add_argument("--beam", type=int, help="beam size (default: the model's generation config; paper: 4)")
    p.add_argument(
        "--max-len-a",
        type=float,
        help="output limit a in a·source length + b (default: the model's generation config; paper: 1)",
    )
    p.add_argument(
        "--max-len-b",
        type=int,
        help="output limit b in a·source length + b (default: the model's generation config; paper: 50)",
    )
    p.add_argument(
        "--length-penalty",
        type=float,
        help="α of the length penalty (default: the model's generation config; paper: 0.6)",
    )
    p.add_argument(
        "--length-penalty-type",
        choices=["gnmt", "hf"],
        help="gnmt: ((5+|Y|)/6)^α as in the paper; hf: transformers' |Y|^α (default: the model's generation config)",
    )
    # vaswani.translate.DEFAULT_MAX_TOKENS, written out: importing it would import torch before --help answers
    p.add_argument("--max-tokens", type=int, default=2048, help="source tokens per batch (default: 2048)")
    p.add_argument(
        "--max-input-tokens",
        type=int,
        help="cut longer sentences to this many tokens (default: the tokenizer's model_max_length)",
    )
    p.add_argument(
        "--engine",
        default="torch",
        choices=["torch", "ctranslate2"],
        help="torch (default): the model folder with PyTorch; ctranslate2: a folder written by "
        "`vaswani export ctranslate2` (pip install vaswani[ct2])",
    )
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's, usually the number of cores)")
    p.add_argument("--device", help="torch engine: cpu, cuda, cuda:1, mps, ... (default: cpu)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "int8"],
        help="torch engine: weights and computation (default float32; bfloat16 is fast on CPUs with "
        "AMX/AVX-512; int8: every linear layer as an int8 product, CPU only); CTranslate2 computes in its "
        "export's --quantization",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar shown for files")
    p.set_defaults(func=_run_translate)


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help="corpus BLEU and chrF of translations against references, with their sacreBLEU signatures"
    )
    p.add_argument("--hyp", required=True, help="translations, one per line (plain or .gz)")
    p.add_argument(
        "--ref", required=True, nargs="+", help="reference file(s), line-aligned with --hyp (plain or .gz)"
    )
    p.add_argument("--lowercase", action="store_true", help="score lower-cased text")
    p.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> None:
    from ..training.data import read_lines
    from ..training.metrics import scores_with_signatures

    hypotheses = list(read_lines(args.hyp))
    references = [list(read_lines(path)) for path in args.ref]
    for path, lines in zip(args.ref, references):
        if len(lines) != len(hypotheses):
            raise ValueError(f"{args.hyp} has {len(hypotheses)} lines but {path} has {len(lines)}; give line-aligned "
                             "files (one translation per reference line)")
    for name, score, signature in scores_with_signatures(hypotheses, list(zip(*references)), args.lowercase):
        print(f"{name} = {score:.2f}  {signature}")


def _read_input(args: argparse.Namespace) -> list[str]:
    if args.text and args.input:
        raise ValueError("give sentences as arguments or --input, not both")
    if args.text:
        return list(args.text)
    from ..training.data import decode_lines, read_lines

    if args.input and args.input != "-":
        return list(read_lines(args.input))
    return list(decode_lines(sys.stdin.buffer, "stdin"))


def _check_output_file(path: str) -> None:
    """Refuse an output file that cannot be written before translating anything."""
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--output-file {path}: folder {folder} does not exist; create it or choose another path"
        )
    if target.is_dir():
        raise IsADirectoryError(f"--output-file {path} is a folder; give a file name")
    if not os.access(target if target.exists() else folder, os.W_OK):
        raise PermissionError(f"--output-file {path}: {target if target.exists() else folder} is not writable")


def _run_translate(args: argparse.Namespace) -> None:
    from ..translate import check_generate_kwargs

    if args.output_file:
        _check_output_file(args.output_file)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.engine == "ctranslate2" and (args.device not in (None, "cpu") or args.dtype is not None):
        raise ValueError(
            "--device and --dtype are for --engine torch; CTranslate2 runs on the CPU in the type its "
            "export chose (vaswani export ctranslate2 --quantization)"
        )
    sentences = _read_input(args)
    generate_kwargs = {
        key: value
        for key, value in {
            "num_beams": args.beam,
            "max_len_a": args.max_len_a,
            "max_len_b": args.max_len_b,
            "length_penalty": args.length_penalty,
            "length_penalty_type": args.length_penalty_type,
        }.items()
        if value is not None
    }
    check_generate_kwargs(generate_kwargs)
    translations: list[str] = []
    if sentences:
        options = {
            "max_tokens": args.max_tokens,
            "max_input_tokens": args.max_input_tokens,
            "progress": bool(args.input) and args.input != "-" and not args.no_progress,
            **generate_kwargs,
        }
        try:
            translations = _translate_with_engine(args, sentences, options)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                f"nothing was written{f' to {args.output_file}' if args.output_file else ''}"
            ) from None
    text = "".join(line + "\n" for line in translations)
    if args.output_file:
        Path(args.output_file).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def _translate_with_engine(args: argparse.Namespace, sentences: list[str], options: dict) -> list[str]:
    """Decode with PyTorch (the model folder) or CTranslate2 (an exported folder); notes go to stderr."""
    if args.engine == "ctranslate2":
        from ..ct2 import translate_ctranslate2

        return printing_notes(lambda: translate_ctranslate2(args.model, sentences, threads=args.threads, **options))
    import torch

    from ..translate import load_translation_model, translate

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_translation_model(args.model, device=args.device or "cpu", dtype=args.dtype or "float32")
    return translate(model, tokenizer, sentences, **options)


COMMANDS = [_add_translate, _add_score]
