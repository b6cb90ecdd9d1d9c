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


COMMANDS = [_add_params, _add_average]


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
