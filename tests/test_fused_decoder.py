"""The decoder layer fused for CPU decoding (vaswani.fused_decoder): the same search results and logits as the
model's own layers, in our decoding loop and in transformers'; the layer's own forward everywhere else; weights
packed again when they change; adapters and hooks respected. And the blockwise top-k of beam search."""

from __future__ import annotations

import pytest
import torch
from helpers import padded_batch, tiny_model
from torch import nn

from vaswani import kernels
from vaswani.cpu_linears import can_prepack, pack_linear_layers
from vaswani.decoding import TOP_K_BLOCK, top_k_per_row
from vaswani.fused_decoder import FusedDecoderLayer, fuse_decoder_layers
from vaswani.modeling import DecoderLayer

pytestmark = pytest.mark.skipif(not can_prepack(), reason="this torch has no oneDNN prepacked linear")

SEARCHES = ({"num_beams": 4}, {"num_beams": 1}, {"num_beams": 3, "length_penalty": 1.3, "early_stopping": False})


def _fused(model: nn.Module) -> int:
    return sum(type(module) is FusedDecoderLayer for module in model.modules())


@pytest.fixture
def count_fused(monkeypatch):
    """How many layer calls took the fused path (a list holding the count)."""
    calls = [0]
    original = FusedDecoderLayer._fused_weights

    def counting(self, *args):
        weights = original(self, *args)
        calls[0] += weights is not None
        return weights

    monkeypatch.setattr(FusedDecoderLayer, "_fused_weights", counting)
    return calls


@pytest.fixture(params=["kernels", "torch"])
def step_code(request, monkeypatch):
    """Each test using it runs once with the native step kernels (vaswani.kernels) and once with torch's code."""
    if request.param == "kernels" and not kernels.available():
        pytest.skip("no C compiler built vaswani's kernels here")
    monkeypatch.setenv("VASWANI_KERNELS", "1" if request.param == "kernels" else "0")
    return request.param


@pytest.mark.parametrize("loop", ["vaswani", "transformers"])
@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("normalize_before", [False, True])
def test_search_results_are_those_of_the_model_layers(
    loop, search, normalize_before, count_fused, products_backend, step_code
):
    model = tiny_model(seed=3, normalize_before=normalize_before)
    ids, mask = padded_batch(lengths=(9, 6, 3, 7))
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 12, "decoding_loop": loop, **search}
    expected = model.generate(**kwargs)
    fuse_decoder_layers(pack_linear_layers(model))
    assert _fused(model) == model.config.decoder_layers
    assert torch.equal(model.generate(**kwargs), expected)
    assert count_fused[0] > 0  # the fused path ran (transformers' loop: from its second step, cross K/V cached)


@pytest.mark.parametrize("activation", ["relu", "gelu"])  # ReLU inside the product; GELU after it
@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # boolean masks; additive masks
def test_step_logits_match_the_model_layers_within_1e_5(activation, attention, products_backend, step_code):
    from vaswani.decoding import IncrementalDecoder

    model = tiny_model(seed=5, activation_function=activation)
    model.set_attn_implementation(attention)
    ids, mask = padded_batch(lengths=(8, 5))
    tokens = torch.tensor([[2, 7, 9, 11, 13, 17], [2, 8, 10, 12, 14, 16]])
    with torch.no_grad():
        encoder_states = model.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state

        def step_logits() -> list[torch.Tensor]:
            decoder = IncrementalDecoder(model, encoder_states, mask, beams=1, steps=tokens.shape[1])
            return [decoder.next_token_logits(tokens[:, step]) for step in range(tokens.shape[1])]

        expected = step_logits()
        fuse_decoder_layers(model)
        got = step_logits()
    for step_got, step_expected in zip(got, expected):
        torch.testing.assert_close(step_got, step_expected, rtol=0, atol=1e-5)


