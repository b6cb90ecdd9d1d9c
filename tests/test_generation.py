"""The paper's decoding (§6.1): GNMT length penalty, per-sentence output limit, transformers' options intact."""

import pytest
import torch
from helpers import padded_batch, tiny_model
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList

from vaswani import VaswaniForConditionalGeneration
from vaswani.decoding import gnmt_length_penalty
from vaswani.generation import PAPER_GENERATION_DEFAULTS, GnmtAlpha, sentence_length_limits

EOS = 3


def _eos_bias(model, bias: float):
    """A tiny model whose output layer favours (bias > 0) or never picks (bias << 0) </s>."""
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[EOS] = bias
    return model


def _generated_lengths(sequences: torch.Tensor) -> list[int]:
    """Generated tokens per row, up to and including the first </s> (the start token excluded)."""
    lengths = []
    for row in sequences[:, 1:].tolist():
        lengths.append(row.index(EOS) + 1 if EOS in row else len(row))
    return lengths


def test_gnmt_penalty_formula():
    assert gnmt_length_penalty(1, 0.6) == 1.0
    assert gnmt_length_penalty(10, 0.6) == pytest.approx((15 / 6) ** 0.6)
    assert gnmt_length_penalty(7, 0.0) == 1.0


def test_gnmt_ranking_differs_from_transformers_on_constructed_case():
    """Two finished hypotheses: A (|Y| = 2, log P = -1) and B (|Y| = 10, log P = -2).
    transformers' |Y|^0.6 prefers B (-0.50 > -0.66); GNMT's ((5+|Y|)/6)^0.6 prefers A (-0.91 > -1.15).
    transformers' beam search hands the call's length_penalty to this hook; a GnmtAlpha selects GNMT's form."""
    model = tiny_model()
    winners = {}
    for penalty_type, alpha in (("hf", 0.6), ("gnmt", GnmtAlpha(0.6))):
        sequences = torch.zeros(1, 1, 12, dtype=torch.long)
        beam_scores = torch.full((1, 1), -1.0e9)
        beam_indices = torch.zeros(1, 1, 11, dtype=torch.int32)
        finished = torch.zeros(1, 1, dtype=torch.bool)
        for marker, log_prob, cur_len in ((7, -1.0, 2), (8, -2.0, 10)):  # A, then B
            candidates = torch.full((1, 2, 12), marker, dtype=torch.long)
            sequences, beam_scores, beam_indices, finished = model._update_finished_beams(
                sequences=sequences,
                topk_running_sequences=candidates,
                beam_scores=beam_scores,
                topk_log_probs=torch.tensor([[log_prob, -50.0]]),
                beam_indices=beam_indices,
                topk_running_beam_indices=torch.zeros(1, 2, 11, dtype=torch.int32),
                is_early_stop_heuristic_unsatisfied=torch.ones(1, 1, dtype=torch.bool),
                is_sent_finished=finished,
                next_token_hits_stopping_criteria=torch.tensor([[True, False]]),
                top_num_beam_mask=torch.tensor([True, False]),
                num_beams=1,
                cur_len=cur_len,  # |Y| = cur_len + 1 - prompt length (1)
                decoder_prompt_len=1,
                length_penalty=alpha,
                early_stopping=False,  # True would close the sentence after its first hypothesis
            )
        winners[penalty_type] = int(sequences[0, 0, 0])
    assert winners == {"hf": 8, "gnmt": 7}


@torch.no_grad()
def test_gnmt_beam_scores_are_log_prob_over_gnmt_penalty():
    """End to end: each returned hypothesis' score is its teacher-forced log P divided by ((5+|Y|)/6)^0.6."""
    model = _eos_bias(tiny_model(seed=2, lm_head_bias=True), 2.5)
    ids, mask = padded_batch()
    out = model.generate(
        input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, num_return_sequences=2
    )
    assert model.generation_config.length_penalty_type == "gnmt"
    sources = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    logits = model(input_ids=sources[0], attention_mask=sources[1], decoder_input_ids=out.sequences[:, :-1]).logits
    token_log_probs = logits.log_softmax(-1).gather(-1, out.sequences[:, 1:, None])[..., 0]
    for row, length in enumerate(_generated_lengths(out.sequences)):
        assert out.sequences[row, length] == EOS, "every hypothesis should end with </s> here"
        log_prob = token_log_probs[row, :length].sum()
        expected = log_prob / gnmt_length_penalty(length, 0.6)
        assert out.sequences_scores[row] == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.parametrize("mode", [{"num_beams": 1}, {"num_beams": 4}, {"num_beams": 1, "do_sample": True}])
