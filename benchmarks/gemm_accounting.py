"""Where decoding's matrix products go: ``vaswani translate`` against CTranslate2, product by product.

Both engines call oneDNN for their linear layers (PyTorch through its prepacked ``inner_product`` primitives,
CTranslate2 through ``dnnl_sgemm`` where it does not use MKL, as on AMD CPUs), and oneDNN logs every call with its
shape and time when ``ONEDNN_VERBOSE=1``. Each engine translates the same sentences (beam 4, transformers' length
penalty, token batches as in ``translate_bench.py``) in a child process with that log on; this script groups the
calls by weight shape (input × output features) and prints, per engine, the rows multiplied, the GFLOP, the
milliseconds and the GFLOP/s; and the engine's whole translation, timed in a second child without the log. It
tells "more products" (padding, extra steps) from "slower products" and from time outside the products.

Ours run with oneDNN's products (``VASWANI_CPU_PRODUCTS=onednn``), which its log records, even where
``vaswani translate`` would choose MKL's (:func:`vaswani.cpu_linears.product_backend`).

Attention's per-head products are not linear layers: PyTorch runs them in MKL, which oneDNN does not log, so they
are left out for both engines. The log's own overhead makes small calls look slower than they are.

    python benchmarks/gemm_accounting.py outputs/multi30k-en-de [--split val] [--limit 600] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from multi30k_data import add_data_argument, require_files
from transformers import AutoConfig
from translate_bench import BEAM, HF_DECODING, _ct2_translate, _ctranslate2_model

from vaswani.perf import cpu_description, tune_allocator
from vaswani.training.data import read_lines
from vaswani.translate import DEFAULT_MAX_TOKENS, load_translation_model, translate

ENGINES = ("vaswani", "ctranslate2")
#: PyTorch's inner product (``mb<rows>ic<in>oc<out>``) and oneDNN's sgemm (``<M>x<K>:<K>x<N>``) in the log.
INNER_PRODUCT = re.compile(r"mb(\d+)ic(\d+)oc(\d+)")
SGEMM = re.compile(r"(\d+)x(\d+):\d+x(\d+)")


def linear_calls(log: str, features: set[int]) -> list[tuple[int, int, int, float]]:
    """(rows, in features, out features, ms) of each linear-layer product in a oneDNN verbose log. Of the sgemm
    calls, those whose inner size is not one of ``features`` or whose output is narrower than the smallest of them
    (attention's per-head products) are left out."""
    calls = []
    for line in log.splitlines():
        fields = line.split(",")
        if "exec" not in fields or len(fields) < 3:
            continue
        if "inner_product" in fields and (match := INNER_PRODUCT.fullmatch(fields[-2])):
            calls.append((*map(int, match.groups()), float(fields[-1])))
        elif ("gemm_api" in fields and (match := SGEMM.fullmatch(fields[-2])) and int(match[2]) in features
              and int(match[3]) >= min(features)):
            calls.append((int(match[1]), int(match[2]), int(match[3]), float(fields[-1])))
    return calls


def _worker(args: argparse.Namespace) -> None:
    """Translate once to warm up (oneDNN compiles its kernels), then once between markers for the parent."""
    torch.set_num_threads(args.threads)
    tune_allocator()
    sources = list(read_lines(args.source))[: args.limit]
    model, tokenizer = load_translation_model(args.model)
    if args.worker == "ctranslate2":
        translator = _ctranslate2_model(args.model, Path(args.folder), "float32", args.threads)
        run = lambda: _ct2_translate(translator, tokenizer, sources, args.max_tokens)  # noqa: E731
    else:
        run = lambda: translate(model, tokenizer, sources, max_tokens=args.max_tokens, **HF_DECODING)  # noqa: E731
    run()
    print("START", flush=True)
    start = time.perf_counter()
    run()
    print(f"END {time.perf_counter() - start:.3f}", flush=True)


def _child_run(args: argparse.Namespace, engine: str, folder: str, verbose: bool) -> tuple[str, float]:
    """One timed translation by ``engine`` in a child process: its oneDNN log (with ``verbose``) and its seconds."""
    command = [sys.executable, __file__, args.model, "--source", args.source, "--limit", str(args.limit),
               "--threads", str(args.threads), "--max-tokens", str(args.max_tokens), "--worker", engine,
               "--folder", folder]
    env = {**os.environ, "ONEDNN_VERBOSE": "1" if verbose else "0", "VASWANI_CPU_PRODUCTS": "onednn"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    body, _, end = out.split("START\n", 1)[1].rpartition("END ")
    return body, float(end.split()[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="trained Vaswani model folder")
    add_data_argument(parser)
    parser.add_argument("--split", default="val", help="Multi30k split whose English side is translated")
    parser.add_argument("--source", help="source sentences (default: <split>.en.gz in --data)")
    parser.add_argument("--limit", type=int, default=600, help="first N sentences")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.source = args.source or str(args.data / f"{args.split}.en.gz")
    require_files(parser, args.source)
    if args.worker:
        _worker(args)
        return
    config = AutoConfig.from_pretrained(args.model)  # its layer widths tell linear layers from attention
    features = {config.d_model, config.decoder_ffn_dim, config.encoder_ffn_dim}
    print(f"{cpu_description()}; torch {torch.__version__}; {args.threads} threads; {args.limit} sentences of "
          f"{Path(args.source).name}, beam {BEAM}, max_tokens {args.max_tokens}; products timed with ONEDNN_VERBOSE=1 "
          "(its overhead included), whole translations in another run without it\n")
    print("| engine | weight (in × out) | calls | rows | GFLOP | ms | GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    summary = []
    with tempfile.TemporaryDirectory() as folder:
        for engine in ENGINES:
            log = _child_run(args, engine, folder, verbose=True)[0]
            seconds = _child_run(args, engine, folder, verbose=False)[1]
            groups: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0, 0, 0.0, 0.0])
            for rows, inputs, outputs, ms in linear_calls(log, features):
                group = groups[(inputs, outputs)]
                group[0] += 1
                group[1] += rows
                group[2] += 2 * rows * inputs * outputs / 1e9
                group[3] += ms
            if not groups:
                print(f"| {engine} | none logged (CTranslate2 uses MKL, not oneDNN, on Intel CPUs) | | | | | |")
                continue
            for (inputs, outputs), (calls, rows, gflop, ms) in sorted(groups.items(), key=lambda g: -g[1][2]):
                print(f"| {engine} | {inputs} × {outputs} | {calls} | {rows} | {gflop:.1f} | {ms:.0f} | "
                      f"{gflop / ms * 1e3:.1f} |")
            gflop, ms = sum(g[2] for g in groups.values()), sum(g[3] for g in groups.values())
            summary.append((engine, gflop, ms, seconds))
    print("\n| engine | linear GFLOP | in linear layers, s | GFLOP/s | whole translation, s | outside them, s |")
    print("|---|---:|---:|---:|---:|---:|")
    for engine, gflop, ms, seconds in summary:
        print(f"| {engine} | {gflop:.1f} | {ms / 1e3:.2f} | {gflop / ms * 1e3:.1f} | {seconds:.2f} | "
              f"{seconds - ms / 1e3:.2f} |")


if __name__ == "__main__":
    main()
