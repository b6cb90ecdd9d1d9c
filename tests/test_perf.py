"""The CPU speed-ups: explicit attention for short training sequences, beam reordering that leaves the
encoder-decoder cache alone, and the opt-in allocator setting. Each must compute what the plain path does."""

import subprocess
import sys

import pytest
import torch
from conftest import padded_batch, tiny_model
from transformers import GenerationConfig

from vaswani import modeling, perf


def _train_outputs(model, implementation, grad, batch):
    model.set_attn_implementation(implementation)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        out = model(**batch)
    if not grad:
        return out.logits, None
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("decoder_mask", [False, True])
def test_sdpa_training_on_cpu_matches_eager_and_torch_kernel(decoder_mask):
    """In training "sdpa" runs Eq. 1 written out: bitwise what "eager" computes (padding, causal and cross
    masks included), and equal to torch's fused kernel up to rounding."""
    ids, mask = padded_batch(lengths=(9, 6, 3))
    labels, label_mask = padded_batch(lengths=(4, 8, 5), seed=2)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels.masked_fill(label_mask == 0, -100)}
    if decoder_mask:
        batch["decoder_attention_mask"] = label_mask
    model = tiny_model()
    sdpa_logits, sdpa_grads = _train_outputs(model, "sdpa", True, batch)
    eager_logits, eager_grads = _train_outputs(model, "eager", True, batch)
    kernel_logits, _ = _train_outputs(model, "sdpa", False, batch)  # no gradients: torch's kernel
    assert torch.equal(sdpa_logits, eager_logits)
    assert sdpa_grads.keys() == eager_grads.keys()
    assert all(torch.equal(sdpa_grads[n], eager_grads[n]) for n in sdpa_grads)
    torch.testing.assert_close(sdpa_logits, kernel_logits, rtol=1e-5, atol=1e-5)


def test_long_sequences_keep_torch_kernel():
    query = torch.zeros(1, 1, 4, 8, requires_grad=True)
    short, long = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, modeling.EXPLICIT_ATTENTION_MAX_KEYS + 1, 8)
    assert modeling._explicit_attention_is_faster(query, short)
    assert not modeling._explicit_attention_is_faster(query, long)
    assert not modeling._explicit_attention_is_faster(query.detach(), short)
    with torch.no_grad():
        assert not modeling._explicit_attention_is_faster(query, short)


def test_additive_mask_from_sdpa_masks():
    allowed = torch.tensor([[[[True, True, False]]]])
    additive = modeling._additive_mask(allowed, False, 1, 3, torch.device("cpu"))
    assert additive[0, 0, 0, :2].eq(0).all() and additive[0, 0, 0, 2] == torch.finfo(torch.float32).min
    causal = modeling._additive_mask(None, True, 2, 3, torch.device("cpu"))  # 1 cached position + 2 new
    assert (causal == 0).tolist() == [[True, True, False], [True, True, True]]
    assert modeling._additive_mask(None, False, 3, 3, torch.device("cpu")) is None


@pytest.mark.parametrize("lengths", [(9, 6, 3), (7, 7, 5, 7)])
def test_beam_search_same_with_plain_cache_reordering(lengths, monkeypatch):
    """Leaving the encoder-decoder cache in place gives the tokens and scores of reordering it every step,
    also when two sentences of the batch are the same (rows of one class across sentences)."""
    model = tiny_model()
    ids, mask = padded_batch(lengths=lengths)
    if len(lengths) == 4:
        ids[3], mask[3] = ids[0], mask[0]
    config = GenerationConfig(
        num_beams=4, max_new_tokens=8, min_new_tokens=8, pad_token_id=0, eos_token_id=3, decoder_start_token_id=2
    )

    def run():
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                return_dict_in_generate=True,
                output_scores=True,
            )
        return out.sequences, out.sequences_scores

    fast_ids, fast_scores = run()
    monkeypatch.delattr(modeling.VaswaniForConditionalGeneration, "_reorder_cache")
    plain_ids, plain_scores = run()
    assert torch.equal(fast_ids, plain_ids)
    assert torch.equal(fast_scores, plain_scores)


def test_row_classes_group_beams_of_a_sentence():
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    states = torch.randn(2, 1, 3, 4).repeat_interleave(3, dim=0)  # 2 sentences x 3 beams
    cache.update(states, states + 1, 0)
    cache.update(states * 2, states, 1)
    classes = modeling._identical_row_classes(cache)
    assert classes.tolist() in ([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])
    assert modeling._identical_row_classes(cache) is classes  # remembered while the tensors are the same
    cache.reset()  # a reused cache with new contents is looked at again
    fresh = torch.randn(6, 1, 3, 4)
    cache.update(fresh, fresh, 0)
    cache.update(fresh, fresh, 1)
    assert sorted(modeling._identical_row_classes(cache).tolist()) == list(range(6))
    other = DynamicCache()
    other.update(states, states, 0)
    second = states.clone()
    second[1] += 1  # same first-layer keys, different second layer: every row on its own
    other.update(states, second, 1)
    assert modeling._identical_row_classes(other).tolist() == list(range(6))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tune_allocator_is_opt_in():
    """Importing the package changes nothing; tune_allocator() sets glibc's options (in a fresh process)."""
    code = (
        "import vaswani, vaswani.perf as p; assert p.allocator_settings() is None; "
        "print(p.tune_allocator(), p.allocator_settings())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] in ("True", "False")
    if out.startswith("True"):
        assert "'mmap_max': 0" in out


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_keeps_1_minus_p_scaled_and_backpropagates_through_the_same_mask(p, dtype):
    x = torch.full((1000, 1000), 2.0, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    y = modeling.apply_dropout(x, p)
    kept = y != 0
    assert y.dtype == dtype
    assert abs(kept.float().mean().item() - (1 - p)) < 0.003  # 1M draws: std 0.0005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / (1 - p)))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.to(dtype) / (1 - p))
    torch.manual_seed(0)
    assert torch.equal(modeling.apply_dropout(x.detach(), p), y.detach())  # the seeded generator decides


def test_dropout_is_identity_in_eval_and_at_zero():
    x = torch.randn(3, 5)
    assert modeling.apply_dropout(x, 0.3, training=False) is x
    assert modeling.apply_dropout(x, 0.0) is x
    layer = modeling.Dropout(0.3).eval()
    assert layer(x) is x
    assert torch.equal(modeling.apply_dropout(x, 1.0), torch.zeros_like(x))


def test_tune_cpu_training_flushes_denormals():
    before = torch.tensor([1e-39])
    assert before.item() != 0.0
    try:
        settings = perf.tune_cpu_training()
        if settings["flush_denormals"]:
            assert (torch.tensor([1e-39]) * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        ("processor : 0\nflags : fpu sse avx512f avx512_bf16 amx_tile\n", True),  # x86 with AVX512-BF16
        ("processor : 0\nflags : fpu sse avx2 avx512f\n", False),  # AVX-512 without bf16: emulated
        ("processor : 0\nFeatures : fp asimd bf16 i8mm\n", True),  # Arm
        (None, False),  # no /proc/cpuinfo (macOS, Windows)
    ],
)
def test_has_fast_bf16_reads_the_cpu_flags(cpuinfo, expected, monkeypatch):
    import builtins
    import io

    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if path != "/proc/cpuinfo":
            return real_open(path, *args, **kwargs)
        if cpuinfo is None:
            raise FileNotFoundError(path)
        return io.StringIO(cpuinfo)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(builtins, "open", fake_open)
    assert perf.has_fast_bf16() is expected
