"""Parallel corpora: loading sentence pairs, tokenizing them and reporting corpus statistics (§5.1).

Every loader returns a :class:`datasets.Dataset` with two string columns, ``source`` and ``target``,
plus a :class:`LoadReport` of what was counted on the way. Sources:

* line-aligned text files, plain or gzipped (the Multi30k layout: ``train.en.gz`` + ``train.de.gz``):
  :func:`dataset_from_files` (streamed into Arrow; :func:`read_parallel_files` gives Python lists);
* a ``datasets`` dataset with a ``translation`` column of ``{lang: text}`` dicts (the Hub's WMT/OPUS
  layout) or two text columns: :func:`pairs_from_dataset`;
* a Hub dataset name (needs a network or a populated cache): :func:`load_parallel_corpus`.

The source/target alignment is never silently broken: mismatched line counts and non-UTF-8 bytes are
errors naming the file (and line); empty lines are dropped, kept or refused by an explicit option and
counted; pairs over the length limit are dropped or truncated as a pair and counted.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

EmptyLines = Literal["drop", "keep", "error"]
Overlong = Literal["drop", "truncate"]
EMPTY_LINE_POLICIES = ("drop", "keep", "error")
OVERLONG_POLICIES = ("drop", "truncate")
PERCENTILES = (50, 90, 95, 99)


@dataclass
class LoadReport:
    """What happened while reading a parallel corpus."""

    source: str
    target: str
    lines: int = 0
    pairs: int = 0
    empty_pairs_dropped: int = 0
    empty_pairs_kept: int = 0

    def __str__(self) -> str:
        text = f"{self.pairs:,} pairs from {self.source} / {self.target} ({self.lines:,} lines)"
        if self.empty_pairs_dropped:
            text += f"; {self.empty_pairs_dropped:,} pairs with an empty side dropped"
        if self.empty_pairs_kept:
            text += f"; {self.empty_pairs_kept:,} pairs with an empty side kept"
        return text


@dataclass
class TokenizeReport:
    """What happened while tokenizing: pairs in, pairs out, and how many were over the length limit."""

    pairs_in: int
    pairs_out: int
    max_length: int | None
    overlong: str
    overlong_dropped: int = 0
    overlong_truncated: int = 0


@dataclass
class LengthStats:
    """Token counts of one side of a corpus (special tokens included)."""

    tokens: int
    mean: float
    min: int
    max: int
    percentiles: dict[int, float] = field(default_factory=dict)

    @classmethod
    def of(cls, lengths: np.ndarray) -> LengthStats:
        if len(lengths) == 0:
            return cls(tokens=0, mean=0.0, min=0, max=0, percentiles={p: 0.0 for p in PERCENTILES})
        return cls(
            tokens=int(lengths.sum()),
            mean=float(lengths.mean()),
            min=int(lengths.min()),
            max=int(lengths.max()),
            percentiles={p: float(np.percentile(lengths, p)) for p in PERCENTILES},
        )


@dataclass
class CorpusStats:
    """Corpus statistics of a tokenized parallel corpus: pairs, tokens and length percentiles per side."""

    pairs: int
    source: LengthStats
    target: LengthStats

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A plain-text table of the statistics."""
        heads = ["side", "tokens", "mean", "min"] + [f"p{p}" for p in PERCENTILES] + ["max"]
        rows = []
        for name, s in (("source", self.source), ("target", self.target)):
            rows.append(
                [name, f"{s.tokens:,}", f"{s.mean:.2f}", str(s.min)]
                + [f"{s.percentiles[p]:.0f}" for p in PERCENTILES]
                + [str(s.max)]
            )
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
        lines = [f"pairs: {self.pairs:,}", "  ".join(h.rjust(w) for h, w in zip(heads, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


UTF8_BOM = b"\xef\xbb\xbf"


def decode_lines(handle: BinaryIO, name: str) -> Iterator[str]:
    """Lines of a binary stream split at ``\\n`` only (``\\r\\n`` accepted), decoded as UTF-8, without their
    endings; a UTF-8 byte-order mark before the first line is dropped (it is not part of the sentence).
    Non-UTF-8 bytes raise ``ValueError`` naming ``name`` and the line."""
    for lineno, raw in enumerate(handle, start=1):
        if lineno == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM) :]
        if raw.endswith(b"\n"):
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{name}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start} of the line); "
                "re-encode the input as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None


