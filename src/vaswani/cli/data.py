"""``vaswani tokenizer train`` and ``vaswani data stats``: the shared BPE vocabulary (§5.1) and corpus figures."""

from __future__ import annotations

import argparse

from .common import corpus_args, corpus_kwargs


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train the shared source/target BPE tokenizer (§5.1)")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE jointly on source and target text")
    corpus_args(t)
    t.add_argument("--vocab-size", type=int, default=37000, help="vocabulary size (paper: ~37,000 for en-de)")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merged pair")
    t.add_argument("--output", required=True, help="folder to save the tokenizer in (AutoTokenizer loads it)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.set_defaults(func=_run_tokenizer_train)


def _run_tokenizer_train(args: argparse.Namespace) -> None:
    import time

    from ..training.data import train_tokenizer_from_corpus

    start = time.perf_counter()
    tokenizer, report = train_tokenizer_from_corpus(
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        output_dir=args.output,
        show_progress=not args.no_progress,
        **corpus_kwargs(args),
    )
    print(report)
    print(
        f"trained a vocabulary of {len(tokenizer):,} tokens in {time.perf_counter() - start:.1f} s; "
        f"saved to {args.output}"
    )


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="parallel corpora: statistics")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("stats", help="tokenize a corpus; print pairs, tokens, length percentiles, padding")
    corpus_args(s)
    s.add_argument("--tokenizer", required=True, help="tokenizer folder (from `vaswani tokenizer train`)")
    s.add_argument("--max-length", type=int, default=256, help="token limit per side")
    s.add_argument("--overlong", choices=["drop", "truncate"], default="drop", help="pairs over --max-length")
    s.add_argument(
        "--max-tokens", type=int, default=25000, help="token budget per batch for the padding figures (paper: ~25,000)"
    )
    s.add_argument("--num-proc", type=int, default=None, help="processes for tokenizing (default: one)")
    s.set_defaults(func=_run_data_stats)


def _run_data_stats(args: argparse.Namespace) -> None:
    from ..tokenization import load_tokenizer
    from ..training.batching import TokenBatchSampler, batch_padding, random_token_batches
    from ..training.data import corpus_statistics, load_parallel_corpus, sequence_lengths, tokenize_corpus

    tokenizer = load_tokenizer(args.tokenizer)
    pairs, report = load_parallel_corpus(num_proc=args.num_proc, **corpus_kwargs(args))
    print(report)
    tokenized, tok_report = tokenize_corpus(
        pairs, tokenizer, max_length=args.max_length, overlong=args.overlong, num_proc=args.num_proc
    )
    print(
        f"over {args.max_length} tokens: {tok_report.overlong_dropped:,} pairs dropped, "
        f"{tok_report.overlong_truncated:,} truncated"
    )
    print(corpus_statistics(tokenized).table())
    src, tgt = sequence_lengths(tokenized, "input_ids"), sequence_lengths(tokenized, "labels")
    sampler = TokenBatchSampler(src, tgt, args.max_tokens)
    grouped = batch_padding(list(sampler), src, tgt)
    shuffled = batch_padding(random_token_batches(src, tgt, args.max_tokens), src, tgt)
    print(
        f"batches of <= {args.max_tokens:,} tokens: {len(sampler):,}; padding waste "
        f"{grouped['waste']:.1%} (length-grouped) vs {shuffled['waste']:.1%} (random order)"
    )


COMMANDS = [_add_tokenizer, _add_data]
