"""Parallel-corpus loading, tokenizing and statistics, including every kind of bad input."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import FIXTURES, MULTI30K, fixture_lines, needs_multi30k

from vaswani.tokenization import VaswaniTokenizerFast, train_tokenizer
from vaswani.training.data import (
    corpus_statistics,
    dataset_from_files,
    load_parallel_corpus,
    read_parallel_files,
    sequence_lengths,
    tokenize_corpus,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
datasets.disable_progress_bars()

EN = ["A dog runs.", "Two men talk.", "", "A girl sings a very long song about the sea and the sky.", "Cats."]
DE = ["Ein Hund rennt.", "Zwei Männer reden.", "Leer.", "Ein Mädchen singt ein sehr langes Lied.", "Katzen."]


def _write(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def tok() -> VaswaniTokenizerFast:
    return train_tokenizer(EN + DE, vocab_size=300, min_frequency=1, show_progress=False)


@pytest.mark.parametrize("gz", [False, True])
def test_reads_plain_and_gzipped_files_and_drops_empty_pairs(tmp_path: Path, gz: bool) -> None:
    src, tgt = _write(tmp_path / "s.en", EN, gz), _write(tmp_path / "t.de", DE, gz)
    sources, targets, report = read_parallel_files(src, tgt)
    assert report.lines == 5 and report.pairs == 4 and report.empty_pairs_dropped == 1
    assert list(zip(sources, targets)) == [(e, d) for e, d in zip(EN, DE) if e]


def test_empty_lines_keep_and_error(tmp_path: Path) -> None:
    src, tgt = _write(tmp_path / "s", EN), _write(tmp_path / "t", DE)
    sources, targets, report = read_parallel_files(src, tgt, empty_lines="keep")
    assert report.pairs == 5 and report.empty_pairs_kept == 1 and sources[2] == "" and targets[2] == "Leer."
    with pytest.raises(ValueError, match="lines/rows 3"):
        read_parallel_files(src, tgt, empty_lines="error")
    with pytest.raises(ValueError, match="empty_lines must be one of"):
        read_parallel_files(src, tgt, empty_lines="skip")


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path: Path) -> None:
    src, tgt = _write(tmp_path / "s.en", EN), _write(tmp_path / "t.de", DE[:3])
    with pytest.raises(ValueError) as err:
        read_parallel_files(src, tgt)
    msg = str(err.value)
    assert str(src) in msg and str(tgt) in msg and "5 lines" in msg and "has 3" in msg


def test_non_utf8_names_file_and_line(tmp_path: Path) -> None:
    src = _write(tmp_path / "s", EN)
    tgt = tmp_path / "t"
    tgt.write_bytes(b"Ein Hund.\nZwei M\xe4nner.\n")
    with pytest.raises(ValueError, match=rf"{tgt}:2: not valid UTF-8"):
        read_parallel_files(src, tgt)


def test_line_endings_and_unicode_separators_keep_alignment(tmp_path: Path) -> None:
    src, tgt = tmp_path / "s", tmp_path / "t"
    src.write_bytes("one\r\ntwo\u2028still two\nthree\x85\n".encode())
    tgt.write_bytes(b"eins\nzwei\ndrei\n")
    sources, targets, _ = read_parallel_files(src, tgt)
    assert sources == ["one", "two\u2028still two", "three\x85"] and targets == ["eins", "zwei", "drei"]


def test_missing_file_and_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_parallel_files(tmp_path / "nope.en", tmp_path / "nope.de")
    src, tgt = _write(tmp_path / "s", ["", " "]), _write(tmp_path / "t", ["x", "y"])
    with pytest.raises(ValueError, match="corpus is empty"):
        read_parallel_files(src, tgt)
    (tmp_path / "e1").write_bytes(b"")
    (tmp_path / "e2").write_bytes(b"")
    with pytest.raises(ValueError, match="corpus is empty"):
        load_parallel_corpus(tmp_path / "e1", tmp_path / "e2")


def test_translation_column_two_columns_and_datasetdict() -> None:
    rows = [{"en": e, "de": d} for e, d in zip(EN, DE)]
    ds = datasets.Dataset.from_dict({"translation": rows, "id": list(range(5))})
    pairs, report = load_parallel_corpus(dataset=ds, source_lang="de", target_lang="en")
    assert pairs.column_names == ["source", "target"]
    assert report.pairs == 4 and report.empty_pairs_dropped == 1
    assert pairs[0] == {"source": DE[0], "target": EN[0]}
    with pytest.raises(ValueError, match="source_lang and target_lang"):
        load_parallel_corpus(dataset=ds)
    with pytest.raises(ValueError, match="'fr' is not in the translation column"):
        load_parallel_corpus(dataset=ds, source_lang="fr", target_lang="en")

    cols = datasets.Dataset.from_dict({"src": EN, "tgt": DE})
    dd = datasets.DatasetDict({"validation": cols})
    pairs, report = load_parallel_corpus(
        dataset=dd, split="validation", source_column="src", target_column="tgt", empty_lines="keep"
    )
    assert len(pairs) == 5 and report.empty_pairs_kept == 1
    with pytest.raises(ValueError, match="split 'train' not in the dataset"):
        load_parallel_corpus(dataset=dd, source_column="src", target_column="tgt")
    with pytest.raises(ValueError, match="no column 'x'"):
        load_parallel_corpus(dataset=cols, source_column="x", target_column="tgt")
    with pytest.raises(ValueError, match="no 'translation' column"):
        load_parallel_corpus(dataset=cols)


def test_tokenize_drops_or_truncates_overlong_pairs_and_counts(
    tmp_path: Path, tok: VaswaniTokenizerFast
) -> None:
    pairs, _ = dataset_from_files(_write(tmp_path / "s", EN), _write(tmp_path / "t", DE))
    full, report = tokenize_corpus(pairs, tok, max_length=None)
    lengths = np.maximum(sequence_lengths(full, "input_ids"), sequence_lengths(full, "labels"))
    limit = int(np.sort(lengths)[-2])  # exactly one pair is longer than this
    assert (lengths > limit).sum() == 1 and report.overlong_dropped == 0

    dropped, report = tokenize_corpus(pairs, tok, max_length=limit)
    assert report.pairs_in == 4 and report.pairs_out == 3 and report.overlong_dropped == 1
    assert dropped.column_names == ["input_ids", "labels"]

    cut, report = tokenize_corpus(pairs, tok, max_length=limit, overlong="truncate", keep_text=True)
    assert report.pairs_out == 4 and report.overlong_truncated == 1
    assert set(cut.column_names) == {"source", "target", "input_ids", "labels"}
    for row in cut:
        assert len(row["input_ids"]) <= limit and len(row["labels"]) <= limit
        assert row["input_ids"][-1] == tok.eos_token_id and row["labels"][-1] == tok.eos_token_id
    long_row = cut[int(np.argmax(lengths))]
    assert tok.decode(long_row["input_ids"], skip_special_tokens=True) != long_row["source"]
    with pytest.raises(ValueError, match="every pair is longer"):
        tokenize_corpus(pairs, tok, max_length=2)
    with pytest.raises(ValueError, match="overlong must be one of"):
        tokenize_corpus(pairs, tok, overlong="clip")


def test_tokenize_num_proc_and_cache(tmp_path: Path, tok: VaswaniTokenizerFast) -> None:
    src, tgt = _write(tmp_path / "s", EN * 40), _write(tmp_path / "t", DE * 40)
    pairs, _ = dataset_from_files(src, tgt)
    one, _ = tokenize_corpus(pairs, tok, batch_size=16)
    two, _ = tokenize_corpus(pairs, tok, batch_size=16, num_proc=2)
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"]
    cache = tmp_path / "cache"
    first, _ = tokenize_corpus(pairs, tok, cache_dir=cache)
    files = sorted(p.name for p in cache.iterdir())
    assert files and all(name.startswith("tokenized-") for name in files)
    again, _ = tokenize_corpus(dataset_from_files(src, tgt)[0], tok, cache_dir=cache)  # same files: cache hit
    assert sorted(p.name for p in cache.iterdir()) == files
    assert again["labels"] == first["labels"]


def test_corpus_statistics_values() -> None:
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 3], [5, 6, 7, 3]], "labels": [[9, 9, 3], [3]]})
    stats = corpus_statistics(ds)
    assert stats.pairs == 2
    assert (stats.source.tokens, stats.source.min, stats.source.max, stats.source.mean) == (6, 2, 4, 3.0)
    assert stats.target.percentiles[50] == 2.0 and stats.target.tokens == 4
    assert "pairs: 2" in stats.table()


def test_test_sentence_pairs_load_aligned() -> None:
    pairs, report = load_parallel_corpus(FIXTURES / "pairs.en", FIXTURES / "pairs.de")
    assert report.pairs == report.lines == 300 and report.empty_pairs_dropped == 0
    assert pairs["source"] == fixture_lines("en") and pairs["target"] == fixture_lines("de")
    assert pairs[0] == {"source": "A brown dog is waiting on a wooden bridge.",
                        "target": "Ein brauner Hund wartet auf einer Holzbrücke."}


@needs_multi30k
def test_multi30k_train_loads_aligned() -> None:
    pairs, report = load_parallel_corpus(MULTI30K / "train.en.gz", MULTI30K / "train.de.gz")
    assert report.pairs == 29000 and report.lines == 29000 and report.empty_pairs_dropped == 0
    assert pairs[0]["target"] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
    assert pairs[28999]["source"].strip() and pairs[28999]["target"].strip()


def test_files_stream_into_arrow_and_a_second_run_tokenizes_nothing(tmp_path: Path, tok, monkeypatch) -> None:
    """The text goes into an Arrow file in datasets' cache (no Python lists of the corpus); the same files give
    the same cached dataset, and tokenizing it again reads the cached result instead of running the tokenizer."""
    from vaswani.training import data

    src, tgt = _write(tmp_path / "s", EN * 3), _write(tmp_path / "t", DE * 3)
    pairs, report = dataset_from_files(src, tgt)
    assert pairs.cache_files and report.lines == 15 and report.empty_pairs_dropped == 3
    first, _ = tokenize_corpus(pairs, tok)
    calls = []
    encode = data._encode_batch
    monkeypatch.setattr(data, "_encode_batch", lambda *args, **kwargs: calls.append(1) or encode(*args, **kwargs))
    again, _ = dataset_from_files(src, tgt)
    assert again.cache_files[0]["filename"] == pairs.cache_files[0]["filename"]
    tokenized, _ = tokenize_corpus(again, tok)
    assert calls == [] and tokenized["input_ids"] == first["input_ids"]
    _write(src, EN[::-1] * 3)  # a changed file (another size) is read again
    changed, _ = dataset_from_files(src, tgt)
    assert changed.cache_files[0]["filename"] != pairs.cache_files[0]["filename"]
    assert changed[0]["source"] == EN[-1]