def read_lines(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield the lines of a plain or gzipped UTF-8 text file, without their ``\\n`` / ``\\r\\n`` ending.

    Only ``\\n`` separates lines (Unicode line separators inside a sentence are kept), so line ``i`` of a
    source file stays aligned with line ``i`` of its target file. Non-UTF-8 bytes, and a ``.gz`` file that is
    not gzip or is cut short, raise ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist")
    lines = 0
    try:
        with _open_binary(path) as handle:
            for line in decode_lines(handle, str(path)):
                lines += 1  # for the error below: where the damage is
                yield line
    except gzip.BadGzipFile:
        raise ValueError(
            f"{path} is not gzip-compressed although its name ends in .gz; rename it without .gz "
            "(or compress it with gzip)"
        ) from None
    except (EOFError, zlib.error) as err:
        raise ValueError(
            f"{path} is truncated or damaged after line {lines:,} ({err}); copy or download it again "
            f"(`gzip -t {path}` checks it)"
        ) from None


def _is_empty(text: str) -> bool:
    return not text.strip()


def _check_policy(value: str, allowed: Sequence[str], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _empty_pair_policy(empty: np.ndarray, policy: EmptyLines, report: LoadReport, where: str) -> np.ndarray | None:
    """Apply ``policy`` to the pairs flagged ``empty`` (a boolean per pair): the indices of the pairs to keep
    (None: all), with the counts in ``report``; ``"error"`` raises, naming the first lines."""
    found = np.flatnonzero(empty)
    if found.size and policy == "error":
        shown = ", ".join(str(i + 1) for i in found[:5])
        raise ValueError(
            f"{where}: {found.size} pairs have an empty source or target (lines/rows {shown}"
            f"{', ...' if found.size > 5 else ''}); pass empty_lines='drop' or 'keep'"
        )
    keep = None
    if found.size and policy == "drop":
        keep = np.flatnonzero(~empty)
        report.empty_pairs_dropped = int(found.size)
    elif found.size:
        report.empty_pairs_kept = int(found.size)
    report.pairs = len(empty) if keep is None else len(keep)
    if report.pairs == 0:
        raise ValueError(f"{where}: the corpus is empty (no sentence pairs left after reading)")
    return keep


def _blank_pairs(pairs, batch_size: int = 50_000) -> np.ndarray:
    """Which pairs of a ``source``/``target`` dataset have an empty or whitespace-only side, computed batch by
    batch in Arrow: the corpus never becomes Python strings."""
    import pyarrow.compute as pc

    flags = [np.zeros(0, dtype=bool)]
    for batch in pairs.with_format("arrow").iter(batch_size=batch_size):
        blank = [pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(batch[side])), 0) for side in ("source", "target")]
        flags.append(pc.or_(*blank).to_numpy(zero_copy_only=False))
    return np.concatenate(flags)


def read_parallel_files(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    empty_lines: EmptyLines = "drop",
) -> tuple[list[str], list[str], LoadReport]:
    """Read two line-aligned files (plain or ``.gz``) into lists of source and target sentences.

    Args:
        source, target: the two files; line ``i`` of one translates line ``i`` of the other.
        empty_lines: what to do with a pair whose source or target is empty (or whitespace only):
            ``"drop"`` the pair (counted in the report), ``"keep"`` it (counted), or ``"error"``.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the files have different line counts, a line is not UTF-8, or no pair is left.
    """
    _check_policy(empty_lines, EMPTY_LINE_POLICIES, "empty_lines")
    pairs = list(_aligned_lines(os.fspath(source), os.fspath(target)))
    report = LoadReport(source=str(source), target=str(target), lines=len(pairs))
    empty = np.array([_is_empty(s) or _is_empty(t) for s, t in pairs], dtype=bool)
    keep = _empty_pair_policy(empty, empty_lines, report, f"{source} / {target}")
    kept = pairs if keep is None else [pairs[i] for i in keep]
    return [s for s, _ in kept], [t for _, t in kept], report


