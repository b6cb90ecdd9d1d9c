"""The ``vaswani`` command: one sub-command per job, each a thin wrapper over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli_translation import TRANSLATION_COMMANDS


def _add_params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="print parameter counts of the presets against the paper (Table 3)")
    p.add_argument("--vocab-size", type=int, default=37000, help="shared BPE vocabulary (paper: ~37,000)")
    p.set_defaults(func=_run_params)


def _run_params(args: argparse.Namespace) -> None:
    from .report import parameter_count_table

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
    p.add_argument("--force", action="store_true", help="average checkpoints of different runs all the same")
    p.set_defaults(func=_run_average)


def _run_average(args: argparse.Namespace) -> None:
    from .training.averaging import average_checkpoints, collect_checkpoints

    checkpoints = collect_checkpoints(args.paths, args.last)
    output = average_checkpoints(checkpoints, args.output, overwrite=args.overwrite, force=args.force)
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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a Transformer with the paper's recipe (§5) on a parallel corpus")
    _corpus_args(p)
    p.add_argument("--valid-source", help="validation source file (loss and BLEU during training)")
    p.add_argument("--valid-target", help="validation target file")
    p.add_argument("--output", type=Path, required=True, help="run folder: checkpoints and the final model")
    p.add_argument("--preset", default="base", help="model size: base, big, small, multi30k, tiny (Table 3)")
    p.add_argument("--config", type=Path, help="a config.json (folder or file) instead of --preset")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. --set dropout=0.3 encoder_layers=4")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder; default: train one on the corpus")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of a tokenizer trained on the fly")
    p.add_argument("--tokenizer-pairs", type=int, help="learn that tokenizer from the first N pairs (default: all)")
    p.add_argument("--max-length", type=int, default=256, help="drop pairs with a side over this many tokens")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch per process (paper: 25,000)")
    p.add_argument("--update-tokens", type=int, help="tokens per update: accumulate batches up to this")
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many updates (overrides --epochs)")
    p.add_argument("--max-minutes", type=float,
                   help="stop after this much wall time since the run started, tokenizer and data preparation "
                   "included (a checkpoint is saved)")
    p.add_argument("--warmup-steps", type=int, default=4000, help="learning-rate warm-up (paper: 4,000)")
    p.add_argument("--lr-scale", type=float, default=1.0, help="factor on the paper's learning-rate schedule")
    p.add_argument("--cooldown-steps", type=int, default=0,
                   help="decay the learning rate linearly to zero over the last N updates (0: the paper's schedule); "
                   "with --max-minutes and no --max-steps, the last N updates that fit in the time")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="ε_ls (paper: 0.1)")
    p.add_argument("--eval-steps", type=int, default=500, help="validate every N updates (0: never)")
    p.add_argument("--eval-beams", type=int, default=4, help="beam size of validation BLEU (paper: 4)")
    p.add_argument("--eval-max-sentences", type=int, default=500, help="validate on at most this many pairs")
    p.add_argument("--save-steps", type=int, default=500, help="checkpoint every N updates")
    p.add_argument("--save-total-limit", type=int, default=5, help="keep at most this many checkpoints")
    p.add_argument("--average-last", type=int, default=0,
                   help="average the last N checkpoints into the final model (paper: 5 base, 20 big)")
    p.add_argument("--logging-steps", type=int, default=50)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fast on recent CPUs and GPUs)")
    p.add_argument("--seed", type=int, default=0)
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
    from .training.run import TrainSettings, train

    valid = None
    if args.valid_source or args.valid_target:
        if not (args.valid_source and args.valid_target):
            raise ValueError("give both --valid-source and --valid-target")
        valid = {"source": args.valid_source, "target": args.valid_target}
    settings = TrainSettings(
        output_dir=args.output, train_corpus=_corpus_kwargs(args), valid_corpus=valid, preset=args.preset,
        config_file=args.config, config_overrides=_parse_overrides(args.set), tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, tokenizer_pairs=args.tokenizer_pairs, max_length=args.max_length,
        max_tokens=args.max_tokens,
        update_tokens=args.update_tokens, epochs=args.epochs, max_steps=args.max_steps,
        max_minutes=args.max_minutes, warmup_steps=args.warmup_steps, lr_scale=args.lr_scale,
        cooldown_steps=args.cooldown_steps, label_smoothing=args.label_smoothing, eval_steps=args.eval_steps,
        eval_beams=args.eval_beams,
        eval_max_sentences=args.eval_max_sentences, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, average_last=args.average_last, logging_steps=args.logging_steps,
        bf16=args.bf16, seed=args.seed, resume=args.resume, overwrite=args.overwrite, report_to=args.report_to,
        progress=not args.no_progress,
    )
    result = train(settings)
    if result is not None:
        print(f"trained {result.steps} steps in {result.train_seconds / 60:.1f} min "
              f"({result.target_tokens_per_second:,.0f} target tokens/s); model saved to {result.output_dir}")
        for key, value in result.eval_metrics.items():
            print(f"  {key}: {value:.4g}")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train on built-in English→German number words, translate, show results")
    p.add_argument("--output", type=Path, default=Path("outputs/demo"), help="where data, model and plot go")
    p.add_argument("--minutes", type=float, default=3.0,
                   help="time limit of the whole demo: corpus, tokenizer, training and scoring (default 3)")
    p.add_argument("--max-steps", type=int, default=2500, help="training updates (default 2500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from .training.demo import print_demo, run_demo

    result = run_demo(args.output, minutes=args.minutes, max_steps=args.max_steps, seed=args.seed,
                      progress=not args.no_progress)
    print_demo(result)


COMMANDS = [_add_params, _add_average, _add_tokenizer, _add_data, _add_train, _add_demo]


def _add_attention(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attention", help="draw encoder, masked decoder and encoder-decoder attention of one sentence (§3.2.3)"
    )
    p.add_argument("model_dir", type=Path, help="saved model folder with its tokenizer (e.g. outputs/demo/model)")
    p.add_argument("source", help="the source sentence")
    p.add_argument("--target", help="use this target instead of the model's translation (teacher forcing)")
    p.add_argument("--output", type=Path, default=Path("attention"), help="folder for the PNGs and the HTML page")
    p.add_argument("--max-tokens", type=int, default=40, help="draw at most this many tokens per side (default 40)")
    p.add_argument("--layer", type=int, help="layer of the single-map pictures (default: mean of layers)")
    p.add_argument("--head", type=int, help="head of the single-map pictures (default: mean of heads)")
    p.add_argument("--steps", action="store_true",
                   help="also draw encoder layer --layer (default 0), head --head (default 0) step by step")
    p.set_defaults(func=_run_attention)


def _run_attention(args: argparse.Namespace) -> None:
    import warnings

    from .visualize import (
        attention_html,
        capture_attention,
        load_model_and_tokenizer,
        plot_attention,
        plot_encoder_layer,
        prepare_output_dir,
        trace_encoder_layer,
    )

    output = prepare_output_dir(args.output)  # fail before loading the model if it cannot be written
    model, tokenizer = load_model_and_tokenizer(args.model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capture = capture_attention(model, tokenizer, args.source, args.target)
        paths = plot_attention(capture, output, layer=args.layer, head=args.head, max_tokens=args.max_tokens)
        paths.append(attention_html(capture, output / "attention.html", max_tokens=args.max_tokens))
        if args.steps:
            trace = trace_encoder_layer(model, tokenizer, args.source, layer=args.layer or 0)
            paths += plot_encoder_layer(trace, output, head=args.head or 0)
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        print(f"note: {message}", file=sys.stderr)
    print(f"source: {capture.source}")
    print(f"target: {capture.target}{' (model translation)' if capture.translated else ''}")
    for path in paths:
        print(f"wrote {path}")


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="pictures of the model's fixed parts")
    psub = p.add_subparsers(dest="plot_command", required=True)
    pos = psub.add_parser("positions", help="sinusoidal positional encodings and their similarity (§3.5)")
    pos.add_argument("--length", type=int, default=100, help="number of positions (default 100)")
    pos.add_argument("--d-model", type=int, default=512, help="model dimension (default 512)")
    pos.add_argument("--layout", choices=["interleaved", "concatenated"], default="interleaved",
                     help="sin/cos on even/odd dimensions (the paper) or [sin | cos] (fairseq, Marian)")
    pos.add_argument("--output", type=Path, default=Path("plots"), help="folder for the PNGs (default plots/)")
    pos.set_defaults(func=_run_plot_positions)


def _run_plot_positions(args: argparse.Namespace) -> None:
    from .visualize import plot_positions

    for path in plot_positions(args.output, length=args.length, d_model=args.d_model, layout=args.layout):
        print(f"wrote {path}")


def _add_align(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="score cross-attention as word alignment on the number corpus (§3.2.3)")
    p.add_argument("model_dir", type=Path, help="model folder trained on number words (e.g. outputs/demo/model)")
    p.add_argument("--sentences", type=int, default=500, help="number of random numbers to score (default 500)")
    p.add_argument("--max-value", type=int, default=999_999, help="largest number drawn (default 999,999)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the drawn numbers")
    p.add_argument("--row", choices=["predicting", "input"], default="predicting",
                   help="decoder row of a target token: the step predicting it (default) or the one reading it")
    p.set_defaults(func=_run_align)


def _run_align(args: argparse.Namespace) -> None:
    import random
    import warnings

    from .alignment import alignment_accuracy
    from .training.numbers import MAX_VALUE, aligned_pair
    from .visualize import load_model_and_tokenizer

    if not 0 <= args.max_value <= MAX_VALUE:
        raise ValueError(f"--max-value must be in 0 … {MAX_VALUE:,}, got {args.max_value}")
    if not 1 <= args.sentences <= args.max_value + 1:
        raise ValueError(f"--sentences must be in 1 … {args.max_value + 1:,} (distinct numbers), got {args.sentences}")
    model, tokenizer = load_model_and_tokenizer(args.model_dir)
    numbers = random.Random(args.seed).sample(range(args.max_value + 1), args.sentences)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the report's notes say the same
        report = alignment_accuracy(model, tokenizer, [aligned_pair(n) for n in numbers], row=args.row)
    print(report.table())


COMMANDS += [_add_attention, _add_plot, _add_align]

COMMANDS += TRANSLATION_COMMANDS  # translate, push, convert


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vaswani", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    from safetensors import SafetensorError

    try:
        args.func(args)
    except (ValueError, OSError, ImportError) as err:  # ImportError: an optional extra that is not installed
        print(f"vaswani {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SafetensorError as err:  # a weights file the command read without checking it first
        print(f"vaswani {args.command}: error: a .safetensors weights file is truncated or damaged ({err}); "
              "copy or download it again, or save the model again", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:  # Ctrl-C: say what is kept instead of a traceback (130 = 128 + SIGINT)
        print(f"\nvaswani {args.command}: interrupted{f'; {err}' if str(err) else ''}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
