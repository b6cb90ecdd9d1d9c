"""The paper's decoding (§6.1) inside transformers' ``generate()``.

"We used beam search with a beam size of 4 and length penalty α = 0.6 [Wu et al. 2016]. [...] We set the
maximum output length during inference to input length + 50, but terminate early when possible."

Two of these are not what ``generate()`` offers, so :class:`PaperDecodingMixin` adds them:

* **GNMT length penalty.** Finished hypotheses are ranked by log P(Y|X) / lp(Y) with
  lp(Y) = ((5 + |Y|) / 6)^α (Wu et al. 2016, Eq. 14). transformers' ``length_penalty`` divides by |Y|^α
  instead. ``length_penalty_type="gnmt"`` (generation config or ``generate()`` argument) switches the
  beam search to GNMT's form, with α = ``length_penalty``; ``"hf"`` keeps transformers' form.
* **Per-sentence maximum length.** Each sentence may produce at most ``max_len_a`` · (its own source length
  in tokens, ``</s>`` included) + ``max_len_b`` tokens; the last is then forced to ``</s>``
  (:class:`SentenceLengthLimit`). ``generate()`` alone has one limit for the whole batch.

Early termination is transformers' ``early_stopping=True``: a sentence is done once it has ``num_beams``
finished hypotheses. Everything else (greedy, sampling, ``num_beams``, ``max_new_tokens``, logits
processors) is transformers' own and keeps working; an explicit ``max_new_tokens`` / ``max_length``
turns the per-sentence limit off. Beam and greedy search run in our own loop (:mod:`.decoding`, same tokens,
less work per step) where it supports the request; ``decoding_loop="transformers"`` keeps transformers' loops.

This file is copied next to a saved model (``modeling.py`` imports it), so it imports only torch and
transformers.
"""

from __future__ import annotations

import math

import torch
from transformers import GenerationConfig, GenerationMixin, LogitsProcessor, LogitsProcessorList

LENGTH_PENALTY_TYPES = ("hf", "gnmt")

#: The paper's decoding (§6.1): beam 4, GNMT length penalty α = 0.6, at most input length + 50 output tokens
#: (``max_len_a`` · source length + ``max_len_b``, fairseq's names), stopping when all beams have ended.
PAPER_GENERATION_DEFAULTS = {
    "num_beams": 4,
    "length_penalty": 0.6,
    "length_penalty_type": "gnmt",
    "early_stopping": True,
    "max_len_a": 1.0,
    "max_len_b": 50,
}
#: Generation settings this module adds to transformers' (read from the generation config or ``generate()``).
PAPER_DECODING_FIELDS = ("length_penalty_type", "max_len_a", "max_len_b")


def apply_paper_generation_defaults(generation_config: GenerationConfig) -> None:
    """Write the paper's decoding settings into a model's generation config (saved with the model)."""
    for key, value in PAPER_GENERATION_DEFAULTS.items():
        setattr(generation_config, key, value)
    generation_config._from_model_config = False  # else reloading drops the fields it does not know


def gnmt_length_penalty(length: int | torch.Tensor, alpha: float) -> float | torch.Tensor:
    """lp(Y) = ((5 + |Y|) / 6)^α (Wu et al. 2016, Eq. 14; the paper's α = 0.6)."""
    return ((5 + length) / 6) ** alpha


