"""Built-in demo corpus: English number words → German number words, generated, no download.

The task is small enough to train on a CPU and has the reordering that makes attention necessary: German
says the units before the tens ("zweiundvierzig", two-and-forty, for "forty-two").

Conventions:

* Range 0 … 999,999. 0 is "zero" / "null".
* English is American style without "and", tens and units hyphenated: 342 → "three hundred forty-two",
  101 → "one hundred one", 1205 → "one thousand two hundred five".
* German writes the whole number as one lower-case word. "eins" only when it is the last part of the
  number (1, 101, 1001 → "eins", "einhunderteins", "eintausendeins"); "ein" inside a compound
  ("einundzwanzig", "eintausend"). Hundreds and thousands always carry their multiplier: "einhundert",
  "eintausend" (both standard, Duden "[ein]hundert"), which mirrors English "one hundred".
* Alignment (``aligned_pair``): English words are the text split at spaces *and* hyphens
  ("forty-two" → "forty", "two"); German pieces are the morphemes of the German word in order
  ("drei", "hundert", "zwei", "und", "vierzig"). Each German piece aligns to exactly one English word;
  the linking "und" aligns to the tens word it joins. Teens ("dreizehn", "siebzehn") are one piece.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

MAX_VALUE = 999_999

#: Numbers people type, scored by the demo on every run: 0–20, the tens, the round hundreds, the round
#: thousands (1,000 … 9,000, 10,000 … 90,000, 100,000 … 900,000) and the largest number.
TYPED_NUMBERS: tuple[int, ...] = tuple(
    sorted(
        {*range(21), *range(30, 100, 10), *range(100, 1000, 100), *range(1000, 10_000, 1000)}
        | {*range(10_000, 100_000, 10_000), *range(100_000, 1_000_000, 100_000), MAX_VALUE}
    )
)

#: In the training split of :func:`make_balanced_number_corpus` every time: every number below 101 (so
#: numbers of one or two digits are never held out) and the typed numbers.
ALWAYS_TRAINED = frozenset(range(101)) | frozenset(TYPED_NUMBERS)

#: Digit counts of the held-out splits: one- and two-digit numbers are all in :data:`ALWAYS_TRAINED`.
HELD_OUT_DIGITS = (3, 4, 5, 6)

_EN_BELOW_20 = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
# German 1..19 as used inside a compound ("ein", not "eins").
_DE_BELOW_20 = (
    "null ein zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn fünfzehn "
    "sechzehn siebzehn achtzehn neunzehn"
).split()
_DE_TENS = "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split()


@dataclass(frozen=True)
class NumberPair:
    """One number in both languages with a German-piece → English-word alignment."""

    value: int
    english: str
    german: str
    english_words: tuple[str, ...]
    german_pieces: tuple[str, ...]
    alignment: tuple[tuple[int, int], ...]  # (german_piece_index, english_word_index), one per piece


class _Builder:
    """Accumulates English hyphen groups and German pieces aligned to English word indices."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.words: list[str] = []
        self.pieces: list[str] = []
        self.alignment: list[tuple[int, int]] = []

    def english(self, *hyphenated: str) -> list[int]:
        """Add one English token (several words joined by hyphens); return the word indices."""
        self.groups.append(list(hyphenated))
        start = len(self.words)
        self.words.extend(hyphenated)
        return list(range(start, len(self.words)))

    def german(self, piece: str, word_index: int) -> None:
        self.alignment.append((len(self.pieces), word_index))
        self.pieces.append(piece)

    def below_thousand(self, n: int, final: bool) -> None:
        """Add 1 <= n <= 999; ``final``: nothing follows it in German, so a last 1 is "eins"."""
        hundreds, rest = divmod(n, 100)
        if hundreds:
            (unit,) = self.english(_EN_BELOW_20[hundreds])
            (hundred,) = self.english("hundred")
            self.german(_DE_BELOW_20[hundreds], unit)
            self.german("hundert", hundred)
        if rest == 0:
            return
        if rest < 20:
            (word,) = self.english(_EN_BELOW_20[rest])
            self.german("eins" if rest == 1 and final else _DE_BELOW_20[rest], word)
            return
        tens, units = divmod(rest, 10)
        if units == 0:
            (word,) = self.english(_EN_TENS[tens])
            self.german(_DE_TENS[tens], word)
            return
        tens_word, unit_word = self.english(_EN_TENS[tens], _EN_BELOW_20[units])
        self.german(_DE_BELOW_20[units], unit_word)
        self.german("und", tens_word)
        self.german(_DE_TENS[tens], tens_word)


