"""Speed of ``vaswani translate`` against transformers' MarianMTModel and CTranslate2 on the same weights.

Translates a test set (default: Multi30k test_2016_flickr, 1,000 English sentences) with beam 4 and reports, per
system, sentences/s (median of ``--repeats`` passes, the systems taking turns within each round), the ratio to
CTranslate2 float32, BLEU, and the share of lines identical to ``vaswani translate`` float32:

* ``vaswani translate`` (:func:`vaswani.translate.translate`: length-sorted token batches) in float32, bfloat16
  and int8 (:mod:`vaswani.cpu_linears`), with transformers' length-penalty form so that all systems decode the
  same way, once with the paper's GNMT penalty (the model's default), once in float32 with one ``generate()``
  per batch (no continuous batching), and once in float32 with the model's own decoder layers instead of
  :class:`vaswani.fused_decoder.FusedDecoderLayer` (prepacked linear layers only);
* transformers' ``MarianMTModel.generate`` on the same weights (``vaswani_to_marian``), float32 and bfloat16, fed
  (a) the same length-sorted batches and (b) batches of 32 sentences in file order, as a plain script would;
* CTranslate2 (if ``import ctranslate2`` works) on ``vaswani export ctranslate2``'s conversion of the same weights,
  at its best setting for the thread count (``intra_threads`` = threads, ``inter_threads`` = 1, one
  ``translate_batch`` call with token batches of ``--max-tokens``), in float32, int8 and bfloat16 where this
  CPU has the kernels;
* ``vaswani translate --engine ctranslate2`` (:func:`vaswani.ct2.translate_ctranslate2`: our batches and each
  sentence's own length limit) in float32: the export's token-for-token agreement with the PyTorch path.

All systems run in this one process with the same thread count and allocator (:func:`vaswani.perf.tune_allocator`,
set at start-up as a Vaswani model's first ``generate()`` on a CPU sets it). The first pass of each system (its
warm-up: oneDNN compiles a kernel per new row count, the heap grows) is timed and reported apart. The CPU model is
printed first.

    python benchmarks/translate_bench.py outputs/multi30k-en-de [--threads 2] [--limit N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sacrebleu
import torch
from multi30k_data import add_data_argument, require_files

from vaswani.convert import vaswani_to_marian
from vaswani.cpu_linears import pack_linear_layers, product_backend
from vaswani.perf import cpu_description, tune_allocator
from vaswani.training.data import read_lines
from vaswani.translate import DEFAULT_MAX_TOKENS, load_translation_model, token_batches, translate


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacreBLEU, 13a tokenizer, cased (as vaswani.training.metrics.bleu, without its evaluate dependency)."""
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


#: The decoding every system uses (transformers' and CTranslate2's length penalty is score / |Y|^α).
BEAM, ALPHA, MAX_LEN_A, MAX_LEN_B = 4, 0.6, 1.0, 50
#: ``translate`` settings that decode as the other systems do (transformers' length-penalty form).
HF_DECODING = {"num_beams": BEAM, "length_penalty": ALPHA, "length_penalty_type": "hf", "max_len_a": MAX_LEN_A,
               "max_len_b": MAX_LEN_B, "early_stopping": True}


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