def test_rows_are_padded_only_for_the_backend_that_wants_it(products_backend, monkeypatch):
    """oneDNN's products get a multiple of ROW_MULTIPLE rows (few kernels to compile); MKL's get the hypotheses'
    rows alone, as padding would only add rows to multiply. (That the logits are the model layers' with either
    backend is test_step_logits_match_the_model_layers_within_1e_5.)"""
    from vaswani import fused_decoder
    from vaswani.cpu_linears import ROW_MULTIPLE, row_multiple
    from vaswani.decoding import IncrementalDecoder

    model = fuse_decoder_layers(pack_linear_layers(tiny_model(seed=6)))
    ids, mask = padded_batch(lengths=(8, 5, 6))
    rows_multiplied = []
    original = fused_decoder.product

    def recording(x, *args, **kwargs):
        rows_multiplied.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(fused_decoder, "product", recording)
    with torch.no_grad():
        encoder_states = model.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        beams = 3  # 3 sentences × 3 beams: 9 rows, not a multiple of ROW_MULTIPLE
        decoder = IncrementalDecoder(model, encoder_states, mask, beams=beams, steps=2)
        decoder.next_token_logits(torch.full((9,), 2))  # the first position: one row per sentence
        rows_multiplied.clear()
        logits = decoder.next_token_logits(torch.full((9,), 7))
    expected = ROW_MULTIPLE if products_backend == "onednn" else 1
    assert row_multiple() == expected
    assert rows_multiplied and set(rows_multiplied) == {9 + -9 % expected}
    assert logits.shape == (9, model.config.vocab_size) and torch.isfinite(logits).all()


def test_the_layers_own_forward_runs_in_training_and_with_gradients(count_fused):
    model = fuse_decoder_layers(tiny_model(seed=1))
    ids, mask = padded_batch()
    labels = ids.clone()
    model.train()(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert model.model.decoder.layers[0].self_attn.q_proj.weight.grad is not None
    model.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4])  # no cache: the layer's forward
    assert count_fused[0] == 0


def test_changed_weights_are_packed_again(products_backend):
    model = fuse_decoder_layers(tiny_model(seed=2))
    ids, mask = padded_batch(lengths=(7, 4))
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 10, "num_beams": 3}
    model.generate(**kwargs)  # packs the weights
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.feed_forward.fc1.weight.mul_(-1.5)
            layer.self_attn.v_proj.bias.add_(0.3)
    fused = model.generate(**kwargs)
    for layer in model.model.decoder.layers:
        layer.__class__ = DecoderLayer
    assert torch.equal(fused, model.generate(**kwargs))


def test_hooks_and_adapters_keep_the_layers_own_forward(count_fused):
    model = fuse_decoder_layers(tiny_model(seed=4))
    ids, mask = padded_batch(lengths=(6, 5))
    seen = []
    model.model.decoder.layers[0].self_attn.k_proj.register_forward_hook(lambda *args: seen.append(1))
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2)
    assert seen  # the hooked layer ran as itself
    calls_with_hook = count_fused[0]
    assert calls_with_hook > 0  # the other decoder layer was still fused


def test_saved_fused_model_loads_as_the_plain_model(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model = fuse_decoder_layers(pack_linear_layers(tiny_model(seed=6)))
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "saved")
    assert _fused(loaded) == 0 and loaded.state_dict().keys() == model.state_dict().keys()
    ids, mask = padded_batch()
    assert torch.equal(loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8),
                       model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8))


@pytest.mark.parametrize("vocab", [8000, 8000 + 37, 97, 64 * 9])
@pytest.mark.parametrize("k", [1, 8])
def test_top_k_per_row_is_topk(vocab, k):
    generator = torch.Generator().manual_seed(vocab + k)
    scores = torch.randn(13, vocab, generator=generator) * 4
    scores[3, -5] = 50.0  # a best score in the columns past the last whole block
    good = min(2 * TOP_K_BLOCK, vocab)
    scores[4, :good] = 40.0 + torch.arange(good) / 1000  # many good scores in the first two blocks
    values, columns = top_k_per_row(scores, k)
    expected_values, expected_columns = torch.topk(scores, k)
    assert torch.equal(values, expected_values) and torch.equal(columns, expected_columns)


def test_top_k_per_row_with_minus_infinity():
    scores = torch.full((2, 4000), -torch.inf)
    scores[0, 1234] = -0.5  # the only allowed token (a sentence at its length limit)
    scores[1] = torch.linspace(-9, 0, 4000)
    values, columns = top_k_per_row(scores, 8)
    assert values[0, 0] == -0.5 and columns[0, 0] == 1234 and torch.isinf(values[0, 1:]).all()
    assert torch.equal(columns[1], torch.arange(3999, 3991, -1))
