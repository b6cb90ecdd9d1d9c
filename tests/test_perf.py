"""The CPU speed-ups outside the model: beam reordering that leaves the encoder-decoder cache alone, and the
allocator and CPU settings (applied when a model first trains, or by hand). Each must compute what the plain
path does (the training paths: test_unpadded.py)."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import padded_batch, tiny_model
from transformers import GenerationConfig

from vaswani import generation, perf


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
    monkeypatch.delattr(generation.VaswaniGenerationMixin, "_reorder_cache")
    plain_ids, plain_scores = run()
    assert torch.equal(fast_ids, plain_ids)
    assert torch.equal(fast_scores, plain_scores)


def test_row_classes_group_beams_of_a_sentence():
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    states = torch.randn(2, 1, 3, 4).repeat_interleave(3, dim=0)  # 2 sentences x 3 beams
    cache.update(states, states + 1, 0)
    cache.update(states * 2, states, 1)
    classes = generation.identical_row_classes(cache)
    assert classes.tolist() in ([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])
    assert generation.identical_row_classes(cache) is classes  # remembered while the tensors are the same
    cache.reset()  # a reused cache with new contents is looked at again
    fresh = torch.randn(6, 1, 3, 4)
    cache.update(fresh, fresh, 0)
    cache.update(fresh, fresh, 1)
    assert sorted(generation.identical_row_classes(cache).tolist()) == list(range(6))
    other = DynamicCache()
    other.update(states, states, 0)
    second = states.clone()
    second[1] += 1  # same first-layer keys, different second layer: every row on its own
    other.update(states, second, 1)
    assert generation.identical_row_classes(other).tolist() == list(range(6))


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


#: A fresh process with a tiny model in eval mode, untuned; ``{action}`` starts training or decoding, then it prints
#: the allocator settings and whether denormals are flushed.
TUNING_PROBE = (
    "import torch, vaswani.perf as p\n"
    "from vaswani import VaswaniConfig, VaswaniForConditionalGeneration\n"
    "model = VaswaniForConditionalGeneration(VaswaniConfig.from_preset('tiny', vocab_size=32)).eval()\n"
    "assert p.allocator_settings() is None and (torch.tensor([1e-39]) * 1.0).item() != 0.0\n"
    "{action}\n"
    "print(p.allocator_settings(), (torch.tensor([1e-39]) * 1.0).item() == 0.0)\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize("setting", [None, "0"])
@pytest.mark.parametrize(
    ("action", "flushes"),
    [
        ("model.train()", True),  # training gets both settings
        ("model.generate(torch.tensor([[5, 6, 2]]), num_beams=2, max_new_tokens=3)", False),  # decoding: allocator
    ],
)
def test_a_model_tunes_the_cpu_when_it_first_trains_or_generates(setting, action, flushes):
    """A Trainer or a hand-written loop gets ``vaswani train``'s process settings from ``model.train()``, and
    ``generate()`` (so ``translate``, ``pipeline`` and ``vaswani translate``) the allocator setting alone
    (denormals stay as they are in inference): not at construction or in eval mode, and not with
    ``VASWANI_TUNE_CPU=0``."""
    env = {key: value for key, value in os.environ.items() if key != perf.TUNE_ENV}
    if setting is not None:
        env[perf.TUNE_ENV] = setting
    code = TUNING_PROBE.format(action=action)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    if setting == "0":
        assert out.stdout.split() == ["None", "False"]
    else:
        assert "'mmap_max': 0" in out.stdout and out.stdout.split()[-1] == str(flushes)


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
    ("cpuinfo", "speedup", "expected"),
    [
        ("processor : 0\nflags : fpu sse avx512f avx512_bf16 amx_tile\n", 4.0, True),  # x86 with AMX, measured
        ("processor : 0\nflags : fpu sse avx512f avx512_bf16\n", 2.1, True),  # AVX512-BF16 without AMX, measured
        ("processor : 0\nflags : fpu sse avx512f avx512_bf16\n", 1.1, False),  # the flag, but no measured gain
        ("processor : 0\nflags : fpu sse avx2 avx512f\n", None, False),  # AVX-512 without bf16: emulated
        ("processor : 0\nFeatures : fp asimd bf16 i8mm\n", 2.0, True),  # Arm
        (None, None, False),  # no /proc/cpuinfo (macOS, Windows)
    ],
)
def test_has_fast_bf16_needs_the_flags_and_a_measured_gain(cpuinfo, speedup, expected, monkeypatch):
    """The flags decide whether measuring is worth it (emulated bf16 would take seconds); the measurement decides."""

    def measured() -> float:
        assert speedup is not None, "measured bf16 on a CPU without bf16 products"
        return speedup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fake_cpuinfo(monkeypatch, cpuinfo)
    monkeypatch.setattr(perf, "bf16_speedup", measured)
    assert perf.has_fast_bf16() is expected


def _fake_cpuinfo(monkeypatch, text: str | None) -> None:
    """``/proc/cpuinfo`` reads as ``text`` (None: there is no such file, as on macOS or Windows)."""
    import builtins
    import io

    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if path != "/proc/cpuinfo":
            return real_open(path, *args, **kwargs)
        if text is None:
            raise FileNotFoundError(path)
        return io.StringIO(text)

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize(
    ("cpuinfo", "emulated"),
    [
        ("processor : 0\nflags : fpu sse avx2 fma\n", True),  # AVX2 only (e.g. AMD Zen 3)
        ("processor : 0\nflags : fpu sse avx2 avx512f\n", True),  # AVX-512 without bf16
        ("processor : 0\nflags : fpu sse avx512f avx512_bf16\n", False),
        ("processor : 0\nFeatures : fp asimd bf16 i8mm\n", False),  # Arm
        (None, False),  # flags unknown: no warning on a guess
    ],
)
def test_bf16_on_a_cpu_that_emulates_it_warns(cpuinfo, emulated, monkeypatch, recwarn):
    """Asking for bf16 where the CPU has no bf16 products warns, naming the fix; elsewhere nothing is said."""
    _fake_cpuinfo(monkeypatch, cpuinfo)
    assert perf.bf16_is_emulated() is emulated
    perf.warn_if_bf16_emulated("training")
    said = [str(w.message) for w in recwarn if "bf16 products" in str(w.message)]
    assert said == (["training in bfloat16 on a CPU without bf16 products (amx_bf16, avx512_bf16, bf16 in "
                     "/proc/cpuinfo): PyTorch emulates them, many times slower than float32; use float32 on this "
                     "machine"] if emulated else [])


def test_bf16_speedup_measures_a_ratio_of_matrix_products():
    """A positive ratio from a small product (correctness of the measurement, not a speed claim)."""
    assert perf.bf16_speedup.__wrapped__(n=64, repeats=1) > 0
