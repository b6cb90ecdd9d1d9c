"""``vaswani train``, ``vaswani average`` and ``vaswani params``: the paper's recipe (§5), checkpoint averaging (§6.1)
and the parameter counts of Table 3."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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


@dataclass
class TrainOptions:
    """``vaswani train``'s own options; every ``Seq2SeqTrainingArguments`` field is an option beside them."""

    valid_source: str | None = field(
        default=None, metadata={"help": "validation source file for loss, BLEU and chrF (default: no validation)"}
    )
    valid_target: str | None = field(default=None, metadata={"help": "validation target file (default: none)"})
    valid_split: str | None = field(
        default=None,
        metadata={"help": "validate on this split of --dataset, e.g. validation (WMT14 on the Hub: newstest2013; "
                  "default: no validation)"},
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "fine-tune this checkpoint: a vaswani or MarianMTModel (OPUS-MT) folder or Hub id, with its "
            "own tokenizer (default: none, train from random weights)"
        },
    )
    preset: str | None = field(
        default=None,
        metadata={"help": "model size: base, big, small, multi30k, tiny (Table 3; default: base, with --init-from "
                  "the checkpoint's)"},
    )
    model_config: str | None = field(
        default=None, metadata={"help": "a config.json (folder or file) instead of --preset (default: the preset)"}
    )
    set: list[str] = field(
        default_factory=list,
        metadata={"help": "override config fields, e.g. --set dropout=0.3 encoder_layers=4 (default: none)",
                  "metavar": "KEY=VALUE"},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer folder (default: the checkpoint's, else train one on the corpus)"}
    )
    vocab_size: int = field(default=8000, metadata={"help": "vocabulary of a tokenizer trained on the fly"})
    tokenizer_pairs: int | None = field(
        default=None, metadata={"help": "learn that tokenizer from the first N pairs (default: all)"}
    )
    max_length: int = field(default=256, metadata={"help": "drop pairs with a side over this many tokens"})
    max_tokens: int = field(default=4096, metadata={"help": "tokens per batch per process (paper: 25,000)"})
    update_tokens: int | None = field(
        default=None,
        metadata={"help": "tokens per update: accumulate batches up to this (default: one batch per update)"},
    )
    max_minutes: float | None = field(
        default=None,
        metadata={"help": "stop after this much wall time since the run started, tokenizer and data preparation "
                  "included (a checkpoint is saved; default: no limit)"},
    )
    lr_schedule: Literal["noam", "inverse_sqrt", "constant"] = field(
        default="noam",
        metadata={"help": "noam: the paper's warm-up and inverse square root (§5.3), --learning-rate its factor; "
                  "inverse_sqrt or constant after --warmup-steps at --learning-rate itself, to fine-tune"},
    )
    cooldown_steps: int = field(
        default=0,
        metadata={"help": "decay the learning rate linearly to zero over the last N updates (0: none); with "
                  "--max-minutes and no --max-steps, the last N updates that fit in the time"},
    )
    eval_max_sentences: int = field(default=500, metadata={"help": "validate on at most this many pairs"})
    average_last: int = field(
        default=0, metadata={"help": "average the last N checkpoints into the final model (paper: 5 base, 20 big)"}
    )
    patience: int | None = field(
        default=None,
        metadata={"help": "stop after N validations without improving --metric-for-best-model (bleu unless given) "
                  "and keep the best checkpoint (default: no early stopping)"},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "stream the training corpus instead of loading it, for corpora larger than memory: each "
                  "process reads its own share and sorts --buffer-pairs pairs at a time into token batches (needs "
                  "--max-steps)"},
    )
    buffer_pairs: int = field(
        default=100_000, metadata={"help": "with --streaming: pairs sorted by length together (fairseq's and "
                                   "Marian's maxi-batch); memory grows with it, padding shrinks"}
    )
    reset_dataloader: bool = field(
        default=False,
        metadata={"help": "with --resume: keep the model, optimizer and step but read the corpus from its beginning "
                  "(the way to resume on a changed corpus)"},
    )
    resume: bool = field(default=False, metadata={"help": "continue the run in --output from its last checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace what --output holds"})
    config: str | None = field(
        default=None,
        metadata={"help": "run file (.yaml or .json) of option values, by field name; flags override it "
                  "(default: none)"},
    )


#: The spellings of earlier `vaswani train` flags, kept as aliases of the ``Seq2SeqTrainingArguments`` fields.
ALIASES = {
    "--output": "output_dir",
    "--epochs": "num_train_epochs",
    "--lr-scale": "learning_rate",
    "--label-smoothing": "label_smoothing_factor",
    "--eval-beams": "generation_num_beams",
    "--no-progress": "disable_tqdm",
}


def _add_train(sub: argparse._SubParsersAction) -> None:
    # transformers and torch take seconds to import: the real parser is built when `vaswani train` runs
    p = sub.add_parser(
        "train",
        help="train a Transformer with the paper's recipe (§5), or fine-tune a checkpoint, on a parallel corpus",
        add_help=False,
        prefix_chars="\0",
    )
    p.add_argument("options", nargs="*", help="see `vaswani train --help`")
    p.set_defaults(func=_run_train)


