"""``vaswani demo``: English number words into German, trained and scored in a few minutes on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train on built-in English→German number words, translate, show results")
    p.add_argument("--output", type=Path, default=Path("outputs/demo"), help="where data, model and plot go")
    p.add_argument(
        "--minutes",
        type=float,
        default=3.0,
        help="time limit of the whole demo: corpus, tokenizer, training and scoring",
    )
    p.add_argument("--max-steps", type=int, default=2500, help="training updates")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus split, initialisation and batches")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from ..demo.run import print_demo, run_demo

    result = run_demo(
        args.output, minutes=args.minutes, max_steps=args.max_steps, seed=args.seed, progress=not args.no_progress
    )
    print_demo(result)


COMMANDS = [_add_demo]