def _systems(args, sources: list[str], folder: Path) -> dict[str, Callable[[], list[str]]]:
    """Every system to time, by name (each a call that translates ``sources``)."""
    model, tokenizer = load_translation_model(args.model)
    lengths = [len(ids) for ids in tokenizer(sources)["input_ids"]]
    sorted_batches = token_batches(lengths, args.max_tokens)
    file_order_batches = [list(range(i, min(i + 32, len(sources)))) for i in range(0, len(sources), 32)]
    models = {"fp32": model, "bf16": load_translation_model(args.model, dtype="bfloat16")[0],
              "int8": load_translation_model(args.model, dtype="int8")[0]}
    systems: dict[str, Callable[[], list[str]]] = {}
    for short, m in models.items():
        systems[f"vaswani translate, {short}"] = lambda m=m: translate(
            m, tokenizer, sources, max_tokens=args.max_tokens, **HF_DECODING)
    systems["vaswani translate, fp32, one generate() per batch (no continuous batching)"] = lambda: translate(
        model, tokenizer, sources, max_tokens=args.max_tokens, continuous_batching=False, **HF_DECODING)
    layer_by_layer = pack_linear_layers(load_translation_model(args.model, fast_linears=False)[0])
    systems["vaswani translate, fp32, decoder layer by layer (no FusedDecoderLayer)"] = lambda: translate(
        layer_by_layer, tokenizer, sources, max_tokens=args.max_tokens, **HF_DECODING)
    systems["vaswani translate, fp32, paper decoding (GNMT)"] = lambda: translate(
        model, tokenizer, sources, max_tokens=args.max_tokens, **{**HF_DECODING, "length_penalty_type": "gnmt"})
    for short in ("fp32", "bf16"):
        marian = vaswani_to_marian(models[short])
        systems[f"MarianMTModel.generate, {short}, same sorted batches"] = lambda marian=marian: _marian_translate(
            marian, tokenizer, sources, sorted_batches)
        systems[f"MarianMTModel.generate, {short}, 32 sentences in file order"] = (
            lambda marian=marian: _marian_translate(marian, tokenizer, sources, file_order_batches))
    try:
        import ctranslate2
    except ImportError:
        print("ctranslate2 is not installed: skipping it (pip install vaswani[ct2])", file=sys.stderr)
        return systems
    supported = ctranslate2.get_supported_compute_types("cpu")
    for compute_type, short in (("float32", "fp32"), ("int8", "int8"), ("bfloat16", "bf16")):
        if compute_type not in supported:
            print(f"CTranslate2 {short}: no kernels for this CPU in CTranslate2's build", file=sys.stderr)
            continue
        translator = _ctranslate2_model(args.model, folder, compute_type, args.threads)
        systems[f"CTranslate2, {short}"] = lambda t=translator: _ct2_translate(t, tokenizer, sources, args.max_tokens)
    from vaswani.ct2 import translate_ctranslate2

    systems["vaswani translate --engine ctranslate2, fp32"] = lambda: translate_ctranslate2(
        folder / "ct2", sources, threads=args.threads, max_tokens=args.max_tokens,
        **{key: value for key, value in HF_DECODING.items() if key != "early_stopping"})
    return systems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="trained Vaswani model folder")
    add_data_argument(parser)
    parser.add_argument("--source", help="source sentences (default: test_2016_flickr.en.gz in --data)")
    parser.add_argument("--reference", help="reference translations (default: test_2016_flickr.de.gz in --data)")
    parser.add_argument("--limit", type=int, help="first N sentences only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="source tokens per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per system (median)")
    parser.add_argument("--skip", default="", help="comma-separated name fragments of systems to leave out")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    args.source = args.source or str(args.data / "test_2016_flickr.en.gz")
    args.reference = args.reference or str(args.data / "test_2016_flickr.de.gz")
    require_files(parser, args.source, args.reference)
    torch.set_num_threads(args.threads)
    allocator = "glibc, freed memory kept (tune_allocator)" if tune_allocator() else "the C library's defaults"
    sources, references = list(read_lines(args.source)), list(read_lines(args.reference))
    if args.limit:
        sources, references = sources[: args.limit], references[: args.limit]
    skip = [name.strip() for name in args.skip.split(",") if name.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        systems = {name: run for name, run in _systems(args, sources, Path(tmp)).items()
                   if not any(fragment in name for fragment in skip)}
        outputs, first, seconds = {}, {}, {name: [] for name in systems}
        for name, run in systems.items():
            outputs[name], first[name] = _timed(run)  # warm-up (CTranslate2 loads lazily), the translations scored
        for _ in range(args.repeats):
            for name, run in systems.items():
                seconds[name].append(_timed(run)[1])
    baseline = statistics.median(seconds["CTranslate2, fp32"]) if "CTranslate2, fp32" in seconds else None
    reference = outputs.get("vaswani translate, fp32")
    print(f"Date {datetime.date.today()}, {cpu_description()}; torch {torch.__version__}, {_ct2_version()}; "
          f"{args.threads} threads; {len(sources)} sentences, beam {BEAM}, max_tokens {args.max_tokens}, "
          f"median of {args.repeats} after a first pass; allocator: {allocator}; float32 products: "
          f"{product_backend()}; {args.model}\n")
    print("| system | sentences/s | × CTranslate2 fp32 | first pass, sentences/s | BLEU "
          "| lines identical to vaswani fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for name, hypotheses in outputs.items():
        median = statistics.median(seconds[name])
        same = None if reference is None else sum(a == b for a, b in zip(hypotheses, reference)) / len(sources)
        rows.append({"system": name, "sentences_per_s": len(sources) / median, "seconds": seconds[name],
                     "first_pass_sentences_per_s": len(sources) / first[name],
                     "vs_ctranslate2_fp32": None if baseline is None else baseline / median,
                     "bleu": bleu(hypotheses, references), "identical_to_vaswani_fp32": same})
        row = rows[-1]
        ratio = "" if baseline is None else f"{row['vs_ctranslate2_fp32']:.2f}x"
        print(f"| {name} | {row['sentences_per_s']:.1f} | {ratio} | {row['first_pass_sentences_per_s']:.1f} | "
              f"{row['bleu']:.2f} | "
              f"{'' if same is None else f'{same:.1%}'} |", flush=True)
    if args.json:
        report = {"cpu": cpu_description(), "threads": args.threads, "allocator": allocator,
                  "products": product_backend(), "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2))


def _ct2_version() -> str:
    try:
        import ctranslate2
    except ImportError:
        return "no CTranslate2"
    return f"CTranslate2 {ctranslate2.__version__}"
if __name__ == "__main__":
    main(sys.argv[1:])
