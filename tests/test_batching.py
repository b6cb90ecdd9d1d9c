"""Token-based batching: token limit, coverage, determinism, splits across processes, padding waste."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate.data_loader import BatchSamplerShard
from helpers import MULTI30K, needs_multi30k

from vaswani.training.batching import (
    TokenBatchSampler,
    batch_padding,
    build_dataloader,
    random_token_batches,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _lengths(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = rng.integers(2, 80, n)
    tgt = np.clip(src + rng.integers(-10, 11, n), 1, None)
    return src, tgt


def _cost(batch: list[int], src: np.ndarray, tgt: np.ndarray) -> int:
    return len(batch) * int(max(src[batch].max(), tgt[batch].max()))


@pytest.mark.parametrize("max_tokens", [100, 1000, 25000])
def test_token_limit_and_each_pair_once_per_epoch(max_tokens: int) -> None:
    src, tgt = _lengths()
    sampler = TokenBatchSampler(src, tgt, max_tokens, seed=3)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(_cost(b, src, tgt) <= max_tokens for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(len(src)))


def test_deterministic_given_seed_and_reshuffled_per_epoch() -> None:
    src, tgt = _lengths()
    a, b = TokenBatchSampler(src, tgt, 1000, seed=7), TokenBatchSampler(src, tgt, 1000, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(TokenBatchSampler(src, tgt, 1000, seed=8)) != list(b)
    ordered = list(TokenBatchSampler(src, tgt, 1000, shuffle=False))
    maxima = [int(np.maximum(src, tgt)[batch].max()) for batch in ordered]
    assert maxima == sorted(maxima)


def test_oversized_pair_gets_its_own_batch_and_max_sentences() -> None:
    src, tgt = np.array([5, 5, 500, 5]), np.array([5, 5, 6, 5])
    sampler = TokenBatchSampler(src, tgt, 100)
    assert sampler.oversized() == [2]
    assert [2] in list(sampler) and sorted(i for b in sampler for i in b) == [0, 1, 2, 3]
    capped = TokenBatchSampler(*_lengths(), 25000, max_sentences=64)
    assert max(len(b) for b in capped) <= 64


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="target_lengths has 2"):
        TokenBatchSampler([1, 2, 3], [1, 2], 10)
    with pytest.raises(ValueError, match="empty corpus"):
        TokenBatchSampler([], [], 10)
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        TokenBatchSampler([1], [1], 0)
    with pytest.raises(ValueError, match="rank"):
        TokenBatchSampler([1], [1], 10, num_replicas=2, rank=2)


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_replicas_get_disjoint_batches_covering_the_corpus(drop_last: bool) -> None:
    src, tgt = _lengths()
    # A budget giving an odd number of batches: the uneven case, where one batch is repeated or dropped.
    budget = next(m for m in range(900, 1200, 7) if len(TokenBatchSampler(src, tgt, m)) % 2 == 1)
    ranks = [
        TokenBatchSampler(src, tgt, budget, seed=1, num_replicas=2, rank=r, drop_last=drop_last)
        for r in (0, 1)
    ]
    full = TokenBatchSampler(src, tgt, budget, seed=1).global_batches()
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0])
    seen = [i for batches in per_rank for b in batches for i in b]
    if drop_last:
        assert len(seen) == len(set(seen))  # disjoint
        assert set(seen) == set(range(len(src))) - set(full[-1])
    else:
        assert set(seen) == set(range(len(src)))  # covering
        assert per_rank[1][-1] == full[0]  # the filler is the first batch again, and only it repeats
        assert len(seen) - len(set(seen)) == len(full[0])


def test_two_replicas_even_split_is_exactly_disjoint() -> None:
    src, tgt = _lengths()
    budget = next(m for m in range(900, 1200, 7) if len(TokenBatchSampler(src, tgt, m)) % 2 == 0)
    r0, r1 = (list(TokenBatchSampler(src, tgt, budget, num_replicas=2, rank=r)) for r in (0, 1))
    seen = [i for b in r0 + r1 for i in b]
    assert len(r0) == len(r1) and sorted(seen) == list(range(len(src)))


def test_accelerate_batch_sampler_shard_splits_it() -> None:
    src, tgt = _lengths()
    sampler = TokenBatchSampler(src, tgt, 1000, seed=2)
    shards = [BatchSamplerShard(sampler, num_processes=2, process_index=r) for r in (0, 1)]
    per_rank = [list(s) for s in shards]
    assert len(per_rank[0]) == len(per_rank[1]) == len(shards[0])
    seen = {i for batches in per_rank for b in batches for i in b}
    assert seen == set(range(len(src)))
    assert not {tuple(b) for b in per_rank[0][:-1]} & {tuple(b) for b in per_rank[1][:-1]}


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    src, tgt = _lengths()
    sampler = TokenBatchSampler(
        src, tgt, 2000, seed=5, num_replicas=dist.get_world_size(), rank=dist.get_rank()
    )
    sampler.set_epoch(1)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, list(sampler))
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def test_torch_distributed_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "batches.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    r0, r1 = torch.load(out)
    assert len(r0) == len(r1)
    src, _ = _lengths()
    assert {i for b in r0 + r1 for i in b} == set(range(len(src)))
    ref = TokenBatchSampler(*_lengths(), 2000, seed=5, num_replicas=2, rank=0)
    ref.set_epoch(1)
    assert list(ref) == r0


def test_dataloader_and_collator() -> None:
    import datasets

    rng = np.random.default_rng(0)
    rows = [rng.integers(4, 100, int(n)).tolist() + [3] for n in rng.integers(1, 30, 200)]
    ds = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows[::-1]})

    class Model:
        def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
            shifted = torch.full_like(labels, 0)
            shifted[:, 1:] = labels[:, :-1].clamp(min=0)
            shifted[:, 0] = 2
            return shifted

    from vaswani.tokenization import train_tokenizer

    tokenizer = train_tokenizer(["a small corpus of words"], 300, show_progress=False)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        build_dataloader(ds, 256)
    loader = build_dataloader(ds, 256, tokenizer=tokenizer, model=Model(), seed=0)
    seen = []
    for batch in loader:
        assert set(batch) == {"input_ids", "attention_mask", "labels", "decoder_input_ids"}
        rows_, width = batch["input_ids"].shape
        assert rows_ * max(width, batch["labels"].shape[1]) <= 256
        pad = tokenizer.pad_token_id
        assert torch.equal(batch["attention_mask"].sum(1), (batch["input_ids"] != pad).sum(1))
        for row in batch["labels"]:
            real = row[row != -100]
            assert real[-1] == 3 and torch.equal(row[: len(real)], real)  # -100 only after the last token
        assert (batch["decoder_input_ids"][:, 0] == 2).all()
        seen += batch["input_ids"].tolist()
    assert len(seen) == 200


@needs_multi30k
def test_padding_waste_far_below_random_on_multi30k() -> None:
    from vaswani.tokenization import train_tokenizer
    from vaswani.training.data import load_parallel_corpus, sequence_lengths, tokenize_corpus

    pairs, _ = load_parallel_corpus(MULTI30K / "train.en.gz", MULTI30K / "train.de.gz")
    sample = pairs.select(range(0, 29000, 3))
    tok = train_tokenizer(sample["source"][:2000] + sample["target"][:2000], 2000, show_progress=False)
    tokenized, _ = tokenize_corpus(sample, tok, max_length=None)
    src, tgt = sequence_lengths(tokenized, "input_ids"), sequence_lengths(tokenized, "labels")
    for max_tokens in (1000, 4000):
        grouped = batch_padding(list(TokenBatchSampler(src, tgt, max_tokens)), src, tgt)["waste"]
        shuffled = batch_padding(random_token_batches(src, tgt, max_tokens), src, tgt)["waste"]
        assert grouped < 0.1 and shuffled > 0.4 and grouped < shuffled / 4, (grouped, shuffled)
