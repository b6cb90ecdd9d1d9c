"""Memory and start-up time of `vaswani train --streaming` against the in-memory corpus path, and 2 processes vs 1.

    python benchmarks/streaming_memory.py [--sizes 1000000,4000000] [--first-update-pairs 2000000] [--workdir DIR]
                                          [--parts epoch,first-update,processes] [--preset base]

Number-word corpora (the demo's, gzip, one pair per line) of each size are written once; every measurement runs in
a fresh process and reports its peak resident memory (``ru_maxrss`` of the process, or of the largest process of a
launch) and seconds:

1. **a whole epoch streamed**: :class:`~vaswani.training.streaming.TokenBatchStream` reads, tokenizes and batches
   every pair of each corpus (sort buffers of 100,000 pairs, 4,096-token batches, transformers' collator); its peak
   memory must not grow with the corpus;
2. **time to the first update** on the ``--first-update-pairs`` corpus: ``vaswani train --max-steps 1`` of the tiny
   model with a given tokenizer, in memory (read into Arrow, tokenized with ``datasets.map``, then trained) and with
   ``--streaming``; and the in-memory path with 2 processes under ``accelerate launch`` (one process per machine
   tokenizes, the other loads its cache), each in a new datasets cache;
3. **2 processes vs 1** (DDP, and FSDP2 with sharded checkpoints, over gloo with the shipped
   configs/accelerate/ddp-cpu.yaml and fsdp2-cpu.yaml; ``OMP_NUM_THREADS`` = 2 / processes): target tokens per second
   of the ``--preset`` model (default ``base``, the paper's, whose weights and Adam state are large enough for
   sharding to show) over 20 streamed updates; the weights and Adam state a process holds (read off its
   checkpoint) and its peak memory.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from corpus_memory import write_corpus  # noqa: E402

EPOCH = """
import json, resource, sys, time
start = time.perf_counter()
from transformers import AutoTokenizer, DataCollatorForSeq2Seq
from vaswani.training.streaming import TokenBatchStream, stream_corpus
source, target, tokenizer = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(tokenizer)
stream = TokenBatchStream(stream_corpus({"source": source, "target": target}), tok, 4096,
                          collate_fn=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
batches = pairs = 0
for batch in stream:
    if batch["stream_position"]["epoch"] > 0:
        break
    batches, pairs = batches + 1, pairs + len(batch["input_ids"])
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"pairs": pairs, "batches": batches, "rss": rss, "seconds": time.perf_counter() - start}))
"""

TINY = ["--preset", "tiny", "--set", "d_model=64", "encoder_ffn_dim=128", "decoder_ffn_dim=128", "--max-tokens",
        "4096", "--warmup-steps", "10", "--no-progress", "--eval-steps", "0", "--report-to", "none"]


#: Runs a command and reports the peak resident memory of the largest process it started (each run gets its own
#: wrapper, so an earlier run's peak does not mask a later one's).
WRAP = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def _run(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    """Seconds and peak resident bytes of the largest process of ``command``."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", WRAP, *command], env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    peak = [line for line in result.stderr.splitlines() if line.startswith("PEAK ")][-1]
    return seconds, int(peak.split()[1]) * 1024


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def _launcher(processes: int, port: int, config: str = "ddp-cpu.yaml") -> list[str]:
    """One plain process, or ``accelerate launch`` of ``processes`` with a shipped config."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--num_processes", str(processes), "--main_process_port", str(port)]


def _state_per_process(checkpoint: Path) -> int:
    """Bytes of weights and Adam state the largest process holds, read off a checkpoint: a process's own shards
    under FSDP's sharded checkpoints, else the whole model and optimizer."""
    shards = [sum(f.stat().st_size for f in checkpoint.glob(f"*/__{rank}_*.distcp")) for rank in range(2)]
    if any(shards):
        return max(shards)
    return sum((checkpoint / name).stat().st_size for name in ("model.safetensors", "optimizer.pt"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,4000000", help="corpus sizes streamed for a whole epoch")
    parser.add_argument("--first-update-pairs", type=int, default=2_000_000, help="corpus of the start-up runs")
    parser.add_argument("--workdir", help="folder for the corpora and caches (default: a temporary one)")
    parser.add_argument("--parts", default="epoch,first-update,processes", help="which measurements to run")
    parser.add_argument("--preset", default="base", help="model of the 2-processes-vs-1 runs")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    from vaswani.perf import cpu_description
    from vaswani.tokenization import train_tokenizer

    sizes = [int(n) for n in args.sizes.split(",")]
    lines: list[str] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        wanted = {*(sizes if "epoch" in parts else []), args.first_update_pairs, 20_000}
        corpora = {n: write_corpus(work, n) for n in sorted(wanted)}
        small = corpora[20_000]
        texts = [line.rstrip("\n") for path in small for line in gzip.open(path, "rt", encoding="utf-8")]
        train_tokenizer(texts, vocab_size=1000, show_progress=False, output_dir=work / "tok")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VASWANI_TUNE_CPU": "0", "ACCELERATE_USE_CPU": "1"}

        if "epoch" in parts:
            lines += ["### A whole epoch streamed (read, tokenize, sort buffer, batch)", "",
                      "| pairs | batches | peak RSS MiB | seconds | pairs/s |", "|---:|---:|---:|---:|---:|"]
        for n in sizes if "epoch" in parts else []:
            out = subprocess.run([sys.executable, "-c", EPOCH, *map(str, corpora[n]), str(work / "tok")], env=env,
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            lines.append(f"| {r['pairs']:,} | {r['batches']:,} | {r['rss'] / 2**20:,.0f} | {r['seconds']:.1f} | "
                         f"{r['pairs'] / r['seconds']:,.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)

        source, target = corpora[args.first_update_pairs]
        if "first-update" in parts:
            lines += ["", f"### Time to the first update, {args.first_update_pairs:,} pairs (tiny model, given "
                      "tokenizer)", "", "| corpus path | processes | seconds | peak RSS MiB (largest process) |",
                      "|---|---:|---:|---:|"]
        runs = [("--streaming", 1, ["--streaming"]), ("in memory", 1, []), ("in memory", 2, [])]
        for name, processes, extra in runs if "first-update" in parts else []:
            run_env = {**env, "HF_DATASETS_CACHE": str(work / f"cache-{name}-{processes}"),
                       "OMP_NUM_THREADS": str(2 // processes)}
            command = [*_launcher(processes, 29561), "-m", "vaswani", "train", "--source", str(source), "--target",
                       str(target), "--tokenizer", str(work / "tok"), "--output", str(work / f"run-{processes}"),
                       "--overwrite", "--max-steps", "1", "--save-steps", "1", *TINY, *extra]
            seconds, peak = _run(command, run_env, work)
            lines.append(f"| {name} | {processes} | {seconds:.1f} | {peak / 2**20:,.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)

        if "processes" in parts:
            lines += ["", f"### 2 processes vs 1 ({args.preset} model, 20 streamed updates of 4,096-token batches)", "",
                      "| engine | processes | OMP threads each | target tokens/s | × 1 process | weights + Adam state "
                      "MiB per process | peak RSS MiB (largest process) |", "|---|---:|---:|---:|---:|---:|---:|"]
        rates = {}
        engines = [("one process", 1, ""), ("DDP", 2, "ddp-cpu.yaml"), ("FSDP2, sharded checkpoints", 2,
                                                                        "fsdp2-cpu.yaml")]
        for engine, processes, config in engines if "processes" in parts else []:
            run_env = {**env, "OMP_NUM_THREADS": str(2 // processes)}
            out_dir = work / f"train-{processes}-{config}"
            command = [*_launcher(processes, 29563, config), "-m", "vaswani", "train", "--source", str(source),
                       "--target", str(target), "--tokenizer", str(work / "tok"), "--output", str(out_dir),
                       "--overwrite", "--streaming", "--max-steps", "20", "--save-steps", "20", "--preset", args.preset,
                       "--max-tokens", "4096", "--warmup-steps", "10", "--no-progress", "--eval-steps", "0",
                       "--report-to", "none"]
            _, peak = _run(command, run_env, work)
            rates[engine] = json.loads((out_dir / "vaswani_run.json").read_text())["result"][
                "target_tokens_per_second"]
            lines.append(f"| {engine} | {processes} | {2 // processes} | {rates[engine]:,.0f} | "
                         f"{rates[engine] / rates['one process']:.2f}x | "
                         f"{_state_per_process(out_dir / 'checkpoint-20') / 2**20:,.0f} | {peak / 2**20:,.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    print(f"Date {datetime.date.today()}, {cpu_description()}; number-word pairs.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