def _aligned_lines(source: str, target: str) -> Iterator[tuple[str, str]]:
    """Line i of ``source`` with line i of ``target``, read as they are consumed; files of different lengths are
    an error naming both line counts."""
    sources, targets = read_lines(source), read_lines(target)
    for count, pair in enumerate(itertools.zip_longest(sources, targets), start=1):
        if None in pair:
            rest = 1 + sum(1 for _ in (targets if pair[0] is None else sources))
            counts = (count - 1, count - 1 + rest) if pair[0] is None else (count - 1 + rest, count - 1)
            raise ValueError(
                f"line counts differ: {source} has {counts[0]:,} lines but {target} has {counts[1]:,}; "
                "the files must be line-aligned translations of each other"
            )
        yield pair


def _file_rows(source: str, target: str, fingerprint: str) -> Iterator[dict[str, str]]:
    """Rows for ``Dataset.from_generator`` (``fingerprint`` keys datasets' cache to the files' size and time)."""
    for src, tgt in _aligned_lines(source, target):
        yield {"source": src, "target": tgt}


def _file_fingerprint(*paths: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def dataset_from_files(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    empty_lines: EmptyLines = "drop",
):
    """Read two line-aligned files into a ``datasets.Dataset`` with ``source`` and ``target`` columns.

    The lines stream into an Arrow file in datasets' cache (``Dataset.from_generator``), so no step holds the
    corpus as Python objects, and a second run with the same files (path, size, mtime) reads that file instead
    of the text; ``map`` results on it (tokenizing) are cached beside it. Empty pairs are found in Arrow.
    """
    from datasets import Dataset, Features, Value
    from datasets.exceptions import DatasetGenerationError

    _check_policy(empty_lines, EMPTY_LINE_POLICIES, "empty_lines")
    paths = {"source": os.fspath(source), "target": os.fspath(target)}
    if next(_aligned_lines(**paths), None) is None:  # datasets cannot hold a split without rows
        raise ValueError(f"{source} / {target}: the corpus is empty (no sentence pairs in the files)")
    try:
        pairs = Dataset.from_generator(
            _file_rows,
            features=Features({"source": Value("string"), "target": Value("string")}),
            gen_kwargs={**paths, "fingerprint": _file_fingerprint(source, target)},
        )
    except DatasetGenerationError as err:  # the reader's own error (misaligned, damaged, not UTF-8) says more
        raise (err.__cause__ or err) from None
    report = LoadReport(source=str(source), target=str(target), lines=len(pairs))
    keep = _empty_pair_policy(_blank_pairs(pairs), empty_lines, report, f"{source} / {target}")
    return (pairs if keep is None else pairs.select(keep)), report


def translation_languages(feature: Any) -> list[str] | None:
    """The languages of a ``translation`` column: datasets' ``Translation`` feature (the Hub's WMT layout) or a
    dict of text columns (JSON files); None when the feature does not say."""
    if hasattr(feature, "languages"):
        return list(feature.languages)
    return list(feature.keys()) if hasattr(feature, "keys") else None


def pair_projection(
    columns: list[str],
    features: Any,
    source_lang: str | None = None,
    target_lang: str | None = None,
    source_column: str | None = None,
    target_column: str | None = None,
) -> Callable[[dict[str, list]], dict[str, list]]:
    """The batched ``map`` function that turns a dataset's rows into ``source``/``target`` pairs: two text columns,
    or two languages of a ``translation`` column (the Hub's WMT/OPUS layout). What the dataset lacks is an error
    naming what it has; a streamed dataset whose features are not known yet is checked on its rows."""
    if source_column is not None or target_column is not None:
        if source_column is None or target_column is None:
            raise ValueError("give both source_column and target_column")
        for col in (source_column, target_column):
            if col not in columns:
                raise ValueError(f"the dataset has no column {col!r}; its columns are {columns}")

        def project(batch: dict[str, list]) -> dict[str, list]:
            return {"source": batch[source_column], "target": batch[target_column]}

        return project
    if "translation" not in columns:
        raise ValueError(
            f"the dataset has no 'translation' column; give source_column and target_column (columns: {columns})"
        )
    if source_lang is None or target_lang is None:
        raise ValueError("the dataset has a 'translation' column: give source_lang and target_lang (e.g. 'en', 'de')")
    langs = translation_languages(features["translation"]) if features else None
    for lang in (source_lang, target_lang):
        if langs is not None and lang not in langs:
            raise ValueError(f"language {lang!r} is not in the translation column; it has {langs}")

    def side(pair: dict[str, str], lang: str) -> str:
        if lang not in pair:
            raise ValueError(f"language {lang!r} is not in the translation column; it has {sorted(pair)}")
        return pair[lang]

    def project_translation(batch: dict[str, list]) -> dict[str, list]:
        pairs = batch["translation"]
        return {"source": [side(p, source_lang) for p in pairs], "target": [side(p, target_lang) for p in pairs]}

    return project_translation


def pairs_from_dataset(
    dataset,
    *,
    source_lang: str | None = None,
    target_lang: str | None = None,
    source_column: str | None = None,
    target_column: str | None = None,
    empty_lines: EmptyLines = "drop",
    num_proc: int | None = None,
):
    """Turn a ``datasets.Dataset`` into one with ``source`` and ``target`` string columns.

    Either the dataset has a ``translation`` column of ``{lang: text}`` dicts (the Hub's WMT/OPUS layout;
    give ``source_lang`` and ``target_lang``), or give ``source_column`` and ``target_column``.
    """
    _check_policy(empty_lines, EMPTY_LINE_POLICIES, "empty_lines")
    columns = dataset.column_names
    project = pair_projection(
        columns, dataset.features, source_lang, target_lang, source_column, target_column
    )
    name = getattr(dataset, "info", None) and dataset.info.dataset_name or "dataset"
    report = LoadReport(
        source=f"{name}[{source_lang or source_column}]",
        target=f"{name}[{target_lang or target_column}]",
        lines=len(dataset),
    )
    pairs = dataset.map(
        project, batched=True, remove_columns=columns, num_proc=num_proc, desc="Selecting source/target"
    )
    keep = _empty_pair_policy(_blank_pairs(pairs), empty_lines, report, f"{report.source} / {report.target}")
    return (pairs if keep is None else pairs.select(keep)), report


#: Table files ``--dataset`` may name directly, by suffix (a ``.gz`` after it is read through): datasets' builder and
#: its options. A TSV or CSV file needs a header row naming its columns.
TABLE_FILES = {
    ".tsv": ("csv", {"delimiter": "\t", "quoting": 3}),  # quoting 3: QUOTE_NONE, quotes are text in a sentence
    ".csv": ("csv", {}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}


def load_named_dataset(name: str | os.PathLike[str], config: str | None, split: str, streaming: bool = False):
    """``datasets.load_dataset`` for what ``--dataset`` names: a Hub id, a local dataset folder, or one TSV, CSV,
    JSON Lines or Parquet file (plain or ``.gz``), which becomes the ``train`` split."""
    import datasets

    path = Path(os.fspath(name))
    suffixes = [suffix for suffix in path.suffixes if suffix != ".gz"]
    if path.is_file() and suffixes and suffixes[-1] in TABLE_FILES:
        builder, options = TABLE_FILES[suffixes[-1]]
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split=split, streaming=streaming,
                                     **options)
    return datasets.load_dataset(os.fspath(name), config, split=split, streaming=streaming)


def load_parallel_corpus(
    source: str | os.PathLike[str] | None = None,
    target: str | os.PathLike[str] | None = None,
    *,
    dataset: Any = None,
    dataset_config: str | None = None,
    split: str = "train",
    source_lang: str | None = None,
    target_lang: str | None = None,
    source_column: str | None = None,
    target_column: str | None = None,
    empty_lines: EmptyLines = "drop",
    num_proc: int | None = None,
):
    """Load sentence pairs from files, a ``datasets`` object, or a Hub dataset name.

    Give either ``source`` and ``target`` files, or ``dataset``: a ``Dataset``, a ``DatasetDict`` (``split``
    is taken), or a Hub name, local dataset folder or table file (:func:`load_named_dataset`)
    (needs a network unless cached). Returns ``(dataset, report)``; the dataset has ``source`` and
    ``target`` columns.
    """
    if dataset is None:
        if source is None or target is None:
            raise ValueError("give both source and target files, or a dataset")
        return dataset_from_files(source, target, empty_lines=empty_lines)
    if source is not None or target is not None:
        raise ValueError("give either source/target files or a dataset, not both")
    import datasets

    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_named_dataset(dataset, dataset_config, split)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"split {split!r} not in the dataset; it has {list(dataset)}")
        dataset = dataset[split]
    return pairs_from_dataset(
        dataset,
        source_lang=source_lang,
        target_lang=target_lang,
        source_column=source_column,
        target_column=target_column,
        empty_lines=empty_lines,
        num_proc=num_proc,
    )


