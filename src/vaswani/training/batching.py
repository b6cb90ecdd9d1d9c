"""Token-based batching: pairs of similar length grouped into batches of at most N tokens (§5.1).

The paper batches "sentence pairs ... by approximate sequence length", each batch holding about 25,000
source and 25,000 target tokens. :class:`TokenBatchSampler` does that:

* **Cost of a batch** = rows × max(longest source, longest target) in the batch, i.e. the number of
  positions of the larger of the two padded tensors; it is at most ``max_tokens``, so both the padded
  source and the padded target batch have at most ``max_tokens`` tokens. (A single pair longer than
  ``max_tokens`` becomes a batch of its own, flagged by :meth:`TokenBatchSampler.oversized`.)
* **Grouping**: pairs are sorted by (max length, source length, target length), ties in random order,
  then packed greedily; the batch order is shuffled each epoch. Because packing depends only on the sorted
  lengths, every epoch has the same number of batches.
* **Determinism**: the order depends only on ``seed`` and the epoch (:meth:`set_epoch`).
* **Processes**: with ``num_replicas`` > 1 each rank takes every ``num_replicas``-th batch of the same
  global order (distinct batches, same count on every rank). When the batch list is not a multiple of
  ``num_replicas`` the first batches of the epoch are repeated to fill the last round
  (``drop_last=False``) or the last incomplete round is dropped (``drop_last=True``).
  Under ``accelerate`` (``Accelerator.prepare`` or ``Trainer``) keep ``num_replicas=1``: accelerate
  shards the batch sampler itself (``BatchSamplerShard``, round-robin, also repeating batches to even
  the ranks out). With a plain ``torch.distributed`` DataLoader pass the world size and rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Sampler


def _as_lengths(values: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of lengths")
    if len(arr) and arr.min() < 0:
        raise ValueError(f"{name} contains a negative length")
    return arr


def pack_by_tokens(order: np.ndarray, cost_lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    """Greedily cut ``order`` into consecutive batches with rows × max(cost length) ≤ ``max_tokens``."""
    batches: list[list[int]] = []
    start, longest = 0, 0
    lengths = cost_lengths[order]
    for i, length in enumerate(lengths.tolist()):
        new_longest = max(longest, length)
        if i > start and new_longest * (i - start + 1) > max_tokens:
            batches.append(order[start:i].tolist())
            start, new_longest = i, length
        longest = new_longest
    if start < len(order):
        batches.append(order[start:].tolist())
    return batches


def sort_and_pack(
    tie_order: np.ndarray,
    source_lengths: np.ndarray,
    target_lengths: np.ndarray,
    max_tokens: int,
    max_sentences: int | None = None,
) -> list[list[int]]:
    """Sort pairs by (max length, source length, target length), keeping ``tie_order`` among equals, and pack
    them into batches of at most ``max_tokens`` (and ``max_sentences`` rows, if given)."""
    cost_lengths = np.maximum(source_lengths, target_lengths)
    order = tie_order[np.lexsort((target_lengths[tie_order], source_lengths[tie_order], cost_lengths[tie_order]))]
    batches = pack_by_tokens(order, cost_lengths, max_tokens)
    if max_sentences is not None:
        batches = [b[i : i + max_sentences] for b in batches for i in range(0, len(b), max_sentences)]
    return batches


class TokenBatchSampler(Sampler[list[int]]):
    """Batches of sentence-pair indices with at most ``max_tokens`` tokens each (see the module docstring).

    Args:
        source_lengths, target_lengths: token counts of each pair (``</s>`` included).
        max_tokens: token budget of a batch per side (paper: ~25,000).
        shuffle: shuffle tie order and batch order each epoch; if False, batches come shortest first.
        seed: base seed; the epoch's order is drawn from ``(seed, epoch)``.
        num_replicas, rank: split the batches across processes (see module docstring).
        drop_last: drop the last incomplete round of batches instead of repeating early ones.
        max_sentences: optional cap on the rows of a batch.
    """

    def __init__(
        self,
        source_lengths: Sequence[int] | np.ndarray,
        target_lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        max_sentences: int | None = None,
    ) -> None:
        self.source_lengths = _as_lengths(source_lengths, "source_lengths")
        self.target_lengths = _as_lengths(target_lengths, "target_lengths")
        if len(self.source_lengths) != len(self.target_lengths):
            raise ValueError(
                f"source_lengths has {len(self.source_lengths)} entries but target_lengths has "
                f"{len(self.target_lengths)}; give one length per pair on each side"
            )
        if len(self.source_lengths) == 0:
            raise ValueError("cannot batch an empty corpus")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        if max_sentences is not None and max_sentences < 1:
            raise ValueError(f"max_sentences must be positive, got {max_sentences}")
        self.max_tokens = int(max_tokens)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = drop_last
        self.max_sentences = max_sentences
        self.epoch = 0
        self.cost_lengths = np.maximum(self.source_lengths, self.target_lengths)
        self._num_global = len(self._pack(np.arange(len(self.cost_lengths))))
        if drop_last and self._num_global < self.num_replicas:
            raise ValueError(
                f"only {self._num_global} batches for {self.num_replicas} processes with drop_last=True; "
                "lower max_tokens or use drop_last=False"
            )

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, which (with the seed) determines the order of the next iteration."""
        self.epoch = int(epoch)

    def _pack(self, tie_order: np.ndarray) -> list[list[int]]:
        return sort_and_pack(tie_order, self.source_lengths, self.target_lengths, self.max_tokens, self.max_sentences)

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of an epoch in order, before the split across processes."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.cost_lengths)
        if not self.shuffle:
            return self._pack(np.arange(n))
        rng = np.random.default_rng([self.seed, epoch])
        batches = self._pack(rng.permutation(n))
        return [batches[i] for i in rng.permutation(len(batches))]

    def oversized(self) -> list[int]:
        """Indices of pairs longer than ``max_tokens`` on either side (each forms a batch on its own)."""
        return np.flatnonzero(self.cost_lengths > self.max_tokens).tolist()

    def _rounds(self) -> int:
        if self.drop_last:
            return self._num_global // self.num_replicas
        return math.ceil(self._num_global / self.num_replicas)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return self._rounds()

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        total = self._rounds() * self.num_replicas
        if total > len(batches):
            batches = batches + [batches[i % len(batches)] for i in range(total - len(batches))]
        yield from batches[self.rank : total : self.num_replicas]


