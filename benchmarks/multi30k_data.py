"""Where the benchmarks find Multi30k (task 1, raw text), and a clear exit when it is not there."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

#: ``$VASWANI_MULTI30K`` (as the tests read it), else ``multi30k/`` in the repository, as the README's commands use.
DEFAULT_FOLDER = Path(os.environ.get("VASWANI_MULTI30K", Path(__file__).resolve().parents[1] / "multi30k"))
SOURCE = (
    "Multi30k task 1 raw text is at github.com/multi30k/dataset (folder data/task1/raw: train.en.gz, train.de.gz, "
    "train.fr.gz, val.*.gz, test_2016_flickr.*.gz); English-German is also the Hub dataset bentrevett/multi30k"
)


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_FOLDER,
        help="Multi30k folder with {train,val,test_2016_flickr}.{en,de,fr}.gz (default: %(default)s)",
    )


def require_files(parser: argparse.ArgumentParser, *paths: str | Path) -> None:
    """Exit with status 2 and where to get Multi30k when a data file is missing."""
    missing = [str(path) for path in paths if not Path(path).is_file()]
    if missing:
        parser.error(f"{missing[0]} not found. {SOURCE}; pass its folder with --data (or the files themselves).")
