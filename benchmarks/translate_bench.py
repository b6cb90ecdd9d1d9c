"""Speed of ``vaswani translate`` against transformers' MarianMTModel and CTranslate2 on the same weights.

Translates a test set (default: Multi30k test_2016_flickr, 1,000 English sentences) with beam 4 and reports
sentences/s, generated tokens/s and BLEU for:

* ``vaswani translate`` (:func:`vaswani.translate.translate`: length-sorted token batches), fp32 and bf16,
  with transformers' length-penalty form so that all systems decode the same way, and once with the
  paper's GNMT penalty (the model's default);
* transformers' ``MarianMTModel.generate`` on the same weights (``vaswani_to_marian``), fp32 and bf16, fed
  (a) the same length-sorted batches and (b) batches of 32 sentences in file order, as a plain script would;
* CTranslate2 (if ``import ctranslate2`` works) on a conversion of the same weights, fp32 and bf16.

All systems run in this one process with the same thread count and allocator, one after the other.
The model must use Marian's ``[sin | cos]`` positions (``sinusoid_layout="concatenated"``) to export.

    python benchmarks/translate_bench.py outputs/multi30k-en-de [--threads 2] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sacrebleu
import torch
from multi30k_data import add_data_argument, require_files

from vaswani.convert import vaswani_to_marian
from vaswani.training.data import read_lines
from vaswani.translate import load_translation_model, token_batches, translate


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacreBLEU, 13a tokenizer, cased (as vaswani.training.metrics.bleu, without its evaluate dependency)."""
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


#: The decoding every system uses (transformers' and CTranslate2's length penalty is score / |Y|^α).
BEAM, ALPHA, MAX_LEN_A, MAX_LEN_B = 4, 0.6, 1.0, 50


