"""Where beam search's time goes, by part of the model and of the search, at each thread count.

Translates the first ``--limit`` test sentences with ``vaswani translate``'s batching (beam 4, transformers'
length penalty, as ``translate_bench`` does) and times each part with a wall clock around its call (CPU
operators run synchronously, so a part's time is its operators' time plus its own Python): the encoder, the
decoder's start (encoder-decoder keys and values), the decoder layers, the output layer, log-softmax, the
beam-search step (top-k, finished hypotheses), the cache bookkeeping when beams are re-ranked and sentences leave,
and the rest (``generate()``'s set-up, tokenizer, batching, the loop itself). The decoder layers are split into
their matrix products, attention, self-attention cache writes and the rest for ``FusedDecoderLayer`` (what
``vaswani translate`` runs in float32), or with ``--layer-by-layer`` (the model's own layers, linear layers
prepacked) into masked self-attention (projections, cache write, attention, W^O), encoder-decoder attention,
feed-forward and Add & Norm.

    python benchmarks/decode_profile.py outputs/multi30k-en-de [--threads 1,2] [--limit 300] [--dtype float32]
        [--layer-by-layer]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import sys
import time

import torch
from multi30k_data import add_data_argument, require_files

from vaswani import decoding, fused_decoder, kernels
from vaswani.cpu_linears import pack_linear_layers, product_backend
from vaswani.perf import cpu_description
from vaswani.training.data import read_lines
from vaswani.translate import DEFAULT_MAX_TOKENS, load_translation_model, translate

#: The decoding translate_bench times (transformers' length penalty, as CTranslate2 has).
DECODING = {"num_beams": 4, "length_penalty": 0.6, "length_penalty_type": "hf", "max_len_a": 1.0, "max_len_b": 50,
            "early_stopping": True}
REST = "rest (generate() set-up, tokenizer, batching, loop)"


class PartTimer:
    """Wall time spent in wrapped calls, by part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)

    def wrap(self, part: str, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return timed


NESTED = "decoder layers: the rest (Add & Norm, reshapes)"
BEST = "log-softmax and each row's best tokens"


def instrument(model, timer: PartTimer) -> list[str]:
    """Wrap the model's parts and the search's functions; returns the parts in display order."""
    decoder = decoding.IncrementalDecoder
    decoder.__init__ = timer.wrap("decoder start (encoder-decoder keys and values)", decoder.__init__)
    decoder.select = timer.wrap("cache bookkeeping (re-ranked beams, sentences leaving)", decoder.select)
    for name in ("beam_candidates", "_beam_step", "_update_improvable"):
        setattr(decoding, name, timer.wrap("beam-search step (top-k, finished hypotheses)", getattr(decoding, name)))
    decoding.best_continuations = timer.wrap(BEST, decoding.best_continuations)
    encoder = model.model.encoder
    encoder.forward = timer.wrap("encoder", encoder.forward)
    layers = model.model.decoder.layers
    model.lm_head.forward = timer.wrap("output layer (× vocabulary)", model.lm_head.forward)
    head = ["encoder", "decoder start (encoder-decoder keys and values)"]
    tail = ["output layer (× vocabulary)", BEST, "beam-search step (top-k, finished hypotheses)",
            "cache bookkeeping (re-ranked beams, sentences leaving)"]
    if all(isinstance(layer, fused_decoder.FusedDecoderLayer) for layer in layers):
        # The fused path calls these module functions; the layers' own time less theirs is the rest.
        for name, part in (("product", "decoder layers: matrix products"),
                           ("product_plus", "decoder layers: matrix products"),
                           ("attention", "decoder layers: attention (Eq. 1)")):
            setattr(fused_decoder, name, timer.wrap(part, getattr(fused_decoder, name)))
        for name in ("attend", "attend_slots"):  # the native kernels, where built (vaswani.kernels)
            setattr(kernels, name, timer.wrap("decoder layers: attention (Eq. 1)", getattr(kernels, name)))
        decoder.update = timer.wrap("decoder layers: self-attention cache writes", decoder.update)
        for layer in layers:
            layer.forward = timer.wrap(NESTED, layer.forward)
            layer.forward_segments = timer.wrap(NESTED, layer.forward_segments)
        return [*head, "decoder layers: matrix products", "decoder layers: attention (Eq. 1)",
                "decoder layers: self-attention cache writes", NESTED, *tail]
    for layer in layers:
        for name, part in (("self_attn", "masked self-attention"), ("encoder_attn", "encoder-decoder attention"),
                           ("feed_forward", "feed-forward")):
            module = getattr(layer, name)
            module.forward = timer.wrap(f"decoder {part}", module.forward)
        for name in ("self_attn_add_norm", "encoder_attn_add_norm", "feed_forward_add_norm"):
            module = getattr(layer, name)
            module.forward = timer.wrap("decoder Add & Norm", module.forward)
    return [*head, "decoder masked self-attention", "decoder encoder-decoder attention", "decoder feed-forward",
            "decoder Add & Norm", *tail]


def own_seconds(seconds: dict[str, float]) -> dict[str, float]:
    """The parts' times with the fused layers' total made their own time (less the parts timed inside them)."""
    if NESTED in seconds:
        inside = sum(value for part, value in seconds.items() if part.startswith("decoder layers:") and part != NESTED)
        seconds = {**seconds, NESTED: seconds[NESTED] - inside}
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="trained model folder")
    add_data_argument(parser)
    parser.add_argument("--source", help="source sentences (default: test_2016_flickr.en.gz in --data)")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="source tokens per batch")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or int8")
    parser.add_argument("--repeats", type=int, default=3, help="passes timed (median)")
    parser.add_argument("--layer-by-layer", action="store_true",
                        help="the model's own decoder layers instead of FusedDecoderLayer (float32)")
    args = parser.parse_args(argv)
    args.source = args.source or str(args.data / "test_2016_flickr.en.gz")
    require_files(parser, args.source)
    sentences = list(read_lines(args.source))[: args.limit]
    model, tokenizer = load_translation_model(args.model, dtype=args.dtype, fast_linears=not args.layer_by_layer)
    if args.layer_by_layer:
        pack_linear_layers(model)
    timer = PartTimer()
    parts = [*instrument(model, timer), REST]
    print(f"Date {datetime.date.today()}, {cpu_description()}, torch {torch.__version__}; {args.model} "
          f"({args.dtype}, {type(model.lm_head).__name__} with {product_backend()} products, "
          f"{type(model.model.decoder.layers[0]).__name__}), "
          f"{len(sentences)} sentences, beam 4, "
          f"max_tokens {args.max_tokens}; median of {args.repeats} passes.\n")
    lines = ["| part | " + " | ".join(f"{t} thread(s)" for t in args.threads.split(",")) + " |",
             "|---|" + "---:|" * len(args.threads.split(","))]
    columns = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        translate(model, tokenizer, sentences, max_tokens=args.max_tokens, **DECODING)  # warm-up
        passes = []
        for _ in range(args.repeats):
            timer.seconds.clear()
            start = time.perf_counter()
            translate(model, tokenizer, sentences, max_tokens=args.max_tokens, **DECODING)
            wall = time.perf_counter() - start
            seconds = own_seconds(dict(timer.seconds))  # the parts do not overlap
            seconds[REST] = wall - sum(seconds.values())
            passes.append((wall, seconds))
        wall, seconds = sorted(passes, key=lambda p: p[0])[len(passes) // 2]
        columns.append((threads, wall, seconds))
        print(f"{threads} thread(s): {len(sentences) / wall:.1f} sentences/s", file=sys.stderr, flush=True)
    for part in parts:
        lines.append(f"| {part} | " + " | ".join(f"{seconds.get(part, 0.0) / wall:.0%}" for _, wall, seconds in columns)
                     + " |")
    lines.append("| **sentences/s** | " + " | ".join(f"**{len(sentences) / wall:.1f}**" for _, wall, _ in columns)
                 + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
