"""Does ``vaswani translate --engine ctranslate2`` give the PyTorch path's tokens? Line by line, on a test set.

Exports MODEL with ``vaswani export ctranslate2`` (float32) into a temporary folder, translates the source file
(default: Multi30k test_2016_flickr.en.gz) with ``vaswani translate``'s PyTorch path and with the CTranslate2
engine, both with beam 4, transformers' length penalty |Y|^α (CTranslate2's form) and the same per-sentence
limit and batches, and prints the share of identical lines (token ids). For every line that differs it prints
both translations with the score beam search ranks by, log P(Y|X) / |Y|^α, computed by the PyTorch model: the
engine whose translation scores higher found the better hypothesis, and equal scores mean a tie broken apart.

    python benchmarks/ct2_match.py MODEL [--source FILE] [--threads 2] [--quantization float32]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import torch
from multi30k_data import add_data_argument, require_files

from vaswani.ct2 import export_ctranslate2, translate_ctranslate2
from vaswani.perf import cpu_description
from vaswani.training.data import read_lines
from vaswani.translate import load_translation_model, translate

DECODING = {"num_beams": 4, "length_penalty": 0.6, "length_penalty_type": "hf", "max_len_a": 1.0, "max_len_b": 50}


@torch.inference_mode()
def beam_score(model, tokenizer, source: str, translation: str, alpha: float) -> float:
    """log P(translation | source) / |Y|^α with |Y| the generated tokens, </s> included (what beam search ranks)."""
    inputs = tokenizer(source, return_tensors="pt")
    labels = tokenizer(text_target=translation, return_tensors="pt")["input_ids"]
    logits = model(**inputs, labels=labels, skip_logits=False).logits
    log_probs = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).sum()
    return float(log_probs) / labels.shape[-1] ** alpha


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="trained Vaswani model folder")
    add_data_argument(parser)
    parser.add_argument("--source", help="source sentences (default: test_2016_flickr.en.gz in --data)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantization", default="float32", help="of the CTranslate2 export")
    args = parser.parse_args(argv)
    args.source = args.source or str(args.data / "test_2016_flickr.en.gz")
    require_files(parser, args.source)
    torch.set_num_threads(args.threads)
    sources = list(read_lines(args.source))
    model, tokenizer = load_translation_model(args.model)
    torch_lines = translate(model, tokenizer, sources, **DECODING)
    with tempfile.TemporaryDirectory() as tmp:
        export_ctranslate2(args.model, Path(tmp) / "ct2", quantization=args.quantization)
        ct2_lines = translate_ctranslate2(Path(tmp) / "ct2", sources, threads=args.threads, **DECODING)
    ids = [tokenizer(text_target=lines)["input_ids"] for lines in (torch_lines, ct2_lines)]
    differing = [i for i, (a, b) in enumerate(zip(*ids)) if a != b]
    print(f"Date {datetime.date.today()}, {cpu_description()}; {args.model}, {args.source}; CTranslate2 "
          f"{args.quantization}; beam 4, |Y|^0.6, max_len_a 1, max_len_b 50.\n")
    same = len(sources) - len(differing)
    print(f"**{same:,} of {len(sources):,} lines identical ({same / len(sources):.1%})**\n")
    if differing:
        print("| line | PyTorch | score | CTranslate2 | score |\n|---:|---|---:|---|---:|")
    for i in differing:
        scores = [beam_score(model, tokenizer, sources[i], line[i], DECODING["length_penalty"])
                  for line in (torch_lines, ct2_lines)]
        print(f"| {i + 1} | {torch_lines[i]} | {scores[0]:.4f} | {ct2_lines[i]} | {scores[1]:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
