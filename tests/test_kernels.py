"""The native decoding kernels (vaswani.kernels): the numbers of the torch code they stand in for, on the strided
operands the fused decoder layer gives them; built once per machine into the cache; torch's code where no compiler
builds them or they are turned off."""

from __future__ import annotations

import logging

import pytest
import torch

from vaswani import kernels
from vaswani.fused_decoder import attention

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler built vaswani's kernels here")


def _queries(sentences: int, heads: int, count: int, d_k: int) -> torch.Tensor:
    """Queries strided as the fused layer's are: one of Q, K, V split from a product's rows."""
    generator = torch.Generator().manual_seed(sentences * 100 + count)
    rows = torch.randn(sentences, count, 3, heads, d_k, generator=generator)
    return rows.transpose(1, 3)[:, :, 0]


def _out(like: torch.Tensor) -> torch.Tensor:
    """An output laid out as the layer's rows (``[sentences, queries, heads, d_k]``), seen as ``like``'s shape."""
    sentences, heads, count, d_k = like.shape
    return torch.full((sentences, count, heads, d_k), float("nan")).transpose(1, 2)


@needs_kernels
@pytest.mark.parametrize("length", [1, 3, 4, 13])  # below, at and past the kernel's blocks of 4 keys
@pytest.mark.parametrize("mask_kind", ["none", "boolean", "additive"])
@pytest.mark.parametrize("d_k", [64, 5])
def test_attend_is_eq_1(length, mask_kind, d_k):
    sentences, heads, count = 3, 2, 4
    generator = torch.Generator().manual_seed(length)
    keys, values = (torch.randn(sentences, heads, length, d_k, generator=generator) for _ in range(2))
    query = _queries(sentences, heads, count, d_k)
    mask = None
    if mask_kind != "none":
        allowed = torch.rand(sentences, 1, 1, length, generator=generator) > 0.4
        allowed[..., 0] = True  # every query sees a key
        mask = allowed.expand(-1, -1, count, -1)
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    out = _out(query)
    kernels.attend(query, keys, values, mask, out)
    torch.testing.assert_close(out, attention(query, keys, values, mask), rtol=0, atol=2e-6)


@needs_kernels
@pytest.mark.parametrize("positions", [1, 2, 7])
@pytest.mark.parametrize("count", [1, 3])  # a sentence's first position (one query for all beams), then each beam
def test_attend_slots_is_attention_over_each_hypothesis_prefix(positions, count):
    """Each hypothesis' prefix held one beam slot per position: attending to those keys alone is attending to all
    slots' keys with the mask that keeps them (what the torch code computes)."""
    sentences, heads, slots, d_k, steps = 2, 2, 3, 8, 9
    generator = torch.Generator().manual_seed(positions)
    keys, values = (torch.randn(sentences, heads, steps, slots, d_k, generator=generator) for _ in range(2))
    ancestry = torch.randint(0, slots, (sentences, slots, steps), generator=generator)
    query = _queries(sentences, heads, count, d_k)
    out = _out(query)
    kernels.attend_slots(query, keys, values, ancestry, positions, out)
    seen = ancestry[:, :count, :positions, None] == torch.arange(slots)  # [sentences, queries, positions, slots]
    mask = seen.flatten(2)[:, None]
    expected = attention(query, keys[:, :, :positions].flatten(2, 3), values[:, :, :positions].flatten(2, 3), mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)


@needs_kernels
def test_bad_operands_are_refused():
    query = _queries(1, 1, 1, 4)
    keys = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="float32"):
        kernels.attend(query.double(), keys, keys, None, _out(query))
    with pytest.raises(ValueError, match="contiguous last dimension"):
        kernels.attend(query, keys.transpose(-1, -2), keys.transpose(-1, -2), None, _out(query))
    with pytest.raises(ValueError, match="positions"):
        slots = torch.randn(1, 1, 2, 1, 4)
        kernels.attend_slots(query, slots, slots, torch.zeros(1, 1, 2, dtype=torch.long), 3, _out(query))


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """The kernels built again, into an empty cache, under this test's environment."""
    monkeypatch.setenv("VASWANI_CACHE", str(tmp_path))
    kernels.library.cache_clear()
    yield tmp_path
    kernels.library.cache_clear()


