from collections import Counter

import pytest

from vaswani.demo.numbers import (
    ALWAYS_TRAINED,
    HELD_OUT_DIGITS,
    TYPED_NUMBERS,
    aligned_pair,
    balanced_number_splits,
    digit_count,
    make_number_corpus,
    number_pairs,
    number_to_english,
    number_to_german,
    write_parallel_corpus,
)

# Checked by hand against German and (American) English number spelling.
CASES = {
    0: ("zero", "null"),
    1: ("one", "eins"),
    6: ("six", "sechs"),
    7: ("seven", "sieben"),
    11: ("eleven", "elf"),
    12: ("twelve", "zwölf"),
    16: ("sixteen", "sechzehn"),
    17: ("seventeen", "siebzehn"),
    21: ("twenty-one", "einundzwanzig"),
    30: ("thirty", "dreißig"),
    60: ("sixty", "sechzig"),
    66: ("sixty-six", "sechsundsechzig"),
    70: ("seventy", "siebzig"),
    77: ("seventy-seven", "siebenundsiebzig"),
    100: ("one hundred", "einhundert"),
    101: ("one hundred one", "einhunderteins"),
    342: ("three hundred forty-two", "dreihundertzweiundvierzig"),
    1000: ("one thousand", "eintausend"),
    1001: ("one thousand one", "eintausendeins"),
    1205: ("one thousand two hundred five", "eintausendzweihundertfünf"),
    21000: ("twenty-one thousand", "einundzwanzigtausend"),
    101001: ("one hundred one thousand one", "einhunderteintausendeins"),
    700017: ("seven hundred thousand seventeen", "siebenhunderttausendsiebzehn"),
    999999: (
        "nine hundred ninety-nine thousand nine hundred ninety-nine",
        "neunhundertneunundneunzigtausendneunhundertneunundneunzig",
    ),
}


@pytest.mark.parametrize("n", sorted(CASES))
def test_known_numbers(n):
    assert (number_to_english(n), number_to_german(n)) == CASES[n]


def test_segmented_german_and_alignment_of_342():
    pair = aligned_pair(342)
    assert pair.english_words == ("three", "hundred", "forty", "two")
    assert pair.german_pieces == ("drei", "hundert", "zwei", "und", "vierzig")
    assert pair.alignment == ((0, 0), (1, 1), (2, 3), (3, 2), (4, 2))


@pytest.mark.parametrize(
    "n", [0, 1, 9, 21, 99, 100, 342, 1000, 10101, 123456, 999999] + list(range(0, 999999, 9973))
)
def test_alignment_covers_every_piece(n):
    pair = aligned_pair(n)
    assert "".join(pair.german_pieces) == pair.german
    assert pair.english.replace("-", " ").split() == list(pair.english_words)
    assert [g for g, _ in pair.alignment] == list(range(len(pair.german_pieces)))
    assert all(0 <= e < len(pair.english_words) for _, e in pair.alignment)
    assert {e for _, e in pair.alignment} == set(range(len(pair.english_words)))


def test_out_of_range():
    for bad in (-1, 1_000_000, 2.0, True):
        with pytest.raises(ValueError, match="0 … 999,999"):
            number_to_german(bad)


def test_corpus_disjoint_and_deterministic():
    corpus = make_number_corpus(200, 50, 50, seed=3, max_value=5000)
    assert [len(corpus[s]) for s in ("train", "validation", "test")] == [200, 50, 50]
    sources = [{en for en, _ in corpus[s]} for s in ("train", "validation", "test")]
    assert sum(len(s) for s in sources) == len(set.union(*sources)) == 300
    assert make_number_corpus(200, 50, 50, seed=3, max_value=5000) == corpus
    assert make_number_corpus(200, 50, 50, seed=4, max_value=5000) != corpus
    en, de = corpus["train"][0]
    assert number_to_german(next(n for n in range(5001) if number_to_english(n) == en)) == de


def test_corpus_too_large():
    assert len(make_number_corpus(5, 3, 2, max_value=9)["train"]) == 5  # all of 0..9
    with pytest.raises(ValueError, match="raise max_value"):
        make_number_corpus(5, 3, 3, max_value=9)


def test_write_parallel_corpus(tmp_path):
    corpus = make_number_corpus(4, 2, 1, seed=0, max_value=999)
    paths = write_parallel_corpus(corpus, tmp_path / "numbers")
    assert sorted(p.name for p in paths) == sorted(
        f"{s}.{lang}" for s in ("train", "validation", "test") for lang in ("en", "de")
    )
    for split, pairs in corpus.items():
        en = (tmp_path / "numbers" / f"{split}.en").read_text(encoding="utf-8").splitlines()
        de = (tmp_path / "numbers" / f"{split}.de").read_text(encoding="utf-8").splitlines()
        assert list(zip(en, de)) == pairs


def test_typed_numbers_are_the_fixed_list():
    assert TYPED_NUMBERS[:21] == tuple(range(21)) and TYPED_NUMBERS[-1] == 999_999
    for n in (30, 90, 100, 500, 1000, 8000, 80_000, 500_000, 900_000):
        assert n in TYPED_NUMBERS
    assert 342 not in TYPED_NUMBERS and 21 not in TYPED_NUMBERS and len(TYPED_NUMBERS) == 65


def test_digit_count():
    assert [digit_count(n) for n in (0, 9, 10, 99, 100, 999_999)] == [1, 1, 2, 2, 3, 6]


def test_balanced_splits_weigh_every_magnitude_and_stay_disjoint():
    splits = balanced_number_splits(6000, 40, 82, seed=5)
    train, valid, test = splits["train"], splits["validation"], splits["test"]
    assert (len(train), len(valid), len(test)) == (6000, 40, 82)
    assert ALWAYS_TRAINED <= set(train)
    assert not set(train) & (set(valid) | set(test)) and not set(valid) & set(test)
    assert len(set(valid)) == 40 and len(set(test)) == 82
    # Held out: the digit counts 3-6 equally (the remainder of 82 / 4 goes to the longest numbers).
    assert Counter(digit_count(n) for n in valid) == dict.fromkeys(HELD_OUT_DIGITS, 10)
    assert Counter(digit_count(n) for n in test) == {3: 20, 4: 20, 5: 21, 6: 21}
    # Trained on: each digit count about a sixth of the draws, round thousands far above a uniform draw's 0.1%.
    counts = Counter(digit_count(n) for n in train)
    assert all(800 < counts[d] < 1200 for d in range(1, 7)), counts
    long_draws = [n for n in train if n >= 10_000]
    assert 0.15 < sum(n % 1000 == 0 for n in long_draws) / len(long_draws) < 0.35
    assert balanced_number_splits(6000, 40, 82, seed=5) == splits
    assert balanced_number_splits(6000, 40, 82, seed=6) != splits


def test_balanced_splits_refuse_impossible_sizes():
    with pytest.raises(ValueError, match="at least"):
        balanced_number_splits(10, 4, 4)
    with pytest.raises(ValueError, match="held-out 3-digit numbers"):
        balanced_number_splits(1000, 2000, 2000)
    with pytest.raises(ValueError, match=">= 0"):
        balanced_number_splits(1000, -1, 4)


def test_number_pairs():
    assert number_pairs([42, 1001]) == [("forty-two", "zweiundvierzig"), ("one thousand one", "eintausendeins")]
