"""Memory and time of reading and tokenizing a large line-aligned corpus: Arrow streaming against Python lists.

    python benchmarks/corpus_memory.py [--pairs 1000000,4000000] [--workdir DIR]

Writes English→German number-word corpora of each size (gzip, one pair per line; the demo's number words, drawn
at random below a million), trains one small tokenizer on a sample, then in a fresh process per measurement reads
and tokenizes each corpus (``max_length`` 256) and prints its peak anonymous memory (``RssAnon`` sampled every
20 ms: what the process itself holds), its peak resident memory (``ru_maxrss``, which also counts the pages of
memory-mapped Arrow files it has read: page cache the kernel can drop) and seconds:

* **Arrow**: ``load_parallel_corpus`` on the files (streamed into an Arrow file in datasets' cache) and
  ``tokenize_corpus``, as ``vaswani train`` runs them; then the same again in a new process with that cache
  (what a second run, or the other processes of a machine, do);
* **lists**: the files read into Python lists (``read_parallel_files``) and put into an in-memory
  ``Dataset.from_dict``, then the same tokenization: how the corpus path worked before.

Each measurement has its own datasets cache folder, so only the second Arrow run finds a cache.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = """
import json, resource, sys, threading, time
start = time.perf_counter()
peak_anon = [0]
def sample_anonymous_memory():  # RssAnon: the process's own memory, not pages of memory-mapped Arrow files
    while True:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
        time.sleep(0.02)
threading.Thread(target=sample_anonymous_memory, daemon=True).start()
from transformers import AutoTokenizer
from vaswani.training.data import dataset_from_files, read_parallel_files, tokenize_corpus
source, target, tokenizer, path = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(tokenizer)
if path == "lists":
    from datasets import Dataset
    sources, targets, _ = read_parallel_files(source, target)
    pairs = Dataset.from_dict({"source": sources, "target": targets})
else:
    pairs, _ = dataset_from_files(source, target)
tokenized, report = tokenize_corpus(pairs, tok, max_length=256)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"pairs": report.pairs_out, "rss": rss, "anon": peak_anon[0], "seconds": time.perf_counter() - start}))
"""


def write_corpus(folder: Path, pairs: int, seed: int = 0) -> tuple[Path, Path]:
    from vaswani.demo.numbers import number_to_english, number_to_german

    rng = random.Random(seed)
    source, target = folder / f"train{pairs}.en.gz", folder / f"train{pairs}.de.gz"
    with gzip.open(source, "wt", encoding="utf-8", compresslevel=1) as en, gzip.open(
        target, "wt", encoding="utf-8", compresslevel=1
    ) as de:
        for _ in range(pairs):
            n = rng.randrange(1_000_000)
            en.write(number_to_english(n) + "\n")
            de.write(number_to_german(n) + "\n")
    return source, target


def measure(source: Path, target: Path, tokenizer: Path, path: str, cache: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "VASWANI_TUNE_CPU": "0"}
    args = [sys.executable, "-c", MEASURE, str(source), str(target), str(tokenizer), path]
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="1000000,4000000", help="comma-separated corpus sizes")
    parser.add_argument("--workdir", help="folder for the corpora and caches (default: a temporary one)")
    args = parser.parse_args(argv)
    from vaswani.perf import cpu_description
    from vaswani.tokenization import train_tokenizer

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        sizes = [int(n) for n in args.pairs.split(",")]
        corpora = {n: write_corpus(work, n) for n in sizes}
        first = corpora[sizes[0]]
        with gzip.open(first[0], "rt", encoding="utf-8") as en, gzip.open(first[1], "rt", encoding="utf-8") as de:
            lines = [line.rstrip("\n") for _, line in zip(range(20_000), en)]
            lines += [line.rstrip("\n") for _, line in zip(range(20_000), de)]
        train_tokenizer(lines, vocab_size=1000, show_progress=False, output_dir=work / "tok")
        rows = []
        for n, (source, target) in corpora.items():
            for path in ("lists", "arrow"):
                cache = work / f"cache-{path}-{n}"
                result = measure(source, target, work / "tok", path, cache)
                rows.append((n, path, "first run", result))
                print(rows[-1], file=sys.stderr, flush=True)
                if path == "arrow":
                    rows.append((n, path, "cached", measure(source, target, work / "tok", path, cache)))
                    print(rows[-1], file=sys.stderr, flush=True)
    print(f"Date {datetime.date.today()}, {cpu_description()}; number-word pairs, tokenized with max_length 256.\n")
    print("| pairs | corpus path | run | peak anonymous MiB | peak RSS MiB (with mapped files) | seconds |")
    print("|---:|---|---|---:|---:|---:|")
    for n, path, run, result in rows:
        print(
            f"| {n:,} | {path} | {run} | {result['anon'] / 2**20:,.0f} | {result['rss'] / 2**20:,.0f} | "
            f"{result['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
