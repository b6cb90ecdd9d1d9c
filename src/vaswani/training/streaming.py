"""Training on corpora larger than memory: the §5.1 token batches, built from a stream.

``vaswani train --streaming`` never holds the corpus: pairs are read as a ``datasets.IterableDataset`` (line-aligned
files, plain or gzip, or a Hub dataset with ``streaming=True``), each process reads its own share of them
(``split_dataset_by_node``: whole shards when they divide evenly, else every N-th pair), and
:class:`TokenBatchStream` turns that share into token batches through a bounded sort buffer, which fairseq and
Marian call a maxi-batch:

1. read the next ``buffer_pairs`` pairs and tokenize them;
2. sort them by length (ties in a random order) and pack batches of at most ``max_tokens`` tokens, as
   :class:`~vaswani.training.batching.TokenBatchSampler` does for a corpus in memory;
3. yield the batches in a random order, then refill.

Memory is the buffer's, whatever the corpus size. The stream never ends: at the end of the corpus it starts the
next epoch, so every process always has a batch for the next update (processes with unequal shares would
otherwise wait for each other forever), and a run is as long as its ``max_steps``.

Each batch carries its :class:`StreamPosition`: where its buffer began in the corpus (datasets'
``state_dict``), which buffer it is, and how many of the buffer's batches have been handed out. A checkpoint
stores every process's position of its last trained batch (:func:`write_stream_state`); resuming reads on from
there, re-tokenizing only the interrupted buffer, and gives the same batches a run without the kill would have
trained on.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from .batching import sort_and_pack
from .data import (
    EMPTY_LINE_POLICIES,
    OVERLONG_POLICIES,
    _aligned_lines,
    _check_policy,
    _encode_batch,
    _file_fingerprint,
    _is_empty,
    load_named_dataset,
    pair_projection,
)

#: Pairs per sort buffer (maxi-batch): ~40 batches of 25,000 tokens at WMT's ~27 tokens per sentence.
DEFAULT_BUFFER_PAIRS = 100_000
#: Written into each checkpoint of a streaming run: every process's place in the corpus.
STREAM_STATE = "stream_state.json"
_TOKENIZE_CHUNK = 1000


@dataclass
class StreamPosition:
    """A place in a process's stream, just after a batch: the ``epoch``, the buffer's index in it, the
    ``datasets`` state where that buffer began (None: the start of the epoch) and the buffer's ``batches``
    handed out so far."""

    epoch: int = 0
    buffer: int = 0
    batches: int = 0
    state: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StreamPosition:
        return cls(**values)


def _numbered_file_rows(source: str, target: str) -> Iterator[dict[str, Any]]:
    for line, (src, tgt) in enumerate(_aligned_lines(source, target), start=1):
        yield {"source": src, "target": tgt, "line": line}


def corpus_identity(corpus: dict[str, Any]) -> str:
    """What a resumed run checks to be reading the corpus it started on: the files' paths, sizes and times, or the
    dataset's name, configuration, split and languages (with the sizes and times of a local dataset's files)."""
    if corpus.get("dataset") is None:
        return "files:" + _file_fingerprint(corpus["source"], corpus["target"])
    if not isinstance(corpus["dataset"], (str, os.PathLike)):  # a datasets object: its own fingerprint
        return "dataset:" + str(getattr(corpus["dataset"], "_fingerprint", None))
    keys = ("dataset", "dataset_config", "split", "source_lang", "target_lang", "source_column", "target_column")
    described = json.dumps({key: str(corpus.get(key)) for key in keys}, sort_keys=True)
    local = Path(os.fspath(corpus["dataset"]))
    if local.exists():
        files = sorted(p for p in ([local] if local.is_file() else local.rglob("*")) if p.is_file())
        described += _file_fingerprint(*files) if files else ""
    return "dataset:" + hashlib.sha256(described.encode()).hexdigest()[:16]


def stream_corpus(corpus: dict[str, Any], *, rank: int = 0, world_size: int = 1):
    """A ``datasets.IterableDataset`` of ``source``/``target`` pairs (and ``line``, the file line, for files): this
    process's share of the corpus, read lazily. ``corpus`` is given as to
    :func:`~vaswani.training.data.load_parallel_corpus`; a Hub name or local dataset is loaded with
    ``streaming=True``."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    if corpus.get("dataset") is None:
        if corpus.get("source") is None or corpus.get("target") is None:
            raise ValueError("give both source and target files, or a dataset")
        paths = {"source": os.fspath(corpus["source"]), "target": os.fspath(corpus["target"])}
        for path in paths.values():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"corpus file {path!r} does not exist")
        features = datasets.Features(
            {"source": datasets.Value("string"), "target": datasets.Value("string"), "line": datasets.Value("int64")}
        )
        pairs = datasets.IterableDataset.from_generator(_numbered_file_rows, features=features, gen_kwargs=paths)
    else:
        dataset = corpus["dataset"]
        if isinstance(dataset, (str, os.PathLike)):
            dataset = load_named_dataset(
                dataset, corpus.get("dataset_config"), corpus.get("split", "train"), streaming=True
            )
        if not isinstance(dataset, datasets.IterableDataset):
            dataset = dataset.to_iterable_dataset()
        columns = dataset.column_names or list(next(iter(dataset)))
        project = pair_projection(
            columns,
            dataset.features,
            corpus.get("source_lang"),
            corpus.get("target_lang"),
            corpus.get("source_column"),
            corpus.get("target_column"),
        )
        pairs = dataset.map(project, batched=True, remove_columns=columns)
    return split_dataset_by_node(pairs, rank=rank, world_size=world_size) if world_size > 1 else pairs


