"""Regenerate the pictures of the guided tour of the Transformer (`docs/tour.md`) and the alignment figures.

    python benchmarks/make_tour_figures.py                       # from outputs/demo/model (`vaswani demo`)
    python benchmarks/make_tour_figures.py --model DIR --output docs/images

When the model folder does not exist, a small number-words model is trained on the spot (numbers < 1000,
about 20 s; see ``vaswani.demo.toy``) and the pictures say so in the printed report. Every picture comes from the
library functions behind ``vaswani attention``, ``vaswani plot positions`` and ``vaswani align``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from vaswani.demo.numbers import aligned_pair
from vaswani.translate import load_translation_model
from vaswani.visual.alignment import alignment_accuracy
from vaswani.visual.pictures import (
    capture_attention,
    plot_attention,
    plot_encoder_layer,
    plot_positions,
    prepare_output_dir,
    trace_encoder_layer,
)

MAX_BYTES = 300_000
DEMO_SENTENCE = "three hundred forty-two thousand five hundred sixty-seven"
TOY_SENTENCE = "seven hundred eighty-four"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("outputs/demo/model"), help="trained model folder")
    parser.add_argument("--output", type=Path, default=Path("docs/images"), help="where the PNGs go")
    parser.add_argument("--sentence", help="source sentence (default: a number with units-before-tens)")
    parser.add_argument("--sentences", type=int, default=500, help="numbers scored for the alignment accuracy")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)  # the eager switch is expected here

    if args.model.is_dir():
        model, tokenizer = load_translation_model(args.model, fast_linears=False)
        origin, max_value = f"model folder {args.model}", 999_999
        sentence = args.sentence or DEMO_SENTENCE
    else:
        from vaswani.demo.toy import train_number_model

        print(f"{args.model} does not exist: training a small number-words model (numbers < 1000) instead")
        run = train_number_model(max_value=999, steps=400, seed=0)
        model, tokenizer = run.model, run.tokenizer
        origin = f"vaswani.demo.toy.train_number_model(max_value=999, steps=400) in {run.seconds:.0f} s"
        max_value = 999
        sentence = args.sentence or TOY_SENTENCE
    output = prepare_output_dir(args.output)

    numbers = random.Random(1234).sample(range(max_value + 1), min(args.sentences, max_value + 1))
    report = alignment_accuracy(model, tokenizer, [aligned_pair(n) for n in numbers])
    layer, head = report.best_layer, report.best_head
    capture = capture_attention(model, tokenizer, sentence)
    config = model.config

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        plot_positions(tmp, length=100, d_model=config.d_model, layout=config.sinusoid_layout)
        plot_attention(capture, tmp / "encoder", kinds=["encoder"], layer=0, head=0)
        plot_attention(capture, tmp / "decoder", kinds=["decoder"], layer=0, head=None)
        plot_attention(capture, tmp / "cross", kinds=["cross"], layer=layer, head=head)
        plot_encoder_layer(trace_encoder_layer(model, tokenizer, sentence, layer=0), tmp, head=0)
        wanted = {
            "positional_encoding.png": tmp / "positional_encoding.png",
            "position_similarity.png": tmp / "position_similarity.png",
            "attention_step_by_step.png": tmp / "attention_step_by_step.png",
            "add_norm_feed_forward.png": tmp / "add_norm_feed_forward.png",
            "encoder_self_attention_grid.png": tmp / "encoder" / "encoder_self_attention_grid.png",
            "decoder_masked_self_attention.png": tmp / "decoder" / "decoder_masked_self_attention.png",
            "cross_attention.png": tmp / "cross" / "cross_attention.png",
            "cross_attention_grid.png": tmp / "cross" / "cross_attention_grid.png",
        }
        for name, source in wanted.items():
            shutil.copyfile(source, output / name)
    text = "\n".join([
        f"pictures from: {origin}",
        f"sentence: {capture.source} → {capture.target}",
        f"cross-attention picture: {report.name(layer, head)} (best piece alignment)",
        "",
        report.table(),
    ])
    (output / "alignment.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    too_big = []
    for name in [*wanted, "alignment.txt"]:
        size = (output / name).stat().st_size
        print(f"wrote {output / name} ({size / 1000:.0f} kB)")
        if size > MAX_BYTES:
            too_big.append(name)
    if too_big:
        sys.exit(f"pictures over {MAX_BYTES // 1000} kB: {', '.join(too_big)}")


if __name__ == "__main__":
    main()
