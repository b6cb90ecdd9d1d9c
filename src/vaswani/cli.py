"""The ``vaswani`` command: one sub-command per job, each a thin wrapper over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _add_params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="print parameter counts of the presets against the paper (Table 3)")
    p.add_argument("--vocab-size", type=int, default=37000, help="shared BPE vocabulary (paper: ~37,000)")
    p.set_defaults(func=_run_params)


def _run_params(args: argparse.Namespace) -> None:
    from .configuration import parameter_count_table

    print(parameter_count_table(args.vocab_size))


def _add_average(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "average", help="average the weights of the last checkpoints (§6.1: last 5 for base, last 20 for big)"
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="checkpoint folders (with model.safetensors) or Trainer run dirs (their checkpoint-<step>)",
    )
    p.add_argument("--last", type=int, help="average only the last N checkpoints (paper: 5 base, 20 big)")
    p.add_argument("--output", type=Path, required=True, help="folder for the averaged model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing averaged model.safetensors")
    p.set_defaults(func=_run_average)


def _run_average(args: argparse.Namespace) -> None:
    from .training.averaging import average_checkpoints, collect_checkpoints

    checkpoints = collect_checkpoints(args.paths, args.last)
    output = average_checkpoints(checkpoints, args.output, overwrite=args.overwrite)
    print(f"averaged {len(checkpoints)} checkpoints ({', '.join(str(c) for c in checkpoints)}) into {output}")


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", help="source-language file, one sentence per line (plain or .gz)")
    p.add_argument("--target", help="target-language file, line-aligned with --source (plain or .gz)")
    p.add_argument("--dataset", help="instead of files: a datasets name or local path (Hub needs a network)")
    p.add_argument("--dataset-config", help="configuration name of --dataset (e.g. de-en)")
    p.add_argument("--split", default="train", help="split of --dataset (default: train)")
    p.add_argument("--source-lang", help="source key of a 'translation' column (e.g. en)")
    p.add_argument("--target-lang", help="target key of a 'translation' column (e.g. de)")
    p.add_argument("--source-column", help="source text column of --dataset (instead of 'translation')")
    p.add_argument("--target-column", help="target text column of --dataset")
    p.add_argument("--empty-lines", choices=["drop", "keep", "error"], default="drop",
                   help="pairs with an empty side: drop (default, counted), keep, or fail")


def _corpus_kwargs(args: argparse.Namespace) -> dict:
    if args.dataset is None and (args.source is None or args.target is None):
        raise ValueError("give --source and --target files, or --dataset")
    return {
        "source": args.source, "target": args.target, "dataset": args.dataset,
        "dataset_config": args.dataset_config, "split": args.split, "source_lang": args.source_lang,
        "target_lang": args.target_lang, "source_column": args.source_column,
        "target_column": args.target_column, "empty_lines": args.empty_lines,
    }


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train the shared source/target BPE tokenizer (§5.1)")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE jointly on source and target text")
    _corpus_args(t)
    t.add_argument("--vocab-size", type=int, default=37000, help="vocabulary size (paper: ~37,000 for en-de)")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merged pair (default 2)")
    t.add_argument("--output", required=True, help="folder to save the tokenizer in (AutoTokenizer loads it)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.set_defaults(func=_run_tokenizer_train)


def _run_tokenizer_train(args: argparse.Namespace) -> None:
    import time

    from .training.data import train_tokenizer_from_corpus

    start = time.perf_counter()
    tokenizer, report = train_tokenizer_from_corpus(
        vocab_size=args.vocab_size, min_frequency=args.min_frequency, output_dir=args.output,
        show_progress=not args.no_progress, **_corpus_kwargs(args),
    )
    print(report)
    print(f"trained a vocabulary of {len(tokenizer):,} tokens in {time.perf_counter() - start:.1f} s; "
          f"saved to {args.output}")


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="parallel corpora: statistics")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("stats", help="tokenize a corpus; print pairs, tokens, length percentiles, padding")
    _corpus_args(s)
    s.add_argument("--tokenizer", required=True, help="tokenizer folder (from `vaswani tokenizer train`)")
    s.add_argument("--max-length", type=int, default=256, help="token limit per side (default 256)")
    s.add_argument("--overlong", choices=["drop", "truncate"], default="drop", help="pairs over --max-length")
    s.add_argument("--max-tokens", type=int, default=25000,
                   help="token budget per batch for the padding figures (paper: ~25,000)")
    s.add_argument("--num-proc", type=int, default=None, help="processes for tokenizing")
    s.set_defaults(func=_run_data_stats)


def _run_data_stats(args: argparse.Namespace) -> None:
    from .tokenization import load_tokenizer
    from .training.batching import TokenBatchSampler, batch_padding, random_token_batches
    from .training.data import corpus_statistics, load_parallel_corpus, sequence_lengths, tokenize_corpus

    tokenizer = load_tokenizer(args.tokenizer)
    pairs, report = load_parallel_corpus(num_proc=args.num_proc, **_corpus_kwargs(args))
    print(report)
    tokenized, tok_report = tokenize_corpus(pairs, tokenizer, max_length=args.max_length,
                                            overlong=args.overlong, num_proc=args.num_proc)
    print(f"over {args.max_length} tokens: {tok_report.overlong_dropped:,} pairs dropped, "
          f"{tok_report.overlong_truncated:,} truncated")
    print(corpus_statistics(tokenized).table())
    src, tgt = sequence_lengths(tokenized, "input_ids"), sequence_lengths(tokenized, "labels")
    sampler = TokenBatchSampler(src, tgt, args.max_tokens)
    grouped = batch_padding(list(sampler), src, tgt)
    shuffled = batch_padding(random_token_batches(src, tgt, args.max_tokens), src, tgt)
    print(f"batches of <= {args.max_tokens:,} tokens: {len(sampler):,}; padding waste "
          f"{grouped['waste']:.1%} (length-grouped) vs {shuffled['waste']:.1%} (random order)")


COMMANDS = [_add_params, _add_average, _add_tokenizer, _add_data]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vaswani", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"vaswani {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
