"""An ONNX export against the PyTorch model it came from: greedy tokens line by line, logits, and speed.

    python benchmarks/onnx_check.py MODEL_DIR SOURCE_FILE [--batch 64] [--max-new-tokens 64] [--threads 2]

Exports MODEL_DIR with ``vaswani export onnx`` into a temporary folder, then decodes every line of SOURCE_FILE
greedily in batches (file order) with ``model.generate(num_beams=1)`` and with ONNX Runtime on the exported graphs
(:class:`vaswani.onnx_export.OnnxGreedyTranslator`), in one process, and prints the share of identical lines, the
largest logit difference on each batch's first tokens, and sentences/s of each (the ONNX decoder recomputes the
whole prefix each step, having no cache inputs). The CPU model is printed with the result.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from vaswani.modeling import VaswaniForConditionalGeneration  # noqa: E402
from vaswani.onnx_export import OnnxGreedyTranslator, export_onnx  # noqa: E402
from vaswani.perf import cpu_description  # noqa: E402
from vaswani.training.data import read_lines  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="Vaswani model folder with its tokenizer")
    parser.add_argument("source", help="text file, one sentence per line (plain or .gz)")
    parser.add_argument("--batch", type=int, default=64, help="sentences per batch")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated at most per sentence")
    parser.add_argument("--threads", type=int, default=2, help="threads of torch and of ONNX Runtime")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = list(read_lines(args.source))
    model = VaswaniForConditionalGeneration.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as folder:
        exported = Path(folder) / "onnx"
        export_onnx(args.model, exported)
        onnx = OnnxGreedyTranslator(exported, threads=args.threads)
        same, worst, seconds = 0, 0.0, {"torch": 0.0, "onnx": 0.0}
        for start in range(0, len(lines), args.batch):
            batch = tokenizer(lines[start : start + args.batch], padding=True, return_tensors="pt")
            ids, mask = batch["input_ids"], batch["attention_mask"]
            began = time.perf_counter()
            with torch.inference_mode():
                expected = model.generate(**batch, num_beams=1, max_new_tokens=args.max_new_tokens)
            seconds["torch"] += time.perf_counter() - began
            began = time.perf_counter()
            got = onnx.generate(ids.numpy(), mask.numpy(), args.max_new_tokens)
            seconds["onnx"] += time.perf_counter() - began
            texts = [tokenizer.batch_decode(t, skip_special_tokens=True) for t in (expected, torch.from_numpy(got))]
            same += sum(a == b for a, b in zip(*texts, strict=True))
            prefix = expected[:, :4]
            with torch.inference_mode():
                logits = model(**batch, decoder_input_ids=prefix).logits
            onnx_logits = torch.from_numpy(onnx.logits(ids.numpy(), mask.numpy(), prefix.numpy()))
            worst = max(worst, float((onnx_logits - logits).abs().max()))
    print(f"Date {datetime.date.today()}, {cpu_description()}, {args.threads} threads, torch {torch.__version__}")
    print(f"{args.model} on {args.source}: {len(lines):,} lines, greedy, batches of {args.batch} in file order\n")
    print("| measure | value |\n|---|---:|")
    print(f"| identical lines, ONNX Runtime vs PyTorch | {same:,} of {len(lines):,} ({same / len(lines):.1%}) |")
    print(f"| largest logit difference (first 4 target positions) | {worst:.2e} |")
    for name, spent in seconds.items():
        print(f"| sentences/s, {name} | {len(lines) / spent:,.1f} |")


if __name__ == "__main__":
    main()