def _encode_batch(batch: dict[str, list], tokenizer, max_length: int | None, overlong: str) -> dict[str, list]:
    enc = tokenizer(batch["source"], text_target=batch["target"], return_attention_mask=False)
    src, tgt = enc["input_ids"], enc["labels"]
    over = [max_length is not None and (len(s) > max_length or len(t) > max_length) for s, t in zip(src, tgt)]
    if overlong == "truncate" and any(over):
        eos = tokenizer.eos_token_id
        src = [s if len(s) <= max_length else s[: max_length - 1] + [eos] for s in src]
        tgt = [t if len(t) <= max_length else t[: max_length - 1] + [eos] for t in tgt]
    return {"input_ids": src, "labels": tgt, "overlong": over}


def tokenize_corpus(
    dataset,
    tokenizer,
    *,
    max_length: int | None = 256,
    overlong: Overlong = "drop",
    num_proc: int | None = None,
    batch_size: int = 1000,
    cache_dir: str | os.PathLike[str] | None = None,
    keep_text: bool = False,
):
    """Tokenize a ``source``/``target`` dataset with ``datasets.map(batched=True)``.

    Each side is encoded with the shared tokenizer (``</s>`` appended). A pair with either side longer than
    ``max_length`` tokens is dropped (``overlong="drop"``) or has that side cut to ``max_length`` tokens
    ending in ``</s>`` (``"truncate"``); both are counted. ``max_length=None`` keeps everything.

    The result has ``input_ids`` and ``labels`` columns (the text columns too if ``keep_text``), ready for
    ``DataCollatorForSeq2Seq``. ``map`` caches its result, so a second run does not tokenize again: for
    datasets backed by files (:func:`dataset_from_files`, Hub datasets) beside them in datasets' cache, for
    in-memory ones in ``cache_dir`` if given. ``num_proc`` is passed to ``map``.

    Returns ``(tokenized, report)``.
    """
    _check_policy(overlong, OVERLONG_POLICIES, "overlong")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one token plus </s>), got {max_length}")
    for col in ("source", "target"):
        if col not in dataset.column_names:
            raise ValueError(f"the dataset needs a {col!r} column; load it with load_parallel_corpus")
    remove = [c for c in dataset.column_names if not keep_text or c not in ("source", "target")]
    # The result's fingerprint names exactly what it depends on, so that the cache is found again (hashing a fast
    # tokenizer object is not stable across processes; its serialized form is).
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        identity = backend.to_str()
    else:
        from datasets.fingerprint import Hasher

        identity = Hasher.hash(tokenizer)
    digest = hashlib.sha256(
        f"{dataset._fingerprint}|{identity}|{max_length}|{overlong}|{keep_text}".encode()
    ).hexdigest()[:16]
    kwargs: dict[str, Any] = {"new_fingerprint": digest}
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        kwargs["cache_file_name"] = os.path.join(os.fspath(cache_dir), f"tokenized-{digest}.arrow")
    mapped = dataset.map(
        _encode_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=remove,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "overlong": overlong},
        desc="Tokenizing",
        **kwargs,
    )
    over = np.asarray(mapped.with_format("arrow")["overlong"].to_numpy(zero_copy_only=False), dtype=bool)
    n_over = int(over.sum())
    report = TokenizeReport(pairs_in=len(dataset), pairs_out=len(dataset), max_length=max_length, overlong=overlong)
    if overlong == "drop" and n_over:
        mapped = mapped.select(np.flatnonzero(~over))
        report.overlong_dropped = n_over
    elif n_over:
        report.overlong_truncated = n_over
    report.pairs_out = len(mapped)
    mapped = mapped.remove_columns("overlong")
    if len(mapped) == 0:
        raise ValueError(f"every pair is longer than max_length={max_length}; raise max_length")
    return mapped, report


