"""Tokenizer and batching figures on Multi30k (train): training time, tokens per sentence, tokenizing time,
round-trip exactness and padding waste of token batching vs random batching.

    python benchmarks/tokenizer_bench.py [--data MULTI30K_FOLDER] [--vocab-size 8000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
from multi30k_data import add_data_argument, require_files  # noqa: E402

from vaswani.tokenization import train_tokenizer  # noqa: E402
from vaswani.training.batching import TokenBatchSampler, batch_padding, random_token_batches  # noqa: E402
from vaswani.training.data import load_parallel_corpus, sequence_lengths, tokenize_corpus  # noqa: E402


def _timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_data_argument(parser)
    parser.add_argument("--src", default="en")
    parser.add_argument("--tgt", default="de")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3, help="timings are the median of this many runs")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1024, 4096, 25000])
    args = parser.parse_args()
    require_files(parser, args.data / f"train.{args.src}.gz", args.data / f"train.{args.tgt}.gz")
    datasets.disable_progress_bars()

    load_time, (pairs, report) = _timed(
        lambda: load_parallel_corpus(args.data / f"train.{args.src}.gz", args.data / f"train.{args.tgt}.gz"),
        args.repeats,
    )
    src_text, tgt_text = list(pairs["source"]), list(pairs["target"])
    train_time, tok = _timed(
        lambda: train_tokenizer(src_text + tgt_text, vocab_size=args.vocab_size, show_progress=False),
        args.repeats,
    )
    call_time, enc = _timed(lambda: tok(src_text, text_target=tgt_text), args.repeats)
    map_time, (tokenized, _) = _timed(lambda: tokenize_corpus(pairs, tok, max_length=None), args.repeats)

    rows = [
        ("pairs (train)", f"{report.pairs:,}"),
        ("read + align both files", f"{load_time:.2f} s"),
        (f"train BPE, vocab {args.vocab_size:,} (joint {args.src}+{args.tgt})", f"{train_time:.2f} s"),
        ("tokenize train, tokenizer(src, text_target=tgt)", f"{call_time:.2f} s"),
        ("tokenize train, tokenize_corpus (datasets.map)", f"{map_time:.2f} s"),
    ]
    for lang, ids, text in ((args.src, enc["input_ids"], src_text), (args.tgt, enc["labels"], tgt_text)):
        n_tokens = np.array([len(x) - 1 for x in ids])  # without the appended </s>
        decoded = tok.batch_decode(ids, skip_special_tokens=True)
        same = sum(a == b for a, b in zip(text, decoded))
        rows.append((f"tokens/sentence {lang} (without </s>)", f"{n_tokens.mean():.2f}"))
        rows.append((f"round trip exact {lang}", f"{same:,}/{len(text):,} = {same / len(text):.3%}"))
    src_len, tgt_len = sequence_lengths(tokenized, "input_ids"), sequence_lengths(tokenized, "labels")
    for max_tokens in args.max_tokens:
        sampler = TokenBatchSampler(src_len, tgt_len, max_tokens, seed=0)
        grouped = batch_padding(list(sampler), src_len, tgt_len)
        shuffled = batch_padding(random_token_batches(src_len, tgt_len, max_tokens, seed=0), src_len, tgt_len)
        rows.append(
            (
                f"padding waste, <= {max_tokens:,} tokens/batch",
                f"{grouped['waste']:.1%} token batching ({len(sampler)} batches) vs {shuffled['waste']:.1%} random",
            )
        )
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 40}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
