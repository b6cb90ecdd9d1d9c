"""How much BLEU each of the paper's decoding choices (§6.1) is worth, against transformers' defaults.

The paper decodes with beam size 4, the GNMT length penalty α = 0.6 and at most input length + 50 tokens,
stopping early. transformers' defaults are greedy search, length_penalty 1.0 (|Y|^1, used by beam search
only) and max_length 20. This script translates a test set with a trained model under: transformers'
defaults; each paper choice alone added to them; the full paper decoding; and the paper decoding with
each choice taken back. Scores are sacreBLEU (13a, cased, detokenized).

    python benchmarks/decoding_bleu.py outputs/multi30k-en-de            # Multi30k test_2016_flickr en→de
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import sacrebleu
from multi30k_data import add_data_argument, require_files

from vaswani.training.data import read_lines
from vaswani.translate import load_translation_model, translate


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacreBLEU, 13a tokenizer, cased (as vaswani.training.metrics.bleu, without its evaluate dependency)."""
    return sacrebleu.corpus_bleu(hypotheses, [references]).score



HF_DEFAULTS = {"num_beams": 1, "max_length": 20, "length_penalty_type": "hf", "early_stopping": False}
PAPER = {"num_beams": 4, "length_penalty_type": "gnmt", "length_penalty": 0.6, "max_len_a": 1.0, "max_len_b": 50,
         "early_stopping": True}
#: (row label, generate() settings); unset keys keep transformers' defaults.
SETTINGS = [
    ("transformers' defaults (greedy, max_length 20)", HF_DEFAULTS),
    ("+ beam 4 only (lp |Y|^1.0, max_length 20)", {**HF_DEFAULTS, "num_beams": 4, "length_penalty": 1.0}),
    ("+ input length + 50 only (greedy)", {**HF_DEFAULTS, "max_length": None, "max_len_a": 1.0, "max_len_b": 50}),
    ("+ beam 4 and GNMT α=0.6 (max_length 20)",
     {**HF_DEFAULTS, "num_beams": 4, "length_penalty_type": "gnmt", "length_penalty": 0.6}),
    ("paper (§6.1): beam 4, GNMT α=0.6, input + 50, early stop", PAPER),
    ("paper, greedy instead of beam 4", {**PAPER, "num_beams": 1, "length_penalty_type": "hf",
                                          "length_penalty": None, "early_stopping": None}),
    ("paper, transformers' |Y|^0.6 instead of GNMT", {**PAPER, "length_penalty_type": "hf"}),
    ("paper, transformers' default penalty |Y|^1.0", {**PAPER, "length_penalty_type": "hf", "length_penalty": 1.0}),
    ("paper, no length penalty (α = 0)", {**PAPER, "length_penalty": 0.0}),
    ("paper, max_length 20 instead of input + 50", {**PAPER, "max_len_a": None, "max_length": 20}),
    ("paper, without early stopping", {**PAPER, "early_stopping": False}),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="trained model folder")
    add_data_argument(parser)
    parser.add_argument("--source", help="source sentences (default: test_2016_flickr.en.gz in --data)")
    parser.add_argument("--reference", help="reference translations (default: test_2016_flickr.de.gz in --data)")
    parser.add_argument("--limit", type=int, help="first N sentences only")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (BLEU does not depend on it beyond rounding)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    args.source = args.source or str(args.data / "test_2016_flickr.en.gz")
    args.reference = args.reference or str(args.data / "test_2016_flickr.de.gz")
    require_files(parser, args.source, args.reference)
    sources, references = list(read_lines(args.source)), list(read_lines(args.reference))
    if args.limit:
        sources, references = sources[: args.limit], references[: args.limit]
    model, tokenizer = load_translation_model(args.model, device=args.device)
    rows = []
    print(f"{len(sources)} sentences, {args.model}\n\n| decoding | BLEU | Δ vs transformers' defaults | s |")
    print("|---|---|---|---|")
    for label, settings in SETTINGS:
        start = time.perf_counter()
        kwargs = {key: value for key, value in settings.items() if value is not None}
        hypotheses = translate(model, tokenizer, sources, max_tokens=args.max_tokens, **kwargs)
        score = bleu(hypotheses, references)
        rows.append({"decoding": label, "bleu": score, "seconds": time.perf_counter() - start})
        delta = score - rows[0]["bleu"]
        print(f"| {label} | {score:.2f} | {delta:+.2f} | {rows[-1]['seconds']:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
