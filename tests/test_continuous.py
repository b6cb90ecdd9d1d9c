"""Continuous batching (vaswani.decoding.beam_search_stream, model.generate_stream): later batches join the beam
search while earlier ones finish, and every batch gets the tokens one generate() call gives it."""

import random

import pytest
import torch
from helpers import fixture_lines, padded_batch, tiny_model
from test_decoding import _model, _random_request
from translation_helpers import make_model_folder

from vaswani import decoding
from vaswani.cpu_linears import can_prepack, pack_linear_layers
from vaswani.fused_decoder import fuse_decoder_layers
from vaswani.translate import load_translation_model, translate

pytestmark = pytest.mark.skipif(not can_prepack(), reason="continuous batching needs the fused decoder layers")


def _fused(model):
    return fuse_decoder_layers(pack_linear_layers(model.eval()))


def _batches(rng: random.Random, count: int) -> list[dict]:
    """Batches of 1-5 sentences of 2-12 tokens, longest first within each (as translate's batches are)."""
    batches = []
    for index in range(count):
        lengths = sorted((rng.randint(2, 12) for _ in range(rng.randint(1, 5))), reverse=True)
        ids, mask = padded_batch(lengths=tuple(lengths), seed=index + 100 * rng.randint(0, 9))
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.fixture
def joins(monkeypatch):
    """How many batches joined a search that was already running (a list holding the count)."""
    count = [0]
    original = decoding.Beams.join

    def counted(self, other, fill):
        count[0] += 1
        return original(self, other, fill)

    monkeypatch.setattr(decoding.Beams, "join", counted)
    return count


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("refill_below", [0.25, 1.0, 100.0])  # 100: every batch joins at once
def test_stream_gives_each_batch_the_tokens_of_its_own_generate(seed, refill_below, joins):
    rng = random.Random(seed)
    model = _fused(_model(seed, eos_bias=rng.choice([0.0, 2.0]), sharpness=rng.choice([1.0, 4.0])))
    kwargs = _random_request(rng)
    batches = _batches(rng, count=4)
    with torch.no_grad():
        alone = [model.generate(**batch, **kwargs) for batch in batches]
        together = list(model.generate_stream(iter(batches), refill_below=refill_below, **kwargs))
    assert len(together) == len(alone)
    for got, expected in zip(together, alone):
        assert got.shape == expected.shape and torch.equal(got, expected), (kwargs, got, expected)
    if kwargs["num_beams"] > 1 and refill_below == 100.0:
        assert joins[0] == len(batches) - 1  # all batches were searched together


@pytest.mark.parametrize("num_beams", [1, 3])
def test_self_attention_buffers_grow_and_are_reused_with_the_same_tokens(num_beams, monkeypatch):
    model = _fused(_model(11))  # no </s> bias: sentences run for many steps
    batches = _batches(random.Random(12), count=4)
    kwargs = {"num_beams": num_beams, "max_new_tokens": 24}
    with torch.no_grad():
        expected = [model.generate(**batch, decoding_loop="transformers", **kwargs) for batch in batches]
        monkeypatch.setattr(decoding, "FIRST_CACHE_STEPS", 1)  # room for 1, 2, 4, ... positions
        grown, reused, take = [0], [0], decoding.SpareBuffers.take

        def counted(self, shape, like):
            spare = len(self.free)
            buffer = take(self, shape, like)
            grown[0] += shape[2] > 1
            reused[0] += len(self.free) < spare
            return buffer

        monkeypatch.setattr(decoding.SpareBuffers, "take", counted)
        stream = list(model.generate_stream(iter(batches), refill_below=0.25, **kwargs))
        one = [model.generate(**batch, **kwargs) for batch in batches]
    assert all(torch.equal(a, b) for a, b in zip(stream, expected)) and all(map(torch.equal, one, expected))
    assert expected[0].shape[1] > 10 and grown[0]
    assert reused[0] if num_beams > 1 else not reused[0]  # greedy search runs a batch at a time, nothing to hand on


def test_batches_a_loop_cannot_serve_are_generated_alone_in_order():
    model = _fused(_model(3, eos_bias=2.0, sharpness=4.0))
    batches = _batches(random.Random(5), count=3)
    kwargs = {"num_beams": 3, "length_penalty": 1.0}
    with torch.no_grad():
        expected = [model.generate(**batch, **kwargs) for batch in batches]
        # transformers' own loop: every batch alone, the outputs still in order
        theirs = list(model.generate_stream(iter(batches), decoding_loop="transformers", **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(theirs, expected))


def test_the_model_s_own_layers_decode_one_batch_at_a_time(joins):
    model = _model(4, eos_bias=2.0, sharpness=4.0).eval()  # not fused: nothing to gain from joining
    batches = _batches(random.Random(6), count=3)
    with torch.no_grad():
        expected = [model.generate(**batch, num_beams=4) for batch in batches]
        got = list(model.generate_stream(iter(batches), num_beams=4, refill_below=100.0))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert joins[0] == 0


def test_batches_are_read_as_the_search_needs_them():
    model = _fused(_model(7, eos_bias=2.0, sharpness=4.0))
    batches, read = _batches(random.Random(8), count=5), []

    def reading():
        for batch in batches:
            read.append(1)
            yield batch

    with torch.no_grad():
        stream = model.generate_stream(reading(), num_beams=4, refill_below=0.25)
        next(stream)
        assert len(read) < len(batches)
        assert len(list(stream)) == len(batches) - 1


def test_logits_of_two_decoders_together_match_each_alone():
    model = _fused(tiny_model(seed=9))
    batches = [padded_batch(lengths=(8, 5)), padded_batch(lengths=(4, 4, 2), seed=3)]
    with torch.no_grad():
        states = [model.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state for ids, mask in batches]

        def decoder(index: int) -> decoding.IncrementalDecoder:
            return decoding.IncrementalDecoder(model, states[index], batches[index][1], beams=2, steps=6)

        alone, together = [decoder(0)], [decoder(0)]
        tokens = [torch.full((4,), 2)]
        for step in range(4):
            if step == 1:  # the second batch joins a step later, at its own first position
                alone.append(decoder(1))
                together.append(decoder(1))
                tokens.append(torch.full((6,), 2))
            expected = torch.cat([one.next_token_logits(t) for one, t in zip(alone, tokens)])
            got = decoding.next_token_logits_of(together, tokens)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            tokens = [(t * 7 + step) % 90 + 4 for t in tokens]


def test_translate_with_and_without_continuous_batching_agree(tmp_path, joins):
    model, tokenizer = load_translation_model(make_model_folder(tmp_path / "model"))
    sentences = fixture_lines("en")
    # each limit is the source length + 1: the shorter sentences of a batch end first, and the next batch joins
    decoding_settings = {"num_beams": 4, "max_len_a": 1.0, "max_len_b": 1, "max_tokens": 120}
    stream = translate(model, tokenizer, sentences, **decoding_settings)
    assert joins[0] > 0
    alone = translate(model, tokenizer, sentences, continuous_batching=False, **decoding_settings)
    assert stream == alone and len(stream) == len(sentences)
