"""Training and beam-search throughput of VaswaniForConditionalGeneration against transformers' MarianMTModel.

Both models have the same shape and the same weights (the Marian model is ``vaswani_to_marian`` of the Vaswani
one: post-norm, ReLU, [sin | cos] positions, tied embeddings) and train the same parameters: the Vaswani model
has the paper's output layer without a bias (its default), and Marian adds its ``final_logits_bias``, a buffer
of zeros it never trains. They run in the same process, their repetitions interleaved (A B B A ...) so that
load on a shared machine hits both alike.
Printed: medians, the ratio Vaswani / Marian, the share of the matrix-multiply peak that training reaches
(the peak is measured in the same run, between the training repetitions), and peak tensor memory.

    python benchmarks/model_bench.py [--shapes small,base] [--precisions fp32,bf16] [--repeats 5] [--quick]

* Training step: ``zero_grad``, forward with ``labels`` (each model's own loss), backward, ``Adam.step``
  (fused CPU Adam, β 0.9/0.98). Batches of ``--train-batch`` sentences whose source and target lengths
  are drawn from ``--length`` ± 20%, padded, with an attention mask; throughput counts target tokens that
  are not padding. The Vaswani model is trained on every path a user meets (:data:`PATHS`): the plain
  ``model(**batch)`` that transformers' ``Trainer`` / ``Seq2SeqTrainer`` and hand-written loops call,
  ``VaswaniTrainer``'s call, and the plain call with ``config.training_logits=True`` (a loop that reads the
  logits); each on its own copy of the weights with its own optimizer.
* Generation: ``generate`` with 4 beams on ``--gen-batch`` sentences, exactly ``--new-tokens`` new tokens
  (``min_new_tokens = max_new_tokens``, so end-of-sentence never ends a beam early and both models produce
  the same lengths); throughput counts the tokens of the returned sequences (batch × new tokens). The
  script checks that both models return the same tokens.
* Precisions: fp32, and bf16 autocast (``torch.autocast("cpu", torch.bfloat16)``; weights stay fp32).
* Matrix-multiply peak: GFLOP/s of square fp32 / bf16 ``torch.matmul`` (n = 1024, 2048, 3072), the best
  size's median over probes taken between the training repetitions (also printed once from start-up). The
  training FLOPs are the real work, counted sentence by sentence on its own lengths, not on the padded batch
  (3 × forward: every linear layer, attention scores and weighted sums, the output projection), so padding a
  model computes anyway does not count as speed.
* Peak memory: the largest amount of tensor memory in use during one training step (parameters, Adam
  state, gradients, activations, temporaries) or one ``generate`` call (parameters, caches, activations), as
  torch's CPU allocator reports it to the profiler (``profile_memory=True``) in an extra, untimed call.
  Memory outside torch tensors (Python objects, oneDNN scratch buffers, what malloc keeps cached) is not in it.
* Allocator: by default the script calls :func:`vaswani.perf.tune_allocator` (glibc ``M_MMAP_MAX=0``, large
  ``M_TRIM_THRESHOLD``) at start-up, which affects both models alike; ``--allocator default`` leaves glibc's
  defaults. Denormal floats are flushed to zero (:func:`vaswani.perf.flush_denormals`, both models alike; what
  ``vaswani train`` does on a CPU) unless ``--denormals keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VASWANI_TUNE_CPU"] = "0"  # --allocator / --denormals decide, for both models alike

import torch  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from vaswani import VaswaniConfig, VaswaniForConditionalGeneration  # noqa: E402
from vaswani.convert import vaswani_to_marian  # noqa: E402
from vaswani.perf import cpu_description, flush_denormals, matmul_seconds, tune_allocator  # noqa: E402

#: Benchmark shapes: a configuration preset and the (shared) vocabulary size used with it.
SHAPES = {"small": ("small", 8000), "base": ("base", 37000)}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
MODELS = ("vaswani", "marian")
#: The Vaswani training calls measured, each against the same Marian step: name → (forward keyword arguments,
#: ``config.training_logits``, who calls it that way).
PATHS = {
    "plain": ({}, False, "model(**batch): transformers' Trainer / Seq2SeqTrainer, hand-written loops"),
    "VaswaniTrainer": ({"skip_logits": True}, False, "model(**batch, skip_logits=True): VaswaniTrainer"),
    "logits kept": ({}, True, "model(**batch) with config.training_logits=True: a loop that reads the logits"),
}


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int) -> float:
    """Median GFLOP/s of an n × n by n × n matrix product."""
    return 2 * n**3 / matmul_seconds(n, dtype, repeats) / 1e9


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...], repeats: int) -> tuple[float, int]:
    """(GFLOP/s, n): the best median over the square sizes tried."""
    return max((matmul_gflops(n, dtype, repeats), n) for n in sizes)


def _probe(probes: dict[int, list[float]], dtype: torch.dtype) -> None:
    for n, rates in probes.items():
        rates.append(matmul_gflops(n, dtype, 3))


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, repetitions interleaved A B, B A, A B, ... (drift hits all alike)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def peak_tensor_memory(fn: Callable[[], object]) -> int:
    """Bytes: the most tensor memory allocated during ``fn()`` beyond what was allocated before it, from the
    allocation events torch's CPU allocator reports to the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop lines and its notes about blocks allocated before it started."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def precision_context(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# Models, data, steps
