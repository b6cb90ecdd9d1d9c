"""``vaswani demo``: train a small Transformer to translate English number words into German, on a CPU.

German writes a number below a million as one word and says units before tens ("forty-two" →
"zweiundvierzig"), so the model has to learn a real re-ordering alignment, not a word-by-word copy.
The corpus is generated (:mod:`vaswani.demo.numbers`); nothing is downloaded. Every magnitude has weight
in training and in the scores (:func:`~vaswani.demo.numbers.balanced_number_splits`), and the same list of
numbers people type is scored on every run, so the headline figure is about what a user will try.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from ..perf import has_fast_bf16
from ..training.run import TrainSettings, recipe_arguments, train
from .numbers import TYPED_NUMBERS, balanced_number_splits, digit_count, number_pairs, write_parallel_corpus

#: Beam sizes the demo tries on its validation split before translating the test numbers with the best one,
#: as the paper chose its decoding settings on development data (§6.1). Beam 4 is the paper's; on this
#: task greedy decoding or beam 8 was often better (benchmarks/HISTORY.md).
DEMO_BEAMS = (1, 4, 8)

#: The numbers the guide (docs/guide.md) and the tour (docs/tour.md) translate and draw: the demo prints their
#: translations every run.
GUIDE_NUMBERS = (42, 342, 80_000, 342_567)

#: Time kept for scoring out of the demo's budget: choosing the beam on the validation numbers and translating
#: the test, typed and guide numbers, on a 2-core CPU (docs/guide.md, "The demo").
SCORING_MINUTES = 0.25


@dataclass
class DemoResult:
    model_dir: Path
    exact_match: float  # on the held-out test numbers
    test_sentences: int
    train_minutes: float
    total_minutes: float  # the whole demo: corpus, tokenizer, training and scoring
    steps: int
    examples: list[tuple[str, str, str]]  # (English, model output, reference): guide, typed, test numbers
    num_beams: int
    validation_exact_match: dict[int, float]
    test_by_digits: dict[int, float]  # exact match on the test numbers of each digit count
    typed_exact_match: float  # on TYPED_NUMBERS
    typed_misses: list[tuple[str, str, str]]


def translate_lines(
    model_dir: Path, sentences: list[str], batch_size: int = 128, device: str = "cpu", **generate_kwargs
) -> list[str]:
    """Translate with a saved model folder through the Auto classes (the way a user would)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).to(device).eval()
    outputs: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            batch = tokenizer(sentences[start : start + batch_size], return_tensors="pt", padding=True).to(device)
            generated = model.generate(**batch, **generate_kwargs)
            outputs += [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return outputs


def exact_match(hypotheses: list[str], references: list[str]) -> float:
    """Share of hypotheses equal to their reference."""
    return sum(h == r for h, r in zip(hypotheses, references)) / max(len(references), 1)


def _rows_exact_match(rows: list[tuple[str, str, str]]) -> float:
    """:func:`exact_match` of (source, hypothesis, reference) rows."""
    return exact_match([hypothesis for _, hypothesis, _ in rows], [reference for _, _, reference in rows])


def exact_match_by_digits(numbers: list[int], hypotheses: list[str], references: list[str]) -> dict[int, float]:
    """Exact match of each digit count of ``numbers`` (sorted by digit count)."""
    groups: dict[int, list[int]] = {}
    for position, n in enumerate(numbers):
        groups.setdefault(digit_count(n), []).append(position)
    return {
        digits: exact_match([hypotheses[i] for i in positions], [references[i] for i in positions])
        for digits, positions in sorted(groups.items())
    }


def choose_num_beams(
    model_dir: Path, pairs: list[tuple[str, str]], candidates: tuple[int, ...] = DEMO_BEAMS
) -> tuple[int, dict[int, float]]:
    """The beam size of ``candidates`` with the best exact match on ``pairs`` (ties: the smaller beam), and
    every candidate's score."""
    sources, references = [s for s, _ in pairs], [r for _, r in pairs]
    scores = {
        beams: exact_match(translate_lines(model_dir, sources, num_beams=beams), references) for beams in candidates
    }
    return max(candidates, key=lambda beams: (scores[beams], -beams)), scores


def run_demo(
    output_dir: Path = Path("outputs/demo"),
    minutes: float = 3.0,
    max_steps: int = 2500,
    train_pairs: int = 200000,  # mostly fresh numbers rather than many epochs over few (benchmarks/HISTORY.md)
    validation_pairs: int = 500,
    test_pairs: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Generate the corpus, train for ``max_steps`` updates, choose the beam size on the validation numbers,
    translate the held-out test, typed and guide numbers with it, report. ``minutes`` bounds the whole demo:
    training stops early where it would leave less than :data:`SCORING_MINUTES` for scoring."""
    if minutes <= SCORING_MINUTES:
        raise ValueError(f"--minutes must be above {SCORING_MINUTES} (the time scoring takes), got {minutes}")
    started = time.monotonic()
    numbers = balanced_number_splits(train_pairs, validation_pairs, test_pairs, seed=seed)
    corpus = {split: number_pairs(values) for split, values in numbers.items()}
    data_dir = output_dir / "data"
    write_parallel_corpus(corpus, data_dir)
    files = {split: {"source": data_dir / f"{split}.en", "target": data_dir / f"{split}.de"} for split in corpus}
    settings = TrainSettings(
        args=recipe_arguments(
            output_dir / "model",
            max_steps=max_steps,
            warmup_steps=300,
            learning_rate=0.8,  # the paper's rate times 0.8: near the edge of stability here (benchmarks/HISTORY.md)
            save_steps=200,  # the last 5 checkpoints (800 updates) are averaged into the final model (§6.1)
            save_total_limit=5,
            logging_steps=100,
            bf16=has_fast_bf16(),  # more updates in the time where bf16 products are native; fp32 scores the same
            seed=seed,
            disable_tqdm=not progress,
        ),
        train_corpus=files["train"],
        valid_corpus=None,
        preset="tiny",
        config_overrides={"dropout": 0.2},  # chosen among 0, 0.1, 0.2 and 0.3 (benchmarks/HISTORY.md)
        vocab_size=600,
        tokenizer_pairs=50000,  # a few dozen distinct words: a sample learns the same merges in a fraction of the time
        max_tokens=1200,
        max_minutes=minutes - SCORING_MINUTES - (time.monotonic() - started) / 60,
        average_last=5,
        overwrite=True,
    )
    start = time.monotonic()
    result = train(settings)
    train_minutes = (time.monotonic() - start) / 60
    num_beams, validation_scores = choose_num_beams(settings.output_dir, corpus["validation"])
    pairs = corpus["test"] + number_pairs(list(TYPED_NUMBERS)) + number_pairs(list(GUIDE_NUMBERS))
    sources, references = [en for en, _ in pairs], [de for _, de in pairs]
    hypotheses = translate_lines(settings.output_dir, sources, num_beams=num_beams)
    rows = list(zip(sources, hypotheses, references))
    tested, typed_end = len(corpus["test"]), len(corpus["test"]) + len(TYPED_NUMBERS)
    test_rows, typed_rows, guide_rows = rows[:tested], rows[tested:typed_end], rows[typed_end:]
    return DemoResult(
        model_dir=settings.output_dir,
        exact_match=_rows_exact_match(test_rows),
        test_sentences=tested,
        train_minutes=train_minutes,
        total_minutes=(time.monotonic() - started) / 60,
        steps=result.steps,
        examples=guide_rows + typed_rows[::16] + test_rows[:3],
        num_beams=num_beams,
        validation_exact_match=validation_scores,
        test_by_digits=exact_match_by_digits(numbers["test"], hypotheses[:tested], references[:tested]),
        typed_exact_match=_rows_exact_match(typed_rows),
        typed_misses=[row for row in typed_rows if row[1] != row[2]],
    )


def print_demo(result: DemoResult, shown: int = 12) -> None:
    print()
    print("| English | model output | reference | |")
    print("|---|---|---|---|")
    for source, hypothesis, reference in result.examples[:shown]:
        print(f"| {source} | {hypothesis} | {reference} | {'✓' if hypothesis == reference else '✗'} |")
    print()
    by_digits = ", ".join(f"{digits} digits {score:.1%}" for digits, score in result.test_by_digits.items())
    print(f"exact match on the held-out numbers by length: {by_digits}")
    print(
        f"exact match on {len(TYPED_NUMBERS)} numbers people type (0-20, tens, round hundreds and thousands, "
        f"999,999): {result.typed_exact_match:.1%}"
    )
    for source, hypothesis, reference in result.typed_misses:
        print(f"  missed: {source} → {hypothesis} (should be {reference})")
    tried = ", ".join(f"{beams}: {score:.1%}" for beams, score in result.validation_exact_match.items())
    print(f"beam size chosen on the validation numbers: {result.num_beams} (exact match there with beam {tried})")
    print(
        f"exact match on {result.test_sentences} held-out numbers: {result.exact_match:.1%} "
        f"(beam {result.num_beams}; trained {result.steps} steps in {result.train_minutes:.1f} min, "
        f"{result.total_minutes:.1f} min in all)"
    )
    print(f"model folder: {result.model_dir} (training curves: {result.model_dir / 'training_curves.png'})")