def sequence_lengths(dataset, column: str) -> np.ndarray:
    """Lengths of the token lists in ``column`` (fast: read from Arrow, no Python lists)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")[column]).to_numpy().astype(np.int64)


def corpus_statistics(dataset, source_column: str = "input_ids", target_column: str = "labels") -> CorpusStats:
    """Pairs, tokens, mean/min/max and length percentiles of each side of a tokenized corpus."""
    return CorpusStats(
        pairs=len(dataset),
        source=LengthStats.of(sequence_lengths(dataset, source_column)),
        target=LengthStats.of(sequence_lengths(dataset, target_column)),
    )


def train_tokenizer_from_corpus(
    source: str | os.PathLike[str] | None = None,
    target: str | os.PathLike[str] | None = None,
    *,
    dataset: Any = None,
    vocab_size: int = 37000,
    min_frequency: int = 2,
    max_pairs: int | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
    streaming: bool = False,
    **load_kwargs: Any,
):
    """Train the shared BPE tokenizer jointly on the source and target sides of a corpus (§5.1).

    The corpus is given as for :func:`load_parallel_corpus`; ``max_pairs`` learns the vocabulary from the
    first that many pairs only (as sentencepiece's ``input_sentence_size``: a sample is enough for a large
    corpus, and BPE training time grows with the distinct words). With ``streaming`` the sentences are read
    as the trainer consumes them, never all in memory. Returns ``(tokenizer, load_report)``; the report is None
    when streaming (nothing is counted ahead).
    """
    from ..tokenization import train_tokenizer

    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1 (or None for all pairs), got {max_pairs}")
    if streaming:
        from .streaming import stream_corpus

        rows = stream_corpus({"source": source, "target": target, "dataset": dataset, **load_kwargs})
        texts = (text for row in itertools.islice(rows, max_pairs) for text in (row["source"], row["target"]))
        settings = {"vocab_size": vocab_size, "min_frequency": min_frequency, "show_progress": show_progress}
        return train_tokenizer(texts, output_dir=output_dir, **settings), None
    pairs, report = load_parallel_corpus(source, target, dataset=dataset, **load_kwargs)
    if max_pairs is not None and max_pairs < len(pairs):
        pairs = pairs.select(range(max_pairs))
    table = pairs.with_format("arrow")
    texts = table["source"].to_pylist() + table["target"].to_pylist()
    tokenizer = train_tokenizer(
        texts,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        length=len(texts),
        show_progress=show_progress,
        output_dir=output_dir,
    )
    return tokenizer, report


__all__ = [
    "CorpusStats",
    "LengthStats",
    "LoadReport",
    "TokenizeReport",
    "corpus_statistics",
    "dataset_from_files",
    "decode_lines",
    "load_parallel_corpus",
    "pairs_from_dataset",
    "read_lines",
    "read_parallel_files",
    "sequence_lengths",
    "tokenize_corpus",
    "train_tokenizer_from_corpus",
]
