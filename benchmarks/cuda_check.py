"""The CUDA path, checked and timed on a trained model: what a user meets on a GPU. Prints Markdown.

    python benchmarks/cuda_check.py outputs/multi30k-en-de --data multi30k > benchmarks/results/cuda_check.md

1. Correctness in float32 (TF32 off), on Multi30k val sentences and sentences a person would type: the GPU
   against the CPU, ``vaswani.translate`` against the stock ``generate``, cached against uncached decoding,
   eager against SDPA and flex attention, a padded batch against each sentence alone, ``pipeline("translation")``
   against ``translate``, bfloat16 against float32.
2. Beam-4 decoding of test_2016_flickr: ``translate`` (continuous batching) against one stock ``generate`` per
   batch, float32 and bfloat16, sentences/s (median of 3) and BLEU.
3. Training steps of the base model on random batches, eager / SDPA / flex attention, bf16 / fp16 autocast.

``--device cpu --limit 8 --test-limit 40 --preset tiny`` runs every check on the CPU, to try the script without a
GPU (tests/test_benchmarks.py does, on a tiny model).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import sacrebleu
import torch
import transformers
from multi30k_data import add_data_argument, require_files
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from vaswani import VaswaniConfig, VaswaniForConditionalGeneration
from vaswani.perf import cpu_description
from vaswani.training.data import read_lines
from vaswani.translate import load_translation_model, translate

#: What a person types, not Multi30k's picture captions.
TYPED = [
    "Hello, how are you?",
    "I would like a cup of coffee, please.",
    "Where is the train station?",
    "The weather is nice today.",
    "My sister works in a hospital in Berlin.",
    "Can you help me carry this box?",
    "We are going to the beach tomorrow morning.",
    "This book is very interesting.",
    "two dogs",
    "A woman in a red dress is reading a newspaper on a bench next to the old church.",
]
PAPER_BEAM = {"num_beams": 4}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str, repeats: int = 3) -> tuple[float, object]:
    """Median wall time of ``fn`` after one warm-up call, and what the warm-up call returned."""
    first = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), first


def same_lines(one: list[str], two: list[str]) -> str:
    return f"{sum(a == b for a, b in zip(one, two, strict=True))}/{len(one)} lines identical"


def stock_model(folder: Path, device: str, attention: str = "sdpa", dtype=torch.float32):
    """The model as ``AutoModelForSeq2SeqLM`` gives it, with no vaswani speed machinery."""
    return AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=dtype, attn_implementation=attention).to(device).eval()


def stock_translate(model, tokenizer, sentences: list[str], batch_size: int = 64, **kwargs) -> list[str]:
    """One stock ``generate`` per padded batch, in input order."""
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            batch = tokenizer(sentences[start : start + batch_size], return_tensors="pt", padding=True)
            generated = model.generate(**batch.to(model.device), **kwargs)
            outputs += [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return outputs


def max_logit_difference(one, two, tokenizer, sentences: list[str]) -> float:
    """Largest |Δ| between two models' logits on a padded batch, teacher-forced on the first's greedy output."""
    batch = tokenizer(sentences, return_tensors="pt", padding=True)
    with torch.inference_mode():
        targets = one.generate(**batch.to(one.device), num_beams=1, max_new_tokens=20)
        logits = [
            model(**batch.to(model.device), decoder_input_ids=targets.to(model.device)).logits.float().cpu()
            for model in (one, two)
        ]
    return (logits[0] - logits[1]).abs().max().item()


def correctness(folder: Path, sentences: list[str], device: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"## Correctness: float32, TF32 off, {len(sentences) - len(TYPED)} val sentences + {len(TYPED)} typed\n")
    print("| check | result |\n|---|---|")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ours, _ = load_translation_model(folder, device=device)
    on_device = translate(ours, tokenizer, sentences, **PAPER_BEAM)
    cpu_model, _ = load_translation_model(folder, device="cpu")
    on_cpu = translate(cpu_model, tokenizer, sentences, **PAPER_BEAM)
    stock = stock_model(folder, device)
    cpu_stock = stock_model(folder, "cpu")
    print(f"| {device} vs CPU, `translate`, beam 4 | {same_lines(on_device, on_cpu)}; logits max abs difference "
          f"{max_logit_difference(stock, cpu_stock, tokenizer, sentences[:32]):.2e} |")
    generated = stock_translate(stock, tokenizer, sentences, **PAPER_BEAM)  # cached, as generate() is by default
    greedy = stock_translate(stock, tokenizer, sentences, num_beams=1)
    print(f"| stock `generate` vs `translate`, beam 4 | {same_lines(generated, on_device)} |")
    for name, cached, kwargs in (("greedy", greedy, {"num_beams": 1}), ("beam 4", generated, PAPER_BEAM)):
        uncached = stock_translate(stock, tokenizer, sentences, use_cache=False, **kwargs)
        print(f"| cached vs uncached, {name} | {same_lines(cached, uncached)} |")
    alone = stock_translate(stock, tokenizer, sentences[:64], batch_size=1, num_beams=1)
    # the first batch of 64 of ``greedy`` is these 64 sentences, padded together
    print(f"| a padded batch of 64 vs one sentence at a time, greedy | {same_lines(greedy[:64], alone)} |")
    for attention in ("eager", "flex_attention"):
        try:
            other = stock_model(folder, device, attention)
            lines = stock_translate(other, tokenizer, sentences, **PAPER_BEAM)
            difference = max_logit_difference(stock, other, tokenizer, sentences[:32])
            print(f"| {attention} vs sdpa, beam 4 | {same_lines(lines, generated)}; logits max abs difference "
                  f"{difference:.2e} |")
        except Exception as err:  # a survey of what works: report and go on
            print(f"| {attention} vs sdpa | failed: {str(err).splitlines()[0][:100]} |")
    from transformers import pipeline

    translator = pipeline("translation", model=stock, tokenizer=tokenizer)  # the model object: no remote code
    piped = [out[0]["translation_text"].strip() for out in translator(TYPED, batch_size=16)]
    typed = on_device[-len(TYPED):]
    print(f"| `pipeline(\"translation\")` vs `translate`, typed | {same_lines(piped, typed)} |")
    half, _ = load_translation_model(folder, device=device, dtype="bfloat16")
    in_bf16 = translate(half, tokenizer, sentences, **PAPER_BEAM)
    print(f"| bfloat16 vs float32, `translate`, beam 4 | {same_lines(in_bf16, on_device)} |")
    print(f"\nThe typed sentences on {device} (beam 4):\n")
    for source, target in zip(TYPED, typed, strict=True):
        print(f"- {source} → {target}")
    print()


def decoding_speed(folder: Path, sources: list[str], references: list[str], device: str) -> None:
    print(f"## Beam-4 decoding of {len(sources)} test_2016_flickr sentences (median of 3)\n")
    print("| path | dtype | sentences/s | vs stock generate | BLEU |\n|---|---|---:|---:|---:|")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        stock = stock_model(folder, device, dtype=torch_dtype)
        ours, _ = load_translation_model(folder, device=device, dtype=dtype)
        paths: dict[str, Callable[[], list[str]]] = {
            "stock `generate`, batches of 64": lambda model=stock: stock_translate(
                model, tokenizer, sources, **PAPER_BEAM
            ),
            "`translate`, 2,048 tokens a batch": lambda model=ours: translate(model, tokenizer, sources, **PAPER_BEAM),
            "`translate`, 8,192 tokens a batch": lambda model=ours: translate(
                model, tokenizer, sources, max_tokens=8192, **PAPER_BEAM
            ),
        }
        baseline = None
        for name, run in paths.items():
            with torch.inference_mode():
                seconds, hypotheses = median_seconds(run, device)
            score = sacrebleu.corpus_bleu(hypotheses, [references]).score
            rate = len(sources) / seconds
            baseline = baseline or rate
            print(f"| {name} | {dtype} | {rate:,.0f} | {rate / baseline:.2f}x | {score:.2f} |")
    print()


def train_step_row(model, ids, labels, attention: str, dtype: torch.dtype, device: str) -> str:
    """One mixed-precision Adam step (GradScaler for fp16), timed; a table row."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)

    def step():
        with torch.autocast(device.split(":")[0], dtype=dtype):
            loss = model(input_ids=ids, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    name = str(dtype).removeprefix("torch.")
    try:
        loss = step().item()
        seconds = median_seconds(step, device, repeats=10)[0]
    except Exception as err:  # a survey of what works: report and go on
        return f"| {attention} | {name} | failed: {str(err).splitlines()[0][:90]} |"
    return f"| {attention} | {name} | loss {loss:.3f}, {labels.numel() / seconds:,.0f} target tokens/s |"


def training_steps(device: str, batch: int, preset: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    config = VaswaniConfig.from_preset(preset, vocab_size=8000)
    ids = torch.randint(4, 8000, (batch, 32), device=device)
    labels = torch.randint(4, 8000, (batch, 32), device=device)
    print(f"## Training steps: {preset} model, vocabulary 8,000, batch {batch}x32, Adam, autocast (median of 10)\n")
    print("| attention | autocast | result |\n|---|---|---|")
    for attention in ("eager", "sdpa", "flex_attention"):
        model = VaswaniForConditionalGeneration(config).to(device).train()
        model.set_attn_implementation(attention)
        for dtype in (torch.bfloat16, torch.float16):
            print(train_step_row(model, ids, labels, attention, dtype, device))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a trained en→de model folder")
    add_data_argument(parser)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int, default=300, help="val sentences for the correctness checks")
    parser.add_argument("--test-limit", type=int, default=None, help="test sentences to decode (default: all)")
    parser.add_argument("--batch", type=int, default=128, help="rows of the training-step batches")
    parser.add_argument("--preset", default="base", help="the model shape of the training steps")
    args = parser.parse_args()
    files = [args.data / f"{split}.{lang}.gz" for split in ("val", "test_2016_flickr") for lang in ("en", "de")]
    require_files(parser, *files)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"Date {datetime.date.today()}; device: {name}; host CPU: {cpu_description()}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}\n")
    val = list(read_lines(files[0]))[: args.limit]
    sources, references = (list(read_lines(file))[: args.test_limit] for file in files[2:])
    correctness(args.model, val + TYPED, args.device)
    decoding_speed(args.model, sources, references, args.device)
    training_steps(args.device, args.batch, args.preset)
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
