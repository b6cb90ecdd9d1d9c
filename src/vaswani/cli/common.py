"""What several sub-commands share: the corpus options and printing a library's warnings as notes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        help="source-language file, one sentence per line (plain or .gz; default: none, give it or --dataset)",
    )
    p.add_argument("--target", help="target-language file, line-aligned with --source (plain or .gz; default: none)")
    p.add_argument(
        "--dataset",
        help="instead of files: a datasets name (the Hub needs a network), a local dataset folder, or one .tsv, .csv, "
        ".jsonl or .parquet file (plain or .gz; a TSV/CSV with a header row naming its columns) (default: none)",
    )
    p.add_argument(
        "--dataset-config", help="configuration name of --dataset, e.g. de-en (default: the dataset's default)"
    )
    p.add_argument("--split", default="train", help="split of --dataset")
    p.add_argument(
        "--source-lang",
        help="source key of a 'translation' column, e.g. en (default: the first of a two-language column)",
    )
    p.add_argument("--target-lang", help="target key of a 'translation' column, e.g. de (default: the other language)")
    p.add_argument("--source-column", help="source text column of --dataset (default: a 'translation' column)")
    p.add_argument("--target-column", help="target text column of --dataset (default: a 'translation' column)")
    p.add_argument(
        "--empty-lines",
        choices=["drop", "keep", "error"],
        default="drop",
        help="pairs with an empty side: drop (default, counted), keep, or fail",
    )


def corpus_kwargs(args: argparse.Namespace) -> dict:
    if args.dataset is None and (args.source is None or args.target is None):
        raise ValueError("give --source and --target files, or --dataset")
    return {
        "source": args.source,
        "target": args.target,
        "dataset": args.dataset,
        "dataset_config": args.dataset_config,
        "split": args.split,
        "source_lang": args.source_lang,
        "target_lang": args.target_lang,
        "source_column": args.source_column,
        "target_column": args.target_column,
        "empty_lines": args.empty_lines,
    }


def printing_notes(export: Callable[[], Any]) -> Any:
    """Run ``export``; what it warns about (what does not carry over) is printed as notes on stderr."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = export()
    for warning in caught:
        print(f"note: {warning.message}", file=sys.stderr)
    return result