class TokenBatchStream(IterableDataset):
    """Endless token batches from a stream of pairs, sorted by length within a bounded buffer (module docstring).

    Args:
        pairs: a ``datasets.IterableDataset`` with ``source`` and ``target`` text (:func:`stream_corpus`).
        tokenizer: the shared tokenizer (``</s>`` appended to each side).
        max_tokens: token budget of a batch, as :class:`~vaswani.training.batching.TokenBatchSampler`'s.
        collate_fn: turns a list of ``{"input_ids", "labels"}`` rows into a batch (e.g. ``DataCollatorForSeq2Seq``).
        buffer_pairs: pairs per sort buffer; memory grows with it, padding shrinks with it.
        max_length, overlong: pairs with a side over ``max_length`` tokens are dropped or truncated.
        empty_lines: pairs with an empty side are dropped, kept, or an error naming the line.
        seed: with the epoch and the buffer's index, decides the order of ties and of batches.
        max_sentences: optional cap on the rows of a batch.
        start: where to begin (a :class:`StreamPosition` from a checkpoint); None is the corpus' beginning.
        name: how errors name the corpus.
    """

    def __init__(
        self,
        pairs: Any,
        tokenizer: Any,
        max_tokens: int,
        *,
        collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]],
        buffer_pairs: int = DEFAULT_BUFFER_PAIRS,
        max_length: int | None = 256,
        overlong: str = "drop",
        empty_lines: str = "drop",
        seed: int = 0,
        max_sentences: int | None = None,
        start: StreamPosition | None = None,
        name: str = "the corpus",
    ) -> None:
        _check_policy(overlong, OVERLONG_POLICIES, "overlong")
        _check_policy(empty_lines, EMPTY_LINE_POLICIES, "empty_lines")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if buffer_pairs < 1:
            raise ValueError(f"the sort buffer must hold at least one pair, got {buffer_pairs}")
        self.pairs = pairs
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.collate_fn = collate_fn
        self.buffer_pairs = buffer_pairs
        self.max_length = max_length
        self.overlong = overlong
        self.empty_lines = empty_lines
        self.seed = seed
        self.max_sentences = max_sentences
        self.start = start or StreamPosition()
        self.name = name
        self.dropped = {"empty": 0, "overlong": 0}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.start.epoch
        while True:
            resume = self.start if epoch == self.start.epoch else None
            empty_epoch = True
            for position, rows in self._epoch_buffers(epoch, resume):
                empty_epoch = False
                skip = resume.batches if resume is not None and position.buffer == resume.buffer else 0
                for done, batch in enumerate(self._plan(rows, position)[skip:], start=skip + 1):
                    here = StreamPosition(epoch, position.buffer, done, position.state)
                    yield {**self.collate_fn(_as_lists([rows[i] for i in batch])), "stream_position": asdict(here)}
            if empty_epoch:
                raise ValueError(f"{self.name}: no sentence pairs to train on (the corpus or this process's share of "
                                 f"it is empty, or every pair was dropped: {self.dropped})")
            epoch += 1

    def _epoch_buffers(
        self, epoch: int, resume: StreamPosition | None
    ) -> Iterator[tuple[StreamPosition, list[dict[str, Any]]]]:
        """The epoch's sort buffers (tokenized rows), each with the position where it began; from ``resume``'s
        buffer on when given."""
        self.pairs.set_epoch(epoch)
        buffer, state = (resume.buffer, resume.state) if resume is not None else (0, None)
        if state is not None:
            self.pairs.load_state_dict(copy.deepcopy(state))
        rows = iter(self.pairs)
        while True:
            tokenized = self._fill(rows)
            if not tokenized:
                return
            yield StreamPosition(epoch, buffer, 0, state), tokenized
            buffer, state = buffer + 1, copy.deepcopy(self.pairs.state_dict())

    def _fill(self, rows: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
        """The next ``buffer_pairs`` usable pairs, tokenized; exactly the rows they came from are consumed."""
        tokenized: list[dict[str, Any]] = []
        while len(tokenized) < self.buffer_pairs:
            chunk = list(itertools.islice(rows, min(_TOKENIZE_CHUNK, self.buffer_pairs - len(tokenized))))
            if not chunk:
                break
            tokenized += self._tokenize([row for row in chunk if self._usable(row)])
        return tokenized

    def _usable(self, row: dict[str, Any]) -> bool:
        if not (_is_empty(row["source"]) or _is_empty(row["target"])):
            return True
        if self.empty_lines == "error":
            where = f"line {row['line']:,}" if "line" in row else "a pair"
            raise ValueError(f"{self.name}: {where} has an empty source or target; pass --empty-lines drop or keep")
        if self.empty_lines == "keep":
            return True
        self.dropped["empty"] += 1
        return False

    def _tokenize(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not rows:
            return []
        batch = {"source": [row["source"] for row in rows], "target": [row["target"] for row in rows]}
        encoded = _encode_batch(batch, self.tokenizer, self.max_length, self.overlong)
        keep = [not (over and self.overlong == "drop") for over in encoded["overlong"]]
        self.dropped["overlong"] += keep.count(False)
        return [
            {"input_ids": np.asarray(src, dtype=np.int32), "labels": np.asarray(tgt, dtype=np.int32)}
            for src, tgt, kept in zip(encoded["input_ids"], encoded["labels"], keep)
            if kept
        ]

    def _plan(self, rows: list[dict[str, Any]], position: StreamPosition) -> list[list[int]]:
        """The buffer's batches in their order: the same for the same seed, epoch and buffer."""
        rng = np.random.default_rng([self.seed, position.epoch, position.buffer])
        source = np.array([len(row["input_ids"]) for row in rows])
        target = np.array([len(row["labels"]) for row in rows])
        batches = sort_and_pack(rng.permutation(len(rows)), source, target, self.max_tokens, self.max_sentences)
        return [batches[i] for i in rng.permutation(len(batches))]


def _as_lists(rows: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """Buffered rows (NumPy, compact) as the Python lists transformers' collators expect."""
    return [{key: value.tolist() for key, value in row.items()} for row in rows]


def check_stream_workers(num_workers: int) -> None:
    """A stream is read in order in one place: the training process or one DataLoader worker beside it."""
    if num_workers > 1:
        raise ValueError(
            "--streaming reads the corpus in order in one place: use --dataloader-num-workers 0 or 1 (one worker "
            f"tokenizes beside training), not {num_workers}"
        )


def write_stream_state(checkpoint: Path, positions: list[dict[str, Any] | None]) -> None:
    """Record every process's stream position (one per rank, None before its first batch) in ``checkpoint``."""
    checkpoint.mkdir(parents=True, exist_ok=True)
    record = {"world_size": len(positions), "positions": positions}
    (checkpoint / STREAM_STATE).write_text(json.dumps(record, indent=1))


def resume_position(checkpoint: Path, rank: int, world_size: int) -> StreamPosition:
    """This process's place in the stream saved with ``checkpoint``; a checkpoint saved by another number of
    processes is refused, since each process's share of the corpus depends on it."""
    path = checkpoint / STREAM_STATE
    if not path.is_file():
        raise ValueError(
            f"--resume --streaming: {checkpoint} has no {STREAM_STATE} (the run did not stream); resume it without "
            "--streaming, or pass --reset-dataloader to start the stream from the corpus' beginning"
        )
    record = json.loads(path.read_text())
    if record["world_size"] != world_size:
        raise ValueError(
            f"--resume: {checkpoint} was saved by {record['world_size']} processes, each reading its own share of "
            f"the stream, and this run has {world_size}; resume with {record['world_size']} processes, or pass "
            "--reset-dataloader to start the stream from the corpus' beginning."
        )
    saved = record["positions"][rank]
    return StreamPosition() if saved is None else StreamPosition.from_dict(saved)


__all__ = [
    "DEFAULT_BUFFER_PAIRS",
    "STREAM_STATE",
    "StreamPosition",
    "TokenBatchStream",
    "check_stream_workers",
    "corpus_identity",
    "resume_position",
    "stream_corpus",
    "write_stream_state",
]