def _timed(fn: Callable[[], list[str]]) -> tuple[list[str], float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _marian_translate(marian, tokenizer, sentences: list[str], batches: list[list[int]]) -> list[str]:
    out = [""] * len(sentences)
    with torch.inference_mode():
        for batch in batches:
            enc = tokenizer([sentences[i] for i in batch], return_tensors="pt", padding=True)
            limit = int(enc["attention_mask"].sum(-1).max()) + MAX_LEN_B
            ids = marian.generate(**enc, num_beams=BEAM, length_penalty=ALPHA, early_stopping=True,
                                  max_new_tokens=limit)
            for i, text in zip(batch, tokenizer.batch_decode(ids, skip_special_tokens=True)):
                out[i] = text
    return out


def _ctranslate2_model(model_dir: str, folder: Path, compute_type: str, threads: int):
    """The package's export (``vaswani export ctranslate2``, float32 weights) loaded in ``compute_type``, one batch at
    a time on ``threads`` threads (CTranslate2's best setting for a thread count)."""
    import ctranslate2

    from vaswani.ct2 import export_ctranslate2

    target = folder / "ct2"
    if not target.exists():
        export_ctranslate2(model_dir, target)
    return ctranslate2.Translator(str(target), device="cpu", compute_type=compute_type, intra_threads=threads,
                                  inter_threads=1)


def _ct2_translate(translator, tokenizer, sentences: list[str], max_tokens: int) -> list[str]:
    tokens = [tokenizer.convert_ids_to_tokens(tokenizer(s)["input_ids"]) for s in sentences]
    results = translator.translate_batch(
        tokens, beam_size=BEAM, length_penalty=ALPHA, max_batch_size=max_tokens, batch_type="tokens",
        max_decoding_length=max(len(t) for t in tokens) + MAX_LEN_B, return_scores=False,
    )
    out = []
    for result in results:
        ids = tokenizer.convert_tokens_to_ids(result.hypotheses[0])
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="trained Vaswani model folder (concatenated sinusoids)")
    add_data_argument(parser)
    parser.add_argument("--source", help="source sentences (default: test_2016_flickr.en.gz in --data)")
    parser.add_argument("--reference", help="reference translations (default: test_2016_flickr.de.gz in --data)")
    parser.add_argument("--limit", type=int, help="first N sentences only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=512, help="source tokens per batch")
    parser.add_argument("--sweep", default="", help="comma-separated max_tokens values to time vaswani fp32 with")
    parser.add_argument("--skip", default="", help="comma-separated system names to leave out")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    args.source = args.source or str(args.data / "test_2016_flickr.en.gz")
    args.reference = args.reference or str(args.data / "test_2016_flickr.de.gz")
    require_files(parser, args.source, args.reference)
    torch.set_num_threads(args.threads)
    sources, references = list(read_lines(args.source)), list(read_lines(args.reference))
    if args.limit:
        sources, references = sources[: args.limit], references[: args.limit]
    model, tokenizer = load_translation_model(args.model)
    lengths = [len(ids) for ids in tokenizer(sources)["input_ids"]]
    sorted_batches = token_batches(lengths, args.max_tokens)
    file_order_batches = [list(range(i, min(i + 32, len(sources)))) for i in range(0, len(sources), 32)]
    hf_decoding = {"num_beams": BEAM, "length_penalty": ALPHA, "length_penalty_type": "hf",
                   "max_len_a": MAX_LEN_A, "max_len_b": MAX_LEN_B, "early_stopping": True}
    models = {"float32": model, "bfloat16": load_translation_model(args.model, dtype="bfloat16")[0]}
    marians = {dtype: vaswani_to_marian(m) for dtype, m in models.items()}
    systems: dict[str, Callable[[], list[str]]] = {}
    for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        m, marian = models[dtype], marians[dtype]
        systems[f"vaswani translate, {short}"] = lambda m=m: translate(
            m, tokenizer, sources, max_tokens=args.max_tokens, **hf_decoding)
        if short == "fp32":
            for budget in (int(v) for v in args.sweep.split(",") if v):
                systems[f"vaswani translate, fp32, max_tokens {budget}"] = lambda m=m, b=budget: translate(
                    m, tokenizer, sources, max_tokens=b, **hf_decoding)
        systems[f"vaswani translate, {short}, paper decoding (GNMT)"] = lambda m=m: translate(
            m, tokenizer, sources, max_tokens=args.max_tokens, **{**hf_decoding, "length_penalty_type": "gnmt"})
        systems[f"MarianMTModel.generate, {short}, same sorted batches"] = lambda marian=marian: _marian_translate(
            marian, tokenizer, sources, sorted_batches)
        systems[f"MarianMTModel.generate, {short}, 32 sentences in file order"] = (
            lambda marian=marian: _marian_translate(marian, tokenizer, sources, file_order_batches))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            import ctranslate2  # noqa: F401

            for compute_type, short in (("float32", "fp32"), ("bfloat16", "bf16")):
                try:
                    translator = _ctranslate2_model(args.model, Path(tmp), compute_type, args.threads)
                except ValueError as err:  # e.g. no bf16 kernels for this CPU in CTranslate2's build
                    print(f"CTranslate2 {short}: {err}", file=sys.stderr)
                    continue
                systems[f"CTranslate2, {short}"] = lambda t=translator: _ct2_translate(
                    t, tokenizer, sources, args.max_tokens)
        except ImportError:
            print("ctranslate2 is not installed: skipping it (pip install ctranslate2)", file=sys.stderr)
        skip = {name.strip() for name in args.skip.split(",") if name.strip()}
        rows = []
        print(f"{len(sources)} sentences, beam {BEAM}, {args.threads} threads, {args.model}\n")
        print("| system | sentences/s | tokens/s | BLEU | seconds |\n|---|---|---|---|---|")
        for name, run in systems.items():
            if any(s in name for s in skip):
                continue
            run() if name.startswith("CTranslate2") else None  # CTranslate2 loads lazily: warm it up
            hypotheses, seconds = _timed(run)
            generated = sum(len(ids) for ids in tokenizer(hypotheses)["input_ids"])  # </s> included
            rows.append({"system": name, "sentences_per_s": len(sources) / seconds,
                         "tokens_per_s": generated / seconds, "bleu": bleu(hypotheses, references),
                         "seconds": seconds})
            row = rows[-1]
            print(f"| {name} | {row['sentences_per_s']:.1f} | {row['tokens_per_s']:.0f} | {row['bleu']:.2f} | "
                  f"{seconds:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
