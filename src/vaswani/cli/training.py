"""``vaswani train``, ``vaswani average`` and ``vaswani params``: the paper's recipe (§5), checkpoint averaging (§6.1)
and the parameter counts of Table 3."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import corpus_args, corpus_kwargs


def _add_params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="print parameter counts of the presets against the paper (Table 3)")
    p.add_argument("--vocab-size", type=int, default=37000, help="shared BPE vocabulary (paper: ~37,000)")
    p.set_defaults(func=_run_params)


def _run_params(args: argparse.Namespace) -> None:
    from ..report import parameter_count_table

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
    p.add_argument(
        "--last", type=int, help="average only the last N checkpoints (default: all given; paper: 5 base, 20 big)"
    )
    p.add_argument("--output", type=Path, required=True, help="folder for the averaged model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing averaged model.safetensors")
    p.add_argument("--force", action="store_true", help="average checkpoints of different runs all the same")
    p.set_defaults(func=_run_average)


def _run_average(args: argparse.Namespace) -> None:
    from ..training.averaging import average_checkpoints, collect_checkpoints

    checkpoints = collect_checkpoints(args.paths, args.last)
    output = average_checkpoints(checkpoints, args.output, overwrite=args.overwrite, force=args.force)
    print(f"averaged {len(checkpoints)} checkpoints ({', '.join(str(c) for c in checkpoints)}) into {output}")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a Transformer with the paper's recipe (§5) on a parallel corpus")
    corpus_args(p)
    p.add_argument(
        "--valid-source", help="validation source file for loss and BLEU during training (default: no validation)"
    )
    p.add_argument("--valid-target", help="validation target file (default: no validation)")
    p.add_argument("--output", type=Path, required=True, help="run folder: checkpoints and the final model")
    p.add_argument("--preset", default="base", help="model size: base, big, small, multi30k, tiny (Table 3)")
    p.add_argument(
        "--config", type=Path, help="a config.json (folder or file) instead of --preset (default: the preset)"
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override config fields, e.g. --set dropout=0.3 encoder_layers=4",
    )
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder; default: train one on the corpus")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of a tokenizer trained on the fly")
    p.add_argument("--tokenizer-pairs", type=int, help="learn that tokenizer from the first N pairs (default: all)")
    p.add_argument("--max-length", type=int, default=256, help="drop pairs with a side over this many tokens")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch per process (paper: 25,000)")
    p.add_argument(
        "--update-tokens",
        type=int,
        help="tokens per update: accumulate batches up to this (default: one batch per update)",
    )
    p.add_argument("--epochs", type=float, default=10.0, help="passes over the corpus")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many updates (overrides --epochs)")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="stop after this much wall time since the run started, tokenizer and data preparation "
        "included (a checkpoint is saved; default: no limit)",
    )
    p.add_argument("--warmup-steps", type=int, default=4000, help="learning-rate warm-up (paper: 4,000)")
    p.add_argument("--lr-scale", type=float, default=1.0, help="factor on the paper's learning-rate schedule")
    p.add_argument(
        "--cooldown-steps",
        type=int,
        default=0,
        help="decay the learning rate linearly to zero over the last N updates (0: the paper's schedule); "
        "with --max-minutes and no --max-steps, the last N updates that fit in the time",
    )
    p.add_argument("--label-smoothing", type=float, default=0.1, help="ε_ls (paper: 0.1)")
    p.add_argument("--eval-steps", type=int, default=500, help="validate every N updates (0: never)")
    p.add_argument("--eval-beams", type=int, default=4, help="beam size of validation BLEU (paper: 4)")
    p.add_argument("--eval-max-sentences", type=int, default=500, help="validate on at most this many pairs")
    p.add_argument("--save-steps", type=int, default=500, help="checkpoint every N updates")
    p.add_argument("--save-total-limit", type=int, default=5, help="keep at most this many checkpoints")
    p.add_argument(
        "--average-last",
        type=int,
        default=0,
        help="average the last N checkpoints into the final model (paper: 5 base, 20 big)",
    )
    p.add_argument("--logging-steps", type=int, default=50, help="log loss and learning rate every N updates")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fast on recent CPUs and GPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, dropout and batch order")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace what --output holds")
    p.add_argument("--report-to", default="all", help="Trainer loggers (tensorboard, trackio, ...; 'none')")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_train)


def _parse_overrides(pairs: list[str]) -> dict:
    import json

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _run_train(args: argparse.Namespace) -> None:
    from ..training.run import TrainSettings, train

    valid = None
    if args.valid_source or args.valid_target:
        if not (args.valid_source and args.valid_target):
            raise ValueError("give both --valid-source and --valid-target")
        valid = {"source": args.valid_source, "target": args.valid_target}
    settings = TrainSettings(
        output_dir=args.output,
        train_corpus=corpus_kwargs(args),
        valid_corpus=valid,
        preset=args.preset,
        config_file=args.config,
        config_overrides=_parse_overrides(args.set),
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        tokenizer_pairs=args.tokenizer_pairs,
        max_length=args.max_length,
        max_tokens=args.max_tokens,
        update_tokens=args.update_tokens,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        warmup_steps=args.warmup_steps,
        lr_scale=args.lr_scale,
        cooldown_steps=args.cooldown_steps,
        label_smoothing=args.label_smoothing,
        eval_steps=args.eval_steps,
        eval_beams=args.eval_beams,
        eval_max_sentences=args.eval_max_sentences,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        average_last=args.average_last,
        logging_steps=args.logging_steps,
        bf16=args.bf16,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        report_to=args.report_to,
        progress=not args.no_progress,
    )
    result = train(settings)
    if result is not None:
        print(
            f"trained {result.steps} steps in {result.train_seconds / 60:.1f} min "
            f"({result.target_tokens_per_second:,.0f} target tokens/s); model saved to {result.output_dir}"
        )
        for key, value in result.eval_metrics.items():
            print(f"  {key}: {value:.4g}")


COMMANDS = [_add_train, _add_average, _add_params]