# ----------------------------------------------------------------------------------------------------------


def build_models(shape: str, seed: int = 0):
    preset, vocab = SHAPES[shape]
    config = VaswaniConfig.from_preset(preset, vocab_size=vocab, sinusoid_layout="concatenated")
    torch.manual_seed(seed)
    vaswani = VaswaniForConditionalGeneration(config).eval()
    marian = vaswani_to_marian(vaswani).eval()
    return vaswani, marian


def random_batch(config: VaswaniConfig, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Source ids + mask and labels (-100 on padding) of ``batch`` pairs with lengths in ``length`` ± 20%."""
    g = torch.Generator().manual_seed(seed)
    low, high = max(2, round(length * 0.8)), max(2, round(length * 1.2))
    src_len = torch.randint(low, high + 1, (batch,), generator=g)
    tgt_len = torch.randint(low, high + 1, (batch,), generator=g)
    first = 4  # after <pad> <unk> <s> </s>
    src = torch.randint(first, config.vocab_size, (batch, int(src_len.max())), generator=g)
    tgt = torch.randint(first, config.decoder_vocab_size, (batch, int(tgt_len.max())), generator=g)
    src_mask = torch.arange(src.shape[1])[None, :] < src_len[:, None]
    tgt_mask = torch.arange(tgt.shape[1])[None, :] < tgt_len[:, None]
    src[torch.arange(batch), src_len - 1] = config.eos_token_id
    src = src.masked_fill(src_mask.logical_not(), config.pad_token_id)
    tgt[torch.arange(batch), tgt_len - 1] = config.eos_token_id
    labels = tgt.masked_fill(tgt_mask.logical_not(), -100)
    return {"input_ids": src, "attention_mask": src_mask.long(), "labels": labels}


def train_flops(config: VaswaniConfig, batch: dict[str, torch.Tensor]) -> float:
    """Matrix-multiply FLOPs of one training step (3 × forward: backward = 2 × forward), each sentence counted
    on its own source and target lengths: the real work, whatever padding an implementation computes."""
    s = batch["attention_mask"].sum(dim=1).double()
    t = (batch["labels"] != -100).sum(dim=1).double()
    d = config.d_model
    encoder = config.encoder_layers * (2 * s * (4 * d * d + 2 * d * config.encoder_ffn_dim) + 4 * s * s * d)
    decoder = config.decoder_layers * (
        2 * t * (6 * d * d + 2 * d * config.decoder_ffn_dim)  # self-attn Q K V O, cross Q O, FFN
        + 2 * s * 2 * d * d  # cross-attention K V of the encoder output
        + 4 * t * t * d  # self-attention scores and weighted sum
        + 4 * t * s * d  # cross-attention scores and weighted sum
    )
    output = 2 * t * d * config.decoder_vocab_size
    return 3.0 * float((encoder + decoder + output).sum())


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-9, fused=True)


def make_train_step(model, optimizer, batch, dtype, call: dict | None = None) -> Callable[[], float]:
    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with precision_context(dtype):
            loss = model(**batch, **(call or {})).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def generation_config(config: VaswaniConfig, new_tokens: int) -> GenerationConfig:
    return GenerationConfig(
        num_beams=4,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        early_stopping=True,
        length_penalty=1.0,
        do_sample=False,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
    )


def make_generate(model, inputs, gen_config, dtype) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode(), precision_context(dtype):
            return model.generate(**inputs, generation_config=copy.deepcopy(gen_config))

    return run


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------


def bench_shape(shape: str, args, peaks: dict[str, tuple[float, int]]) -> list[dict]:
    rows = []
    vaswani, marian = build_models(shape)
    config = vaswani.config
    models = {"vaswani": vaswani, "marian": marian}
    attn = {name: m.config._attn_implementation for name, m in models.items()}
    gen_inputs = random_batch(config, args.gen_batch, args.length, seed=1)
    gen_inputs.pop("labels")
    gen_config = generation_config(config, args.new_tokens)
    for precision in args.precisions:
        dtype = PRECISIONS[precision]
        row = {"shape": shape, "precision": precision, "attn": attn}

        # Beam search first, on the freshly converted (identical) weights.
        gens = {name: make_generate(m.eval(), gen_inputs, gen_config, dtype) for name, m in models.items()}
        outputs = {name: fn() for name, fn in gens.items()}
        same = outputs["vaswani"].shape == outputs["marian"].shape and bool(
            (outputs["vaswani"] == outputs["marian"]).all()
        )
        row["gen_identical"] = same
        row["gen_token_agreement"] = (
            float((outputs["vaswani"] == outputs["marian"]).float().mean())
            if outputs["vaswani"].shape == outputs["marian"].shape
            else 0.0
        )
        times = interleaved(gens, args.gen_repeats, warmup=0)
        generated = args.gen_batch * args.new_tokens
        row["gen_tok_s"] = {name: generated / statistics.median(ts) for name, ts in times.items()}
        row["gen_mem"] = {
            name: tensor_bytes(m.state_dict().values()) + peak_tensor_memory(gens[name]) for name, m in models.items()
        }

        # Training: Marian and the Vaswani model on each path, each on its own copy of the weights and optimizer.
        batch = random_batch(config, args.train_batch, args.length, seed=2)
        tokens = int((batch["labels"] != -100).sum())
        flops = train_flops(config, batch)
        steps, trainees, optimizers = {}, {}, {}
        for name, (model, call, logits) in _trainees(models).items():
            trainees[name] = copy.deepcopy(model).train()
            trainees[name].config.training_logits = logits
            optimizers[name] = make_optimizer(trainees[name])
            steps[name] = make_train_step(trainees[name], optimizers[name], batch, dtype, call)
            steps[name]()  # creates the Adam state
        peak_dtype = torch.float32 if dtype is None else dtype
        probes: dict[int, list[float]] = {n: [] for n in args.peak_sizes}
        fns = dict(steps)
        fns["matmul"] = functools.partial(_probe, probes, peak_dtype)
        times = interleaved(fns, args.train_repeats, warmup=1)
        row["train_tok_s"] = {name: tokens / statistics.median(times[name]) for name in steps}
        row["train_gflops"] = {name: flops / statistics.median(times[name]) / 1e9 for name in steps}
        row["peak_gflops"] = max(statistics.median(rates) for rates in probes.values())
        row["train_mem"] = {}
        for name in steps:
            state = [t for s in optimizers[name].state.values() for t in s.values() if t.dim()]
            row["train_mem"][name] = tensor_bytes(list(trainees[name].state_dict().values()) + state)
            row["train_mem"][name] += peak_tensor_memory(steps[name])
        row["train_tokens"] = tokens
        row["train_shape"] = (tuple(batch["input_ids"].shape), tuple(batch["labels"].shape))
        rows.append(row)
        print(summary_line(row), file=sys.stderr, flush=True)
        del trainees, optimizers, steps, fns
    return rows


def _trainees(models: dict) -> dict[str, tuple]:
    """Name → (model, forward keyword arguments, ``config.training_logits``): each Vaswani path, then Marian."""
    paths = {f"vaswani {path}": (models["vaswani"], call, logits) for path, (call, logits, _) in PATHS.items()}
    return {**paths, "marian": (models["marian"], {}, False)}


def summary_line(row: dict) -> str:
    t, g = row["train_tok_s"], row["gen_tok_s"]
    trained = ", ".join(
        f"{path} {t[f'vaswani {path}']:.0f} ({t[f'vaswani {path}'] / t['marian']:.2f}x)" for path in PATHS
    )
    return (
        f"[{row['shape']} {row['precision']}] train tok/s: Marian {t['marian']:.0f}, Vaswani {trained}; "
        f"gen {g['vaswani']:.0f} vs {g['marian']:.0f} tok/s "
        f"({g['vaswani'] / g['marian']:.2f}x), identical={row['gen_identical']}"
    )


def _padded(row: dict) -> int:
    rows, length = row["train_shape"][1]
    return rows * length


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def markdown(rows: list[dict], peaks: dict[str, tuple[float, int]], args, allocator: str) -> str:
    lines = [
        f"Date {datetime.date.today()}, {cpu_description()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; allocator: {allocator} (same for both models); "
        f"1-minute load average {args.load[0]:.1f} at the start, {args.load[1]:.1f} at the end.",
        "Matrix-multiply peak at start-up: "
        + ", ".join(f"{p} {g:,.0f} GFLOP/s (n={n})" for p, (g, n) in peaks.items())
        + "; '% of peak' uses the best size's median of probes taken between the training repetitions. "
        + "Attention implementation: "
        + ", ".join(sorted({f"{name} {impl}" for r in rows for name, impl in r["attn"].items()}))
        + ".",
        "",
        f"Training (forward + backward + Adam step), {args.train_batch} sentences of {args.length} ± 20% tokens "
        f"per side ({rows[0]['train_tokens']:,} target tokens, {_padded(rows[0]):,} with padding), "
        f"median of {args.train_repeats}. GFLOP/s count the real work (each sentence on its own lengths). "
        "Vaswani paths: "
        + "; ".join(f"**{path}** = {who}" for path, (_, _, who) in PATHS.items())
        + ".",
        "",
        "| shape | precision | path | Vaswani tgt tok/s | Marian tgt tok/s | ratio | Vaswani real GFLOP/s "
        "(% of matmul peak) | Marian real GFLOP/s (% of peak) | peak tensor MiB V / M |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t, f, p, m = r["train_tok_s"], r["train_gflops"], r["peak_gflops"], r["train_mem"]
        for path in PATHS:
            ours = f"vaswani {path}"
            lines.append(
                f"| {r['shape']} | {r['precision']} | {path} | {t[ours]:,.0f} | {t['marian']:,.0f} | "
                f"**{t[ours] / t['marian']:.2f}x** | {f[ours]:,.0f} ({f[ours] / p:.0%} of {p:,.0f}) | "
                f"{f['marian']:,.0f} ({f['marian'] / p:.0%}) | {mib(m[ours])} / {mib(m['marian'])} |"
            )
    lines += [
        "",
        f"Beam-4 generation, {args.gen_batch} sentences of {args.length} ± 20% tokens, exactly {args.new_tokens} "
        f"new tokens each, median of {args.gen_repeats}:",
        "",
        "| shape | precision | Vaswani tok/s | Marian tok/s | ratio | same tokens | peak tensor MiB V / M |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        g = r["gen_tok_s"]
        same = "yes" if r["gen_identical"] else f"no ({r['gen_token_agreement']:.1%} of positions agree)"
        lines.append(
            f"| {r['shape']} | {r['precision']} | {g['vaswani']:,.0f} | {g['marian']:,.0f} | "
            f"**{g['vaswani'] / g['marian']:.2f}x** | {same} | "
            f"{mib(r['gen_mem']['vaswani'])} / {mib(r['gen_mem']['marian'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", help="comma-separated: small (vocab 8000), base (37000); default both")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per model (medians reported)")
    parser.add_argument("--train-batch", type=int, default=96, help="sentences per training batch")
    parser.add_argument("--length", type=int, default=25, help="mean sentence length in tokens (± 20%%)")
    parser.add_argument("--gen-batch", type=int, default=16, help="sentences per generate call")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sentence")
    parser.add_argument("--allocator", choices=["tuned", "default"], default="tuned")
    parser.add_argument("--denormals", choices=["flush", "keep"], default="flush")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--quick", action="store_true", help="small shape only, fewer and smaller runs (< 1 min)")
    args = parser.parse_args(argv)
    shapes_given = args.shapes is not None
    args.shapes = [s for s in (args.shapes or "small,base").split(",") if s]
    args.precisions = [p for p in args.precisions.split(",") if p]
    for s in args.shapes:
        if s not in SHAPES:
            parser.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    for p in args.precisions:
        if p not in PRECISIONS:
            parser.error(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    if args.quick:
        args.shapes = args.shapes if shapes_given else ["small"]
        args.repeats = min(args.repeats, 3)
        args.train_batch = min(args.train_batch, 32)
        args.new_tokens = min(args.new_tokens, 16)
    args.train_repeats = args.gen_repeats = args.repeats
    args.peak_sizes = (1024, 2048) if args.quick else (1024, 2048, 3072)

    allocator = "glibc defaults"
    if args.allocator == "tuned":
        allocator = (
            "vaswani.perf.tune_allocator() (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)"
            if tune_allocator()
            else "glibc defaults (tune_allocator not available)"
        )
    if args.denormals == "flush":
        allocator += "; denormals flushed to zero" if flush_denormals() else "; denormals kept (no flush on this CPU)"
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()[0]

    peaks = {}
    for precision in args.precisions:
        dtype = PRECISIONS[precision] or torch.float32
        peaks[precision] = matmul_peak(dtype, args.peak_sizes, repeats=3 if args.quick else 5)
        print(f"matmul peak {precision}: {peaks[precision][0]:,.0f} GFLOP/s (n={peaks[precision][1]})", file=sys.stderr)

    rows = []
    for shape in args.shapes:
        rows += bench_shape(shape, args, peaks)
    args.load = (load_start, os.getloadavg()[0])
    print(markdown(rows, peaks, args, allocator))


if __name__ == "__main__":
    main()