@needs_kernels
def test_built_once_into_the_cache(fresh_library, monkeypatch):
    assert kernels.available()
    built = list((fresh_library / "kernels").glob("kernels-*.so"))
    assert len(built) == 1
    kernels.library.cache_clear()
    monkeypatch.setattr(kernels.subprocess, "run", None)  # a second process must not compile again
    assert kernels.available()


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("VASWANI_KERNELS", "0")
    assert not kernels.available()


def test_without_a_compiler_torch_code_stays(fresh_library, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh_library / "no-such-compiler"))
    assert not kernels.available()
    assert not (fresh_library / "kernels").exists()


def test_a_failing_compiler_is_reported_once(fresh_library, monkeypatch, caplog):
    compiler = fresh_library / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    with caplog.at_level(logging.WARNING, logger="vaswani.kernels"):
        assert not kernels.available()
        assert not kernels.available()
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "broken-cc: cannot compile" in warnings[0]
    assert not list((fresh_library / "kernels").glob("*.so"))


@needs_kernels
@pytest.mark.parametrize("vocab", [8000, 97, 64 * 9 + 5])
@pytest.mark.parametrize("count", [1, 8])
def test_log_softmax_top_k_is_topk_of_log_softmax(vocab, count):
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(vocab)) * 4
    values, columns, normalizers = kernels.log_softmax_top_k(logits, count)
    expected = torch.log_softmax(logits, -1).topk(count)
    torch.testing.assert_close(values, expected.values, rtol=0, atol=2e-6)
    assert torch.equal(columns, expected.indices)
    torch.testing.assert_close(normalizers, torch.logsumexp(logits, -1), rtol=0, atol=2e-6)


@needs_kernels
def test_a_skipped_column_counts_in_the_normalizer_only():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    logits[:, 7] = 10.0  # the best column of every row
    skip = torch.tensor([True, False, True])
    values, columns, normalizers = kernels.log_softmax_top_k(logits, 4, skip, 7)
    log_probs = torch.log_softmax(logits, -1)
    assert (columns[skip] != 7).all() and (columns[~skip, 0] == 7).all()
    torch.testing.assert_close(values, log_probs.gather(1, columns), rtol=0, atol=2e-6)
    all_but_one = kernels.log_softmax_top_k(logits[:1], 50, skip[:1], 7)  # more columns asked than may be chosen
    assert all_but_one[1][0, -1] == 7 and all_but_one[0][0, -1] == float("-inf")


@needs_kernels
def test_best_continuations_keep_the_length_bounds(monkeypatch):
    """Rows that may not end yet never get </s>; rows at their limit get only </s> (-inf where it may not end
    either): the same candidates from the kernel as from log-softmax, the bounds and top-k in torch."""
    from vaswani.decoding import best_continuations

    eos, rows = 2, 6
    logits = torch.randn(rows, 300, generator=torch.Generator().manual_seed(1)) * 3
    logits[:, eos] = 8.0
    generated = torch.tensor([0, 1, 5, 9, 9, 3])
    least = torch.tensor([2, 0, 0, 0, 10, 0])  # row 0 too short, row 4 too short and at its limit
    limits = torch.tensor([20, 20, 20, 10, 10, 4])  # rows 3, 4, 5 at their limit
    native = best_continuations(logits.clone(), generated, limits, least, eos, 8)
    monkeypatch.setenv("VASWANI_KERNELS", "0")
    expected = best_continuations(logits.clone(), generated, limits, least, eos, 8)
    torch.testing.assert_close(native[0], expected[0], rtol=0, atol=2e-6)
    finite = expected[0].isfinite()
    assert torch.equal(native[1][finite], expected[1][finite])
    assert (native[1][0] != eos).all() and native[0][4].isinf().all() and (native[1][[3, 5], 0] == eos).all()
