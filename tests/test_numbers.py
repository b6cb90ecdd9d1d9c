import pytest

from vaswani.training.numbers import (
    aligned_pair,
    make_number_corpus,
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