def aligned_pair(n: int) -> NumberPair:
    """English and German forms of ``n`` (0 … 999,999) with their word/morpheme alignment."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_VALUE:
        raise ValueError(f"number words are defined for integers 0 … {MAX_VALUE:,}, got {n!r}")
    b = _Builder()
    if n == 0:
        (word,) = b.english("zero")
        b.german("null", word)
    thousands, rest = divmod(n, 1000)
    if thousands:
        b.below_thousand(thousands, final=False)
        (word,) = b.english("thousand")
        b.german("tausend", word)
    if rest:
        b.below_thousand(rest, final=True)
    return NumberPair(
        value=n,
        english=" ".join("-".join(group) for group in b.groups),
        german="".join(b.pieces),
        english_words=tuple(b.words),
        german_pieces=tuple(b.pieces),
        alignment=tuple(b.alignment),
    )


def number_to_english(n: int) -> str:
    """American English number words: 342 → "three hundred forty-two"."""
    return aligned_pair(n).english


def number_to_german(n: int) -> str:
    """German number word: 342 → "dreihundertzweiundvierzig"."""
    return aligned_pair(n).german


def make_number_corpus(
    n_train: int, n_valid: int, n_test: int, seed: int = 0, max_value: int = MAX_VALUE
) -> dict[str, list[tuple[str, str]]]:
    """Splits ``train``/``validation``/``test`` of (English, German) pairs of distinct random numbers.

    Numbers are drawn without replacement, uniformly from 0 … ``max_value``, so no number is in two splits;
    the result depends only on the arguments.
    """
    if not 0 <= max_value <= MAX_VALUE:
        raise ValueError(f"max_value must be in 0 … {MAX_VALUE:,}, got {max_value}")
    sizes = {"train": n_train, "validation": n_valid, "test": n_test}
    if min(sizes.values()) < 0:
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    total = sum(sizes.values())
    if total > max_value + 1:
        raise ValueError(
            f"{total} distinct numbers requested but only {max_value + 1} exist in 0 … {max_value}; "
            "raise max_value or request fewer examples"
        )
    numbers = random.Random(seed).sample(range(max_value + 1), total)
    corpus: dict[str, list[tuple[str, str]]] = {}
    start = 0
    for split, size in sizes.items():
        corpus[split] = number_pairs(numbers[start : start + size])
        start += size
    return corpus


def digit_count(n: int) -> int:
    """Decimal digits of ``n`` (0 has one)."""
    return len(str(n))


def _with_digits(digits: int) -> range:
    return range(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def _draw_training_number(rng: random.Random, digits: int, round_share: float, excluded: set[int]) -> int:
    """A number of ``digits`` digits, uniform or (``round_share`` of the time, four digits or more) whole
    thousands, that is not ``excluded``; redrawn within the digit count so each count keeps its weight."""
    numbers = _with_digits(digits)
    while True:
        n = rng.randrange(numbers.start, numbers.stop)
        if digits >= 4 and rng.random() < round_share:
            n -= n % 1000
        if n not in excluded:
            return n


def balanced_number_splits(
    n_train: int, n_valid: int, n_test: int, seed: int = 0, round_share: float = 0.25
) -> dict[str, list[int]]:
    """Numbers of the splits ``train``/``validation``/``test`` in which every magnitude has real weight.

    A uniform draw from 0 … 999,999 is a six-digit number nine times in ten and below 1,000 once in a
    thousand, so a model trained and tested on it learns, and is scored on, six-digit numbers only.
    Here ``validation`` and ``test`` hold distinct numbers of 3–6 digits, as many of each digit count
    (remainders to the longer ones), drawn uniformly within the digit count and never from
    :data:`ALWAYS_TRAINED`. ``train`` holds :data:`ALWAYS_TRAINED` once each and ``n_train`` minus that many
    draws in which each digit count 1–6 is equally likely and the number uniform within it; ``round_share`` of
    the draws with four or more digits are rounded down to whole thousands ("eighty thousand"), a form a
    uniform draw almost never makes. Training draws repeat (there are only 900 three-digit numbers) but never
    hit a held-out number. The result depends only on the arguments.
    """
    if min(n_train, n_valid, n_test) < 0:
        raise ValueError(f"split sizes must be >= 0, got train {n_train}, validation {n_valid}, test {n_test}")
    if n_train < len(ALWAYS_TRAINED):
        raise ValueError(f"n_train must be at least {len(ALWAYS_TRAINED)} (the numbers always trained), got {n_train}")
    if not 0 <= round_share <= 1:
        raise ValueError(f"round_share must be in [0, 1], got {round_share}")
    rng = random.Random(seed)
    held_out: dict[str, list[int]] = {"validation": [], "test": []}
    for position, digits in enumerate(HELD_OUT_DIGITS):
        candidates = [n for n in _with_digits(digits) if n not in ALWAYS_TRAINED]
        quota = {
            split: size // len(HELD_OUT_DIGITS) + (position >= len(HELD_OUT_DIGITS) - size % len(HELD_OUT_DIGITS))
            for split, size in (("validation", n_valid), ("test", n_test))
        }
        if sum(quota.values()) > len(candidates):
            raise ValueError(f"{sum(quota.values())} held-out {digits}-digit numbers requested, only "
                             f"{len(candidates)} exist; request fewer validation/test numbers")
        drawn = rng.sample(candidates, sum(quota.values()))
        held_out["validation"] += drawn[: quota["validation"]]
        held_out["test"] += drawn[quota["validation"] :]
    excluded = set(held_out["validation"]) | set(held_out["test"])
    train = sorted(ALWAYS_TRAINED)
    while len(train) < n_train:
        train.append(_draw_training_number(rng, rng.randint(1, 6), round_share, excluded))
    rng.shuffle(train)
    for split in held_out.values():
        rng.shuffle(split)
    return {"train": train, **held_out}


def number_pairs(numbers: list[int]) -> list[tuple[str, str]]:
    """(English, German) pairs of ``numbers``."""
    return [(number_to_english(n), number_to_german(n)) for n in numbers]


def write_parallel_corpus(
    corpus: dict[str, list[tuple[str, str]]], out_dir: Path, src_lang: str = "en", tgt_lang: str = "de"
) -> list[Path]:
    """Write each split as line-aligned ``<split>.<src_lang>`` / ``<split>.<tgt_lang>`` UTF-8 files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, pairs in corpus.items():
        for lang, column in ((src_lang, 0), (tgt_lang, 1)):
            path = out_dir / f"{split}.{lang}"
            path.write_text("".join(pair[column] + "\n" for pair in pairs), encoding="utf-8")
            written.append(path)
    return written
