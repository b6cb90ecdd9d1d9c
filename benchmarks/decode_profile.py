"""Where beam search's time goes: per decoder step, by kind of work, at each thread count.

Translates the first ``--limit`` test sentences with ``vaswani translate``'s batching (beam 4, transformers'
length penalty, as ``translate_bench`` does) and splits the time of one pass into:

* the output layer (the matrix product with a vocabulary-sized side: ``[hypotheses, d_model] × [d_model, V]``),
* log-softmax and top-k over the vocabulary,
* the other matrix products and attention (encoder and decoder layers),
* cache and beam bookkeeping (indexing, copies, gathers, masks, comparisons),
* layer norm, and the other operators,
* Python and dispatch: the wall time of an unprofiled pass minus the operators' self time under the profiler
  (an estimate: the profiler's own cost per operator is counted as operator time).

    python benchmarks/decode_profile.py outputs/multi30k-en-de [--threads 1,2] [--limit 300] [--dtype float32]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import statistics
import sys
import time

import torch
from multi30k_data import add_data_argument, require_files
from torch.profiler import ProfilerActivity, profile

from vaswani.perf import cpu_description
from vaswani.training.data import read_lines
from vaswani.translate import load_translation_model, translate

#: The decoding translate_bench times (transformers' length penalty, as CTranslate2 has).
DECODING = {"num_beams": 4, "length_penalty": 0.6, "length_penalty_type": "hf", "max_len_a": 1.0, "max_len_b": 50,
            "early_stopping": True}

#: Operator name fragments → the kind of work; the first match wins, the rest is "other operators".
KINDS = (
    ("log-softmax and top-k", ("softmax", "topk", "sort")),
    ("matrix products and attention", ("mm", "matmul", "linear", "attention", "bmm", "mkldnn", "onednn", "_int")),
    ("cache and beam bookkeeping", ("index", "copy", "cat", "gather", "take_along", "select", "slice", "view",
                                    "expand", "reshape", "flatten", "clone", "empty", "full", "fill", "zeros",
                                    "arange", "eq", "where", "masked", "nonzero", "any", "all", "item", "stack",
                                    "lt", "ge", "gt", "bitwise", "logical", "remainder", "div", "floor")),
    ("layer norm", ("layer_norm",)),
)
OUTPUT_LAYER = "output layer (× vocabulary)"
PYTHON = "Python and dispatch"


def kind_of(name: str, shapes: str, vocab: int) -> str:
    low = name.lower()
    if any(part in low for part in ("mm", "linear")) and f"{vocab}" in shapes:
        return OUTPUT_LAYER
    return next((kind for kind, parts in KINDS if any(part in low for part in parts)), "other operators")


def profiled_seconds(run, vocab: int) -> dict[str, float]:
    """Operator self time (s) per kind over one pass of ``run``."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    kinds: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        kinds[kind_of(event.key, str(event.input_shapes), vocab)] += event.self_cpu_time_total / 1e6
    return dict(kinds)


def count_steps(model, run) -> int:
    """Decoder steps (calls of the incremental decoder) in one pass of ``run``."""
    from vaswani import decoding

    calls = 0
    original = decoding.IncrementalDecoder.next_token_logits

    def counted(self, tokens):
        nonlocal calls
        calls += 1
        return original(self, tokens)

    decoding.IncrementalDecoder.next_token_logits = counted
    try:
        run()
    finally:
        decoding.IncrementalDecoder.next_token_logits = original
    return calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="trained model folder")
    add_data_argument(parser)
    parser.add_argument("--source", help="source sentences (default: test_2016_flickr.en.gz in --data)")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--max-tokens", type=int, default=512, help="source tokens per batch")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or int8")
    parser.add_argument("--repeats", type=int, default=3, help="unprofiled passes timed (median)")
    args = parser.parse_args(argv)
    args.source = args.source or str(args.data / "test_2016_flickr.en.gz")
    require_files(parser, args.source)
    sentences = list(read_lines(args.source))[: args.limit]
    model, tokenizer = load_translation_model(args.model, dtype=args.dtype)
    vocab = model.config.vocab_size

    def run() -> list[str]:
        return translate(model, tokenizer, sentences, max_tokens=args.max_tokens, **DECODING)

    steps = count_steps(model, run)
    print(f"Date {datetime.date.today()}, {cpu_description()}, torch {torch.__version__}; {args.model} "
          f"({args.dtype}), {len(sentences)} sentences, beam 4, max_tokens {args.max_tokens}, {steps} decoder steps.\n")
    kinds = [OUTPUT_LAYER] + [kind for kind, _ in KINDS] + ["other operators", PYTHON]
    lines = ["| threads | sentences/s | ms / step | " + " | ".join(kinds) + " |",
             "|---:|---:|---:|" + "---:|" * len(kinds)]
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        run()  # warm-up
        walls = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            walls.append(time.perf_counter() - start)
        wall = statistics.median(walls)
        seconds = profiled_seconds(run, vocab)
        seconds[PYTHON] = max(wall - sum(seconds.values()), 0.0)
        shares = " | ".join(f"{seconds.get(kind, 0.0) / wall:.0%}" for kind in kinds)
        lines.append(f"| {threads} | {len(sentences) / wall:.1f} | {1000 * wall / steps:.2f} | {shares} |")
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
