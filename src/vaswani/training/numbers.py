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
        corpus[split] = [(number_to_english(n), number_to_german(n)) for n in numbers[start : start + size]]
        start += size
    return corpus


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