def source_lengths(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Tokens per source sentence (``</s>`` included): the attention mask's row sums, else the full width."""
    if attention_mask is not None:
        return attention_mask.sum(-1)
    if input_ids is not None:
        return torch.full((input_ids.shape[0],), input_ids.shape[-1], device=input_ids.device)
    return None


def sentence_length_limits(lengths: torch.Tensor, max_len_a: float, max_len_b: int) -> torch.Tensor:
    """``max_len_a`` · length + ``max_len_b`` new tokens per sentence (at least 1)."""
    return (lengths.to(torch.float64) * max_len_a + max_len_b).floor().clamp(min=1).long()


class SentenceLengthLimit(LogitsProcessor):
    """Forces ``</s>`` as the last allowed token of each sentence's own output limit (§6.1): every other
    token gets -inf there, ``</s>`` keeps its score (so beam scores stay true log-probabilities).

    ``limits[i]`` is the most new tokens sentence ``i`` may have, ``</s>`` included. Rows of the scores are
    sentences × beams (or × returned sequences), sentence-major, as ``generate()`` lays them out.
    """

    def __init__(self, limits: torch.Tensor, eos_token_id: int) -> None:
        self.limits = limits
        self.eos_token_id = eos_token_id
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:  # the decoder prompt (usually the start token) is there at the first step
            self.prompt_length = input_ids.shape[1]
        generated = input_ids.shape[1] - self.prompt_length
        limits = self.limits.to(scores.device).repeat_interleave(scores.shape[0] // self.limits.shape[0])
        return force_eos_at_limits(scores, generated, limits, self.eos_token_id)


def force_eos_at_limits(scores: torch.Tensor, generated: int, limits: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Rows whose next token is the last their limit allows (``limits``, one per row) keep only ``</s>``'s score."""
    last_step = generated + 1 >= limits
    if not bool(last_step.any()):
        return scores
    only_eos = torch.full_like(scores, -math.inf)  # </s> keeps its own score, as in fairseq
    only_eos[:, eos_token_id] = scores[:, eos_token_id]
    return torch.where(last_step[:, None], only_eos, scores)


def _setting(name: str, kwargs: dict, *configs: GenerationConfig | None):
    """A decoding field from the ``generate()`` kwargs (popped), else the first config that has it."""
    if name in kwargs:
        return kwargs.pop(name)
    for config in configs:
        if config is not None and hasattr(config, name):
            return getattr(config, name)
    return None


class PaperDecodingMixin:
    """Adds the paper's length penalty and per-sentence output limit to ``GenerationMixin.generate``."""

    _length_penalty_type: str = "hf"

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ):
        """``GenerationMixin.generate`` plus ``length_penalty_type`` (``"gnmt"`` / ``"hf"``) and the
        per-sentence limit ``max_len_a`` · source length + ``max_len_b`` (§6.1), each taken from the call,
        else from ``generation_config``, else from the model's generation config. The limit applies unless
        ``max_new_tokens`` or ``max_length`` is set."""
        configs = (generation_config, self.generation_config)
        penalty_type = _setting("length_penalty_type", kwargs, *configs) or "hf"
        if penalty_type not in LENGTH_PENALTY_TYPES:
            raise ValueError(
                f"length_penalty_type={penalty_type!r} is not one of {LENGTH_PENALTY_TYPES}: use 'gnmt' for the "
                "paper's ((5 + |Y|) / 6)^alpha or 'hf' for transformers' |Y|^alpha."
            )
        max_len_a, max_len_b = (_setting(name, kwargs, *configs) for name in ("max_len_a", "max_len_b"))
        user_limit = any(
            kwargs.get(name) is not None or getattr(config, name, None) is not None
            for name in ("max_new_tokens", "max_length")
            for config in configs
        )
        source = inputs if inputs is not None else kwargs.get("input_ids")
        lengths = source_lengths(source, kwargs.get("attention_mask"))
        if not user_limit and max_len_a is not None and max_len_b is not None and lengths is not None:
            limits = sentence_length_limits(lengths, max_len_a, max_len_b)
            kwargs["max_new_tokens"] = int(limits.max())
            eos = kwargs["eos_token_id"] if "eos_token_id" in kwargs else _setting("eos_token_id", {}, *configs)
            if isinstance(eos, (list, tuple)):
                eos = eos[0] if eos else None
            if eos is not None:
                logits_processor = LogitsProcessorList(logits_processor or [])
                logits_processor.append(SentenceLengthLimit(limits, int(eos)))
        self._length_penalty_type = penalty_type
        try:
            return super().generate(
                inputs, generation_config=generation_config, logits_processor=logits_processor, **kwargs
            )
        finally:
            self._length_penalty_type = "hf"

    def _update_finished_beams(self, **kwargs):
        """With ``length_penalty_type="gnmt"``, rank finished hypotheses by log P / ((5 + |Y|) / 6)^α."""
        if self._length_penalty_type == "gnmt":
            length = kwargs["cur_len"] + 1 - kwargs["decoder_prompt_len"]  # |Y|, the final </s> included
            kwargs["topk_log_probs"] = kwargs["topk_log_probs"] / gnmt_length_penalty(length, kwargs["length_penalty"])
            kwargs["length_penalty"] = 0.0  # transformers then divides by |Y|^0 = 1
        return super()._update_finished_beams(**kwargs)

    def _check_early_stop_heuristic(self, **kwargs):
        """transformers' test "can a running beam still beat the worst finished one", with the GNMT penalty."""
        if self._length_penalty_type != "gnmt":
            return GenerationMixin._check_early_stop_heuristic(**kwargs)
        alpha, prompt = kwargs["length_penalty"], kwargs["decoder_prompt_len"]
        longest = kwargs["early_stopping"] == "never" and alpha > 0.0
        length = (kwargs["max_length"] if longest else kwargs["cur_len"]) - prompt
        best_running = kwargs["running_beam_scores"][:, :1] / gnmt_length_penalty(length, alpha)
        beam_scores = kwargs["beam_scores"]
        worst_finished = torch.where(
            kwargs["is_sent_finished"], torch.min(beam_scores, dim=1, keepdim=True)[0], -1.0e9
        )
        return kwargs["is_early_stop_heuristic_unsatisfied"] & torch.any(
            best_running > worst_finished, dim=-1, keepdim=True
        )