def batch_padding(
    batches: Sequence[Sequence[int]],
    source_lengths: Sequence[int] | np.ndarray,
    target_lengths: Sequence[int] | np.ndarray,
) -> dict[str, float]:
    """Padding of a list of batches when source and target are each padded to their batch's longest.

    Returns ``real`` and ``padded`` token counts (source + target) and ``waste`` = pad tokens / all tokens.
    """
    src = np.asarray(source_lengths)
    tgt = np.asarray(target_lengths)
    real = padded = 0
    for batch in batches:
        s, t = src[list(batch)], tgt[list(batch)]
        real += int(s.sum() + t.sum())
        padded += len(batch) * int(s.max() + t.max())
    return {"real": real, "padded": padded, "waste": 1.0 - real / padded if padded else 0.0}


def random_token_batches(
    source_lengths: Sequence[int] | np.ndarray,
    target_lengths: Sequence[int] | np.ndarray,
    max_tokens: int,
    seed: int = 0,
) -> list[list[int]]:
    """Baseline: the same token budget, but pairs packed in random order (no length grouping)."""
    cost = np.maximum(np.asarray(source_lengths), np.asarray(target_lengths))
    order = np.random.default_rng(seed).permutation(len(cost))
    return pack_by_tokens(order, cost, max_tokens)


def token_batch_sampler_for(dataset: Any, max_tokens: int, **kwargs: Any) -> TokenBatchSampler:
    """A :class:`TokenBatchSampler` over a tokenized dataset (``input_ids`` / ``labels`` columns)."""
    from .data import sequence_lengths

    return TokenBatchSampler(
        sequence_lengths(dataset, "input_ids"), sequence_lengths(dataset, "labels"), max_tokens, **kwargs
    )


def build_dataloader(
    dataset: Any,
    max_tokens: int,
    *,
    tokenizer: Any = None,
    collate_fn: Any = None,
    model: Any = None,
    shuffle: bool = True,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    drop_last: bool = False,
    max_sentences: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over a tokenized dataset with token-based batches (:class:`TokenBatchSampler`).

    ``collate_fn`` defaults to transformers' ``DataCollatorForSeq2Seq(tokenizer, model=model)``: padding with the
    tokenizer's ``<pad>``, labels with -100, and ``decoder_input_ids`` from the model when it is given. Call
    ``loader.batch_sampler.set_epoch(epoch)`` each epoch (accelerate's prepared loader forwards its own
    ``set_epoch``). For ``accelerate``/``Trainer`` leave ``num_replicas=1`` and let accelerate shard; for a
    plain ``torch.distributed`` job pass ``num_replicas=world_size, rank=rank``.
    """
    sampler = token_batch_sampler_for(
        dataset,
        max_tokens,
        shuffle=shuffle,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
        drop_last=drop_last,
        max_sentences=max_sentences,
    )
    if collate_fn is None:
        if tokenizer is None:
            raise ValueError("build_dataloader needs the tokenizer (for its <pad> id) or a collate_fn")
        from transformers import DataCollatorForSeq2Seq

        collate_fn = DataCollatorForSeq2Seq(tokenizer, model=model)
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory
    )


__all__ = [
    "TokenBatchSampler",
    "batch_padding",
    "build_dataloader",
    "pack_by_tokens",
    "random_token_batches",
    "sort_and_pack",
    "token_batch_sampler_for",
]
