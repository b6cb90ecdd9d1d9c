"""``vaswani attention``, ``vaswani plot positions`` and ``vaswani align``: the model as pictures (§3.2, §3.5)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_attention(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attention", help="draw encoder, masked decoder and encoder-decoder attention of one sentence (§3.2.3)"
    )
    p.add_argument("model_dir", type=Path, help="saved model folder with its tokenizer (e.g. outputs/demo/model)")
    p.add_argument("source", help="the source sentence")
    p.add_argument("--target-text", help="draw this target sentence, teacher-forced (default: the model's translation)")
    p.add_argument("--output", type=Path, default=Path("attention"), help="folder for the PNGs and the HTML page")
    p.add_argument("--max-drawn-tokens", type=int, default=40, help="draw at most this many tokens per side")
    p.add_argument("--layer", type=int, help="layer of the single-map pictures (default: mean of layers)")
    p.add_argument("--head", type=int, help="head of the single-map pictures (default: mean of heads)")
    p.add_argument(
        "--steps",
        action="store_true",
        help="also draw encoder layer --layer (default 0), head --head (default 0) step by step",
    )
    p.set_defaults(func=_run_attention)


def _run_attention(args: argparse.Namespace) -> None:
    import warnings

    from ..translate import load_translation_model
    from ..visual.pictures import (
        attention_html,
        capture_attention,
        plot_attention,
        plot_encoder_layer,
        prepare_output_dir,
        trace_encoder_layer,
    )

    output = prepare_output_dir(args.output)  # fail before loading the model if it cannot be written
    model, tokenizer = load_translation_model(args.model_dir, fast_linears=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capture = capture_attention(model, tokenizer, args.source, args.target_text)
        paths = plot_attention(capture, output, layer=args.layer, head=args.head, max_tokens=args.max_drawn_tokens)
        paths.append(attention_html(capture, output / "attention.html", max_tokens=args.max_drawn_tokens))
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
    pos.add_argument("--length", type=int, default=100, help="number of positions")
    pos.add_argument("--d-model", type=int, default=512, help="model dimension")
    pos.add_argument(
        "--layout",
        choices=["interleaved", "concatenated"],
        default="interleaved",
        help="sin/cos on even/odd dimensions (the paper) or [sin | cos] (fairseq, Marian)",
    )
    pos.add_argument("--output", type=Path, default=Path("plots"), help="folder for the PNGs")
    pos.set_defaults(func=_run_plot_positions)


def _run_plot_positions(args: argparse.Namespace) -> None:
    from ..visual.pictures import plot_positions

    for path in plot_positions(args.output, length=args.length, d_model=args.d_model, layout=args.layout):
        print(f"wrote {path}")


def _add_align(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="score cross-attention as word alignment on the number corpus (§3.2.3)")
    p.add_argument("model_dir", type=Path, help="model folder trained on number words (e.g. outputs/demo/model)")
    p.add_argument("--sentences", type=int, default=500, help="number of random numbers to score")
    p.add_argument("--max-value", type=int, default=999_999, help="largest number drawn")
    p.add_argument("--seed", type=int, default=1234, help="seed of the drawn numbers")
    p.add_argument(
        "--row",
        choices=["predicting", "input"],
        default="predicting",
        help="decoder row of a target token: the step predicting it (default) or the one reading it",
    )
    p.set_defaults(func=_run_align)


def _run_align(args: argparse.Namespace) -> None:
    import random
    import warnings

    from ..demo.numbers import MAX_VALUE, aligned_pair
    from ..translate import load_translation_model
    from ..visual.alignment import alignment_accuracy

    if not 0 <= args.max_value <= MAX_VALUE:
        raise ValueError(f"--max-value must be in 0 … {MAX_VALUE:,}, got {args.max_value}")
    if not 1 <= args.sentences <= args.max_value + 1:
        raise ValueError(f"--sentences must be in 1 … {args.max_value + 1:,} (distinct numbers), got {args.sentences}")
    model, tokenizer = load_translation_model(args.model_dir, fast_linears=False)
    numbers = random.Random(args.seed).sample(range(args.max_value + 1), args.sentences)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the report's notes say the same
        report = alignment_accuracy(model, tokenizer, [aligned_pair(n) for n in numbers], row=args.row)
    print(report.table())


COMMANDS = [_add_attention, _add_plot, _add_align]