@torch.no_grad()
def test_per_sentence_limit_in_mixed_length_batch(mode):
    model = _eos_bias(tiny_model(seed=3, lm_head_bias=True), -1.0e4)  # </s> only when forced
    ids, mask = padded_batch(lengths=(9, 6, 3))
    out = model.generate(input_ids=ids, attention_mask=mask, max_len_a=1.0, max_len_b=2, **mode)
    assert _generated_lengths(out) == [11, 8, 5]  # own source length (</s> included) + 2, the last being </s>
    for row, limit in enumerate((11, 8, 5)):
        assert out[row, limit] == EOS
    assert out.shape[1] == 1 + 11  # start token + the longest limit


def test_limits_formula():
    assert sentence_length_limits(torch.tensor([9, 6, 0]), 1.0, 50).tolist() == [59, 56, 50]
    assert sentence_length_limits(torch.tensor([10]), 1.5, 0).tolist() == [15]
    assert sentence_length_limits(torch.tensor([3]), 0.0, 0).tolist() == [1]


@torch.no_grad()
def test_explicit_max_new_tokens_turns_per_sentence_limit_off():
    model = _eos_bias(tiny_model(seed=3, lm_head_bias=True), -1.0e4)
    ids, mask = padded_batch(lengths=(9, 3))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, num_beams=1)
    assert out.shape == (2, 8) and EOS not in out[:, 1:]


@pytest.mark.parametrize("mode", [{}, {"num_beams": 1}, {"length_penalty_type": "hf"}])
@torch.no_grad()
def test_paper_decoding_cached_equals_uncached(mode):
    model = _eos_bias(tiny_model(seed=5, lm_head_bias=True), 1.5)
    ids, mask = padded_batch()
    outputs = [
        model.generate(input_ids=ids, attention_mask=mask, max_len_b=6, use_cache=use_cache, **mode)
        for use_cache in (True, False)
    ]
    assert torch.equal(*outputs)


@torch.no_grad()
def test_hf_penalty_is_transformers_own_beam_search():
    model = _eos_bias(tiny_model(seed=6, lm_head_bias=True), 1.0)
    ids, mask = padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=4, length_penalty=1.3)
    ours = model.generate(length_penalty_type="hf", **kwargs)
    theirs = GenerationMixin.generate(model, **kwargs)
    assert torch.equal(ours, theirs)


def test_paper_defaults_saved_and_reloaded(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "generation.py").is_file(), "generation.py must travel with the model for remote code"
    reloaded = VaswaniForConditionalGeneration.from_pretrained(tmp_path).generation_config
    for key, value in PAPER_GENERATION_DEFAULTS.items():
        assert getattr(reloaded, key) == value, key


def test_unknown_penalty_type_is_refused_clearly(model):
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="length_penalty_type='wu'.*'gnmt'"):
        model.generate(input_ids=ids, attention_mask=mask, length_penalty_type="wu")


@torch.no_grad()
def test_decoding_settings_belong_to_the_call():
    """A generate() call made inside another (here by a logits processor) with other settings leaves the outer
    call's GNMT penalty alone, and no setting stays on the model: they travel on each call's generation config."""
    model = _eos_bias(tiny_model(seed=2, lm_head_bias=True), 2.5)
    ids, mask = padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, length_penalty=1.0, length_penalty_type="gnmt",
                  return_dict_in_generate=True, output_scores=True)
    expected = model.generate(**kwargs)

    class NestedCall(LogitsProcessor):
        def __call__(self, input_ids, scores):
            model.generate(input_ids=ids[:1], attention_mask=mask[:1], num_beams=2, max_new_tokens=2,
                           length_penalty_type="hf", decoding_loop="transformers")
            return scores

    attributes = set(vars(model))
    nested = model.generate(logits_processor=LogitsProcessorList([NestedCall()]), **kwargs)
    assert torch.equal(nested.sequences, expected.sequences)
    assert torch.equal(nested.sequences_scores, expected.sequences_scores)
    assert set(vars(model)) == attributes
