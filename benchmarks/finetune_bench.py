"""Fine-tuning figures (`vaswani train --init-from`): the weights come through, and starting from them helps.

(a) A model of the demo's shape (``tiny`` preset) trained on the number words 0 … 999 is fine-tuned on a shifted
    corpus (numbers up to 99,999). The loss of the first update equals the source model's loss on that batch
    (same weights, dropout off), and after N updates the fine-tuned model is compared with one trained from
    scratch for the same N updates (exact match and chrF on held-out shifted numbers, greedy decoding).
(b) A small random MarianMTModel saved with a real SentencePiece tokenizer (as the converter's tests build one) is
    fine-tuned on the test pairs: its translations change as training proceeds, and each checkpoint and the
    final folder load with ``AutoModelForSeq2SeqLM``.

Prints a Markdown report (and writes it to --report if given). Steps are small so that it runs in a few minutes
on a laptop CPU; raise them for a stronger contrast.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import FIXTURES, fixture_lines, save_small_marian  # noqa: E402

import vaswani.training.run as run  # noqa: E402
from vaswani import VaswaniForConditionalGeneration  # noqa: E402
from vaswani.demo.numbers import make_number_corpus, write_parallel_corpus  # noqa: E402
from vaswani.demo.run import exact_match, translate_lines  # noqa: E402
from vaswani.perf import cpu_description  # noqa: E402
from vaswani.training.data import train_tokenizer_from_corpus  # noqa: E402
from vaswani.training.metrics import chrf  # noqa: E402
from vaswani.training.run import TrainSettings, recipe_arguments, train  # noqa: E402

NO_DROPOUT = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}
#: The fine-tuning rate of (a): about where the source run's schedule ended (d_model^-0.5 · step^-0.5 at 800
#: updates for d_model 128), so fine-tuning continues at the pace the source model was trained with.
FINE_TUNING_RATE = 3e-3


class FirstBatch(run.VaswaniTrainer):
    """Keeps the first training batch and its loss, to recompute that loss with the source model."""

    first: tuple[dict, float] | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if FirstBatch.first is None:
            FirstBatch.first = ({k: v.detach().clone() for k, v in inputs.items()}, loss.item())
        return loss


def _files(folder: Path) -> dict[str, Path]:
    return {"source": folder / "train.en", "target": folder / "train.de"}


def _settings(output: Path, corpus: dict[str, Path], steps: int, **fields) -> TrainSettings:
    """``steps`` updates with one checkpoint at the end; ``fields`` are TrainSettings or training arguments."""
    recipe_fields = {f.name for f in dataclasses.fields(TrainSettings)}
    recipe = {k: v for k, v in fields.items() if k in recipe_fields}
    arguments = {"max_steps": steps, "save_steps": steps, "logging_steps": steps, "disable_tqdm": True, "seed": 0}
    arguments.update({k: v for k, v in fields.items() if k not in recipe_fields})
    return TrainSettings(args=recipe_arguments(output, **arguments), train_corpus=corpus, max_tokens=1200, **recipe)


def shifted_corpus(work: Path, source_steps: int, steps: int) -> list[str]:
    small = make_number_corpus(900, 0, 100, seed=1, max_value=999)
    shifted = make_number_corpus(3000, 0, 200, seed=2, max_value=99_999)
    write_parallel_corpus(small, work / "small")
    write_parallel_corpus(shifted, work / "shifted")
    # One vocabulary for both corpora (as a pretrained model's covers the words of the data it is tuned on): the
    # shift is in which numbers the model has seen, not in tokens it has never produced.
    train_tokenizer_from_corpus(**_files(work / "shifted"), vocab_size=600, output_dir=work / "tokenizer",
                                show_progress=False)
    train(_settings(work / "source", _files(work / "small"), source_steps, preset="tiny",
                    tokenizer=work / "tokenizer", warmup_steps=100))
    run.VaswaniTrainer = FirstBatch  # the fine-tuning run keeps its first batch
    try:
        train(_settings(work / "tuned", _files(work / "shifted"), steps, init_from=str(work / "source"),
                        config_overrides=NO_DROPOUT, lr_schedule="constant", learning_rate=FINE_TUNING_RATE,
                        warmup_steps=10))
    finally:
        run.VaswaniTrainer = FirstBatch.__mro__[1]
    batch, first_loss = FirstBatch.first
    source = VaswaniForConditionalGeneration.from_pretrained(work / "source", **NO_DROPOUT).train()
    with torch.no_grad():
        recomputed = source(**batch, smoothing=0.1).loss.item()
    train(_settings(work / "scratch", _files(work / "shifted"), steps, preset="tiny", warmup_steps=100,
                    tokenizer=work / "tokenizer"))
    sources, references = [en for en, _ in shifted["test"]], [de for _, de in shifted["test"]]
    rows = [
        "| | first-update loss | exact match | chrF |",
        "|---|---|---|---|",
        f"| source model on the first batch | {recomputed:.6f} | | |",
    ]
    own = translate_lines(work / "source", [en for en, _ in small["test"]], num_beams=1)
    own_references = [de for _, de in small["test"]]
    rows.append(f"| source on its own held-out numbers (0 … 999) | | {exact_match(own, own_references):.1%} | "
                f"{chrf(own, own_references):.1f} |")
    stages = [("source on the shifted numbers, no fine-tuning", "source"), (f"fine-tuned {steps} updates", "tuned"),
              (f"from scratch {steps} updates", "scratch")]
    for name, folder in stages:
        hypotheses = translate_lines(work / folder, sources, num_beams=1)
        loss = f"{first_loss:.6f}" if folder == "tuned" else ""
        rows.append(f"| {name} | {loss} | {exact_match(hypotheses, references):.1%} | "
                    f"{chrf(hypotheses, references):.1f} |")
    return [f"### (a) tiny preset: {source_steps} updates on 0 … 999, then {steps} on numbers up to 99,999", "",
            *rows, ""]


def marian(work: Path, steps: int) -> list[str]:
    folder = save_small_marian(work / "marian")
    every = max(steps // 2, 1)
    pairs = {"source": FIXTURES / "pairs.en", "target": FIXTURES / "pairs.de"}
    train(_settings(work / "marian_tuned", pairs, steps, init_from=str(folder), lr_schedule="inverse_sqrt",
                    learning_rate=1e-3, warmup_steps=5, save_steps=every))
    sources, references = fixture_lines("en")[:50], fixture_lines("de")[:50]
    checkpoints = range(every, steps + 1, every)
    stages = [("the Marian source, no update", folder)]
    stages += [(f"after {s} updates", work / "marian_tuned" / f"checkpoint-{s}") for s in checkpoints]
    rows = ["| model | class loaded | first translation | chrF (50 pairs) |", "|---|---|---|---|"]
    for name, path in stages:
        hypotheses = translate_lines(path, sources, num_beams=1, max_new_tokens=30)
        loaded = type(AutoModelForSeq2SeqLM.from_pretrained(path)).__name__
        rows.append(f"| {name} | {loaded} | {hypotheses[0][:50]!r} | {chrf(hypotheses, references):.1f} |")
    final = type(AutoModelForSeq2SeqLM.from_pretrained(work / "marian_tuned")).__name__
    return [f"### (b) small random MarianMTModel (SentencePiece vocabulary) fine-tuned {steps} updates", "", *rows,
            "", f"The final folder loads as {final} with its MarianTokenizer.", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source-steps", type=int, default=300, help="updates of the source model (default: 300)")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning and from-scratch updates (default: 100)")
    parser.add_argument("--marian-steps", type=int, default=40, help="updates of the Marian model (default: 40)")
    parser.add_argument("--report", type=Path, help="also write the report to this Markdown file (default: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lines = [f"CPU: {cpu_description()}; {torch.get_num_threads()} torch threads", "",
                 *shifted_corpus(work, args.source_steps, args.steps), *marian(work, args.marian_steps)]
    report = "\n".join(lines)
    print(report)
    if args.report:
        args.report.write_text(report + "\n")


if __name__ == "__main__":
    main()
