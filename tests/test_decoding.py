"""Our decoding loop (vaswani.decoding) gives transformers' tokens, and falls back where it does not apply."""

import random

import pytest
import torch
from helpers import padded_batch, tiny_model

from vaswani import decoding, generation

EOS = 3


@pytest.fixture
def loop_calls(monkeypatch):
    """Counts the requests our loop served."""
    calls = []
    for name in ("beam_search", "greedy_search"):
        function = getattr(decoding, name)
        monkeypatch.setattr(generation, name, lambda *a, _f=function, **k: calls.append(1) or _f(*a, **k))
    return calls


def _model(seed: int, eos_bias: float = 0.0, sharpness: float = 1.0, **config):
    """A tiny random model; a sharper output layer and a boosted </s> make sentences end at different steps."""
    model = tiny_model(seed=seed, lm_head_bias=True, **config)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
        model.lm_head.bias[EOS] = eos_bias
    return model


def _same_as_transformers(model, loop_calls, ids, mask, **kwargs) -> torch.Tensor:
    served = len(loop_calls)
    ours = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert len(loop_calls) == served + 1, "our loop should have served this request"
    theirs = model.generate(input_ids=ids, attention_mask=mask, decoding_loop="transformers", **kwargs)
    assert len(loop_calls) == served + 1
    assert ours.shape == theirs.shape and torch.equal(ours, theirs), (kwargs, ours, theirs)
    return ours


def _random_request(rng: random.Random) -> dict:
    kwargs = {
        "num_beams": rng.choice([1, 2, 4, 5]),
        "length_penalty": rng.choice([0.0, 0.6, 1.0]),
        "length_penalty_type": rng.choice(["hf", "gnmt"]),
        "early_stopping": rng.choice([True, False, "never"]),
    }
    limit = rng.random()
    if limit < 0.3:
        kwargs["max_new_tokens"] = rng.randint(1, 15)
    elif limit < 0.6:
        kwargs.update(max_len_a=rng.choice([0.5, 1.0]), max_len_b=rng.randint(2, 6))  # else the paper's a=1, b=50
    if rng.random() < 0.3:
        kwargs["min_new_tokens"] = rng.randint(0, 2)
    return kwargs


@pytest.mark.parametrize("seed", range(24))
@torch.no_grad()
def test_random_requests_match_transformers(seed, loop_calls):
    """Padded batches of varied lengths, beams 1/2/4/5, both penalties, α 0/0.6/1, all early_stopping values,
    per-sentence limits, max/min_new_tokens, sdpa and eager, pre- and post-norm, tied and untied."""
    rng = random.Random(seed)
    config = {
        "normalize_before": seed % 2 == 0,
        "tie_word_embeddings": seed % 3 != 0,
        "attn_implementation": "eager" if seed % 4 == 1 else "sdpa",
    }
    model = _model(seed, eos_bias=rng.choice([0.0, 3.0, 6.0]), sharpness=rng.choice([1.0, 4.0]), **config)
    lengths = tuple(rng.randint(2, 12) for _ in range(rng.randint(1, 6)))
    ids, mask = padded_batch(lengths=lengths, seed=seed)
    _same_as_transformers(model, loop_calls, ids, mask, **_random_request(rng))


@pytest.mark.parametrize(
    ("num_beams", "seed", "sharpness", "eos_bias"), [(1, 8, 1.0, 3.0), (4, 7, 1.0, 3.0), (4, 8, 2.0, 5.0)]
)
@torch.no_grad()
def test_sentences_ending_at_different_steps(num_beams, seed, sharpness, eos_bias, loop_calls):
    """With </s> likely (models picked so), sentences end at different steps and leave the batch one by one."""
    model = _model(seed, eos_bias=eos_bias, sharpness=sharpness)
    ids, mask = padded_batch(lengths=(9, 2, 7, 4, 11, 3), seed=3)
    request = {"num_beams": num_beams, "max_new_tokens": 20, "min_new_tokens": 2}
    out = _same_as_transformers(model, loop_calls, ids, mask, **request)
    ends = {row.index(EOS) if EOS in row else None for row in out[:, 1:].tolist()}
    assert len(ends - {None}) >= 2, ends


@pytest.mark.parametrize("vocab_size", [5, 9])
@torch.no_grad()
def test_vocabulary_smaller_than_twice_the_beams(vocab_size, loop_calls):
    """Each beam's best 2k continuations are all of its vocabulary when that has fewer than 2k tokens."""
    model = _model(3, eos_bias=1.0, vocab_size=vocab_size)
    ids, mask = padded_batch(lengths=(6, 3, 5), seed=4, vocab_size=vocab_size)
    _same_as_transformers(model, loop_calls, ids, mask, num_beams=5, max_new_tokens=8)


@torch.no_grad()
def test_model_bench_request(loop_calls):
    """model_bench.py's shape of request: min_new_tokens == max_new_tokens, early stopping, α = 1."""
    model = _model(1, eos_bias=3.0)
    ids, mask = padded_batch(lengths=(8, 5, 12), seed=2)
    request = {"num_beams": 4, "max_new_tokens": 9, "min_new_tokens": 9, "early_stopping": True, "length_penalty": 1.0}
    out = _same_as_transformers(model, loop_calls, ids, mask, **request)
    assert out.shape == (3, 10)


@pytest.mark.parametrize(
    "option",
    [{"do_sample": True}, {"output_scores": True, "return_dict_in_generate": True}, {"no_repeat_ngram_size": 2}],
)
@torch.no_grad()
def test_unsupported_options_fall_back_to_transformers(option, loop_calls):
    model = _model(4, eos_bias=3.0)
    ids, mask = padded_batch()
    results = []
    for loop in ("vaswani", "transformers"):
        torch.manual_seed(0)
        results.append(model.generate(input_ids=ids, attention_mask=mask, decoding_loop=loop, **option))
    assert not loop_calls
    if isinstance(results[0], torch.Tensor):
        assert torch.equal(*results)
    else:
        assert torch.equal(results[0].sequences, results[1].sequences)


def test_supported_check_names_what_it_cannot_do():
    model = tiny_model()
    ids = torch.full((2, 1), 2)
    config = model.generation_config
    config.update(do_sample=True, num_return_sequences=2, max_length=10)
    config._eos_token_tensor = torch.tensor([3])
    missing = decoding.unsupported_options(model, ids, [], [], config, {"decoder_attention_mask": None})
    assert missing == ["sampling", "num_return_sequences > 1", "model inputs ['decoder_attention_mask']"]


def test_unknown_decoding_loop_is_refused(model):
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="decoding_loop='fast'"):
        model.generate(input_ids=ids, attention_mask=mask, decoding_loop="fast")


@torch.no_grad()
def test_generation_config_field_selects_the_loop(loop_calls):
    model = _model(2, eos_bias=3.0)
    ids, mask = padded_batch()
    model.generation_config.decoding_loop = "transformers"
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5)
    assert not loop_calls


@pytest.mark.parametrize("shape", [(1, 7), (5, 8003), (64, 300)])
def test_log_softmax_in_place_is_torch_log_softmax_bit_for_bit(shape):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * 20
    logits[0, 0] = -float("inf")
    expected = torch.log_softmax(logits, dim=-1)
    result = decoding.log_softmax_in_place(logits)
    assert result.data_ptr() == logits.data_ptr() and torch.equal(result, expected)
