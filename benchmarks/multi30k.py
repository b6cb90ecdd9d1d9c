"""Train from scratch on Multi30k and score test_2016_flickr with sacreBLEU (cased, detokenized, 13a).

    python benchmarks/multi30k.py --target de --minutes 60 --output outputs/multi30k-en-de

Prints a Markdown row: BLEU (cased and lower-cased), training minutes, target tokens/s, parameters, machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from multi30k_data import add_data_argument, require_files

from vaswani.demo.run import translate_lines
from vaswani.training.data import read_lines
from vaswani.training.metrics import bleu
from vaswani.training.run import TrainSettings, recipe_arguments, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--target", choices=["de", "fr"], default="de")
    parser.add_argument("--minutes", type=float, default=60.0, help="training time budget")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--preset", default="multi30k", help="model preset (multi30k, multi30k-tiny, small, ...)")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--warmup-steps", type=int, default=1000)
    parser.add_argument("--lr-scale", type=float, default=1.5)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after N updates (--minutes caps)")
    parser.add_argument(
        "--cooldown-steps",
        type=int,
        default=0,
        help="linear decay to zero over the last N updates (of --max-steps, else of those that fit in --minutes)",
    )
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--average-last", type=int, default=5)
    parser.add_argument("--save-steps", type=int, default=400)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--beams", type=int, default=4)
    args = parser.parse_args()
    output = args.output or Path(f"outputs/multi30k-en-{args.target}")

    def files(split: str) -> dict[str, Path]:
        return {"source": args.data / f"{split}.en.gz", "target": args.data / f"{split}.{args.target}.gz"}

    require_files(parser, *(path for split in ("train", "test_2016_flickr") for path in files(split).values()))

    settings = TrainSettings(
        args=recipe_arguments(
            output,
            num_train_epochs=1000,
            max_steps=args.max_steps,
            warmup_steps=args.warmup_steps,
            learning_rate=args.lr_scale,
            save_steps=args.save_steps,
            save_total_limit=args.average_last,
            logging_steps=100,
            bf16=args.bf16,
            disable_tqdm=True,
        ),
        train_corpus=files("train"),
        preset=args.preset,
        vocab_size=args.vocab_size,
        max_tokens=args.max_tokens,
        cooldown_steps=args.cooldown_steps,
        max_minutes=args.minutes,
        average_last=args.average_last,
        overwrite=True,
    )
    start = time.monotonic()
    result = train(settings)
    minutes = (time.monotonic() - start) / 60
    sources = list(read_lines(files("test_2016_flickr")["source"]))
    references = list(read_lines(files("test_2016_flickr")["target"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    begin = time.monotonic()
    hypotheses = translate_lines(output, sources, num_beams=args.beams, device=device)
    decode_seconds = time.monotonic() - begin
    cased, lower = bleu(hypotheses, references), bleu(hypotheses, references, lowercase=True)
    (output / "test_2016_flickr.hyp").write_text("\n".join(hypotheses) + "\n")
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'CPU'}, 2 threads"
    row = {
        "direction": f"en→{args.target}",
        "bleu": round(cased, 2),
        "bleu_lowercase": round(lower, 2),
        "train_minutes": round(minutes, 1),
        "steps": result.steps,
        "target_tokens_per_second": round(result.target_tokens_per_second),
        "parameters": result.parameters,
        "preset": args.preset,
        "recipe": f"warmup {args.warmup_steps}, lr x{args.lr_scale}, {args.max_tokens} tokens/update, "
        f"average last {args.average_last} (every {args.save_steps}), beam {args.beams}"
        + (f", cool-down {args.cooldown_steps}" if args.cooldown_steps else ""),
        "decode_seconds_beam": round(decode_seconds, 1),
        "machine": machine,
        "precision": "bf16" if args.bf16 else "fp32",
    }
    (output / "multi30k_result.json").write_text(json.dumps(row, indent=2))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