def train_parser() -> Any:
    """``vaswani train``'s ``HfArgumentParser``: :class:`TrainOptions`, the corpus options and every
    ``Seq2SeqTrainingArguments`` field, with the recipe's defaults and the earlier flag spellings."""
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments
    from transformers.hf_argparser import string_to_bool

    from ..training.run import RECIPE_DEFAULTS, device_defaults
    from . import DefaultsShown

    parser = HfArgumentParser(
        [TrainOptions, Seq2SeqTrainingArguments],
        prog="vaswani train",
        usage="vaswani train --output DIR (--source FILE --target FILE | --dataset NAME) [--init-from MODEL] "
        "[options]",
        description="Train a Transformer with the paper's recipe (§5), or fine-tune a checkpoint (--init-from). "
        "Every Seq2SeqTrainingArguments field is an option; --config reads them from a run file.",
        formatter_class=DefaultsShown,
    )
    corpus_args(parser)
    parser.set_defaults(**RECIPE_DEFAULTS, **device_defaults())
    by_dest = {action.dest: action for action in parser._actions}
    for alias, dest in ALIASES.items():
        action = by_dest[dest]
        switch = action.type is string_to_bool  # a yes/no field: the alias alone says yes
        parser.add_argument(
            alias,
            dest=dest,
            type=action.type,
            nargs="?" if switch else action.nargs,
            const=True if switch else action.const,
            choices=action.choices,
            default=argparse.SUPPRESS,
            help=f"same as {action.option_strings[0]}",
        )
    return parser


def read_run_file(path: str, known: set[str]) -> dict[str, Any]:
    """The option values of a ``.yaml``/``.json`` run file, keyed by field name; an unknown key is an error
    naming the nearest known one."""
    from ..configuration import check_known_keys

    file = Path(path)
    if file.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"--config {path}: a run file is .yaml, .yml or .json (a model's config.json goes to "
                         "--model-config)")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: a run file holds a mapping of option names to values")
    values = {key.replace("-", "_"): value for key, value in values.items()}
    check_known_keys(values, known, f"--config {path}")
    return values


def parse_train_args(argv: list[str]) -> tuple[Any, argparse.Namespace]:
    """``vaswani train``'s arguments: ``Seq2SeqTrainingArguments`` and a namespace of the rest, run file first,
    flags over it."""
    from transformers import Seq2SeqTrainingArguments

    parser = train_parser()
    known = {action.dest for action in parser._actions} - {"help"}
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    run_file = first.parse_known_args(argv)[0].config
    if run_file is not None:
        values = read_run_file(run_file, known)
        parser.set_defaults(**values)
    namespace = parser.parse_args(argv)
    if namespace.output_dir is None:
        parser.error("give --output (or output_dir in the --config run file): the run folder")
    names = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init}
    args = Seq2SeqTrainingArguments(**{k: v for k, v in vars(namespace).items() if k in names})
    rest = argparse.Namespace(**{k: v for k, v in vars(namespace).items() if k not in names})
    return args, rest


def _parse_overrides(pairs: list[str]) -> dict:
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


def validation_corpus(options: argparse.Namespace, train_corpus: dict[str, Any]) -> dict[str, Any] | None:
    """The validation corpus: ``--valid-source``/``--valid-target`` files, or ``--valid-split`` of ``--dataset``
    (read with the training corpus' languages or columns)."""
    files = options.valid_source or options.valid_target
    if options.valid_split is not None:
        if files:
            raise ValueError("give --valid-split (a split of --dataset) or --valid-source/--valid-target, not both")
        if options.dataset is None:
            raise ValueError("--valid-split names a split of --dataset; with --source/--target files give "
                             "--valid-source and --valid-target instead")
        return {**train_corpus, "split": options.valid_split}
    if files:
        if not (options.valid_source and options.valid_target):
            raise ValueError("give both --valid-source and --valid-target")
        return {"source": options.valid_source, "target": options.valid_target}
    return None


def _run_train(cli_args: argparse.Namespace) -> None:
    from ..training.run import TrainSettings, train

    args, options = parse_train_args(cli_args.options)
    train_corpus = corpus_kwargs(options)
    settings = TrainSettings(
        args=args,
        train_corpus=train_corpus,
        valid_corpus=validation_corpus(options, train_corpus),
        init_from=options.init_from,
        preset=options.preset,
        config_file=Path(options.model_config) if options.model_config else None,
        config_overrides=_parse_overrides(options.set),
        tokenizer=Path(options.tokenizer) if options.tokenizer else None,
        vocab_size=options.vocab_size,
        tokenizer_pairs=options.tokenizer_pairs,
        max_length=options.max_length,
        max_tokens=options.max_tokens,
        update_tokens=options.update_tokens,
        max_minutes=options.max_minutes,
        lr_schedule=options.lr_schedule,
        cooldown_steps=options.cooldown_steps,
        eval_max_sentences=options.eval_max_sentences,
        average_last=options.average_last,
        patience=options.patience,
        resume=options.resume,
        overwrite=options.overwrite,
        streaming=options.streaming,
        buffer_pairs=options.buffer_pairs,
        reset_dataloader=options.reset_dataloader,
    )
    result = train(settings)
    if result is not None:
        print(
            f"trained {result.steps} steps in {result.train_seconds / 60:.1f} min "
            f"({result.target_tokens_per_second:,.0f} target tokens/s); model saved to {result.output_dir}"
        )
        if result.best_checkpoint:
            print(f"  best checkpoint: {result.best_checkpoint} (validation score {result.best_metric:.4g})")
        for key, value in result.eval_metrics.items():
            print(f"  {key}: {value:.4g}")


COMMANDS = [_add_train, _add_average, _add_params]
