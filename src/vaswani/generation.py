"""The paper's decoding (§6.1) inside transformers' ``generate()``: :class:`VaswaniGenerationMixin`.

"We used beam search with a beam size of 4 and length penalty α = 0.6 [Wu et al. 2016]. [...] We set the
maximum output length during inference to input length + 50, but terminate early when possible."

Two of these are not what ``generate()`` offers, so the mixin adds them:

* **GNMT length penalty.** Finished hypotheses are ranked by log P(Y|X) / lp(Y) with
  lp(Y) = ((5 + |Y|) / 6)^α (Wu et al. 2016, Eq. 14). transformers' ``length_penalty`` divides by |Y|^α
  instead. ``length_penalty_type="gnmt"`` (generation config or ``generate()`` argument) switches the
  beam search to GNMT's form, with α = ``length_penalty``; ``"hf"`` keeps transformers' form.
* **Per-sentence maximum length.** Each sentence may produce at most ``max_len_a`` · (its own source length
  in tokens, ``</s>`` included) + ``max_len_b`` tokens; the last is then forced to ``</s>``
  (:class:`~.decoding.SentenceLengthLimit`). ``generate()`` alone has one limit for the whole batch.

Early termination is transformers' ``early_stopping=True``: a sentence is done once it has ``num_beams``
finished hypotheses. Everything else (greedy, sampling, ``num_beams``, ``max_new_tokens``, logits
processors) is transformers' own and keeps working; an explicit ``max_new_tokens`` / ``max_length``
turns the per-sentence limit off. Beam and greedy search run in our own loop (:mod:`.decoding`, same tokens,
less work per step) where it supports the request; ``decoding_loop="transformers"`` keeps transformers' loops.

These settings belong to one call: they travel on the call's own copy of the generation config (never on the
model), so concurrent and nested ``generate()`` calls do not see each other's.

This file is copied next to a saved model (``modeling.py`` imports it), so it imports only torch, transformers
and its sibling ``decoding.py``.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable, Iterator
from itertools import groupby

import torch
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList
from transformers.cache_utils import Cache, DynamicLayer, EncoderDecoderCache

from .decoding import (
    REFILL_BELOW,
    SearchRequest,
    SentenceLengthLimit,
    beam_search,
    beam_search_stream,
    gnmt_length_penalty,
    greedy_search,
    unsupported_options,
)

LENGTH_PENALTY_TYPES = ("hf", "gnmt")
#: ``decoding_loop`` values (``generate()`` argument or generation-config field): ours, when it supports the
#: request, or always transformers'.
DECODING_LOOPS = ("vaswani", "transformers")

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


def known_generation_keys() -> set[str]:
    """Every key a generation_config.json may hold: transformers' ``GenerationConfig`` and the paper's decoding."""
    return set(GenerationConfig().to_dict()) | set(PAPER_DECODING_FIELDS) | {"decoding_loop"}


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


def _setting(name: str, kwargs: dict, *configs: GenerationConfig | None):
    """A decoding field from the ``generate()`` kwargs (popped), else the first config that has it."""
    if name in kwargs:
        return kwargs.pop(name)
    for config in configs:
        if config is not None and hasattr(config, name):
            return getattr(config, name)
    return None




class GnmtAlpha(float):
    """The α of GNMT's length penalty ((5 + |Y|) / 6)^α. transformers' beam search hands its ``length_penalty``
    to :meth:`VaswaniGenerationMixin._update_finished_beams` and ``_check_early_stop_heuristic``; this float
    tells them, within one call, which form of the penalty it is."""


class VaswaniGenerationMixin:
    """``generate()`` with the paper's decoding (§6.1) and our decoding loop (:mod:`.decoding`).

    The call's own settings (``length_penalty_type``, ``decoding_loop``) are resolved in :meth:`generate` and
    written on the call's copy of the generation config (:meth:`_prepare_generation_config`), where the search
    methods read them.
    """

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ):
        """``GenerationMixin.generate`` plus ``length_penalty_type`` (``"gnmt"`` / ``"hf"``), ``decoding_loop``
        (``"vaswani"`` / ``"transformers"``) and the per-sentence limit ``max_len_a`` · source length +
        ``max_len_b`` (§6.1), each taken from the call, else from ``generation_config``, else from the model's
        generation config. The limit applies unless ``max_new_tokens`` or ``max_length`` is set."""
        configs = (generation_config, self.generation_config)
        penalty_type = _setting("length_penalty_type", kwargs, *configs) or "hf"
        if penalty_type not in LENGTH_PENALTY_TYPES:
            raise ValueError(
                f"length_penalty_type={penalty_type!r} is not one of {LENGTH_PENALTY_TYPES}: use 'gnmt' for the "
                "paper's ((5 + |Y|) / 6)^alpha or 'hf' for transformers' |Y|^alpha."
            )
        search_later = kwargs.pop("_search_later", False)
        loop = _setting("decoding_loop", kwargs, *configs) or "vaswani"
        if loop not in DECODING_LOOPS:
            raise ValueError(f"decoding_loop={loop!r} is not one of {DECODING_LOOPS}.")
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
        return super().generate(
            inputs,
            generation_config=generation_config,
            logits_processor=logits_processor,
            length_penalty_type=penalty_type,
            decoding_loop=loop,
            search_later=search_later,
            **kwargs,
        )

    def generate_stream(
        self, batches: Iterable[dict], refill_below: float = REFILL_BELOW, **kwargs
    ) -> Iterator[torch.LongTensor]:
        """``generate(**batch, **kwargs)`` for each batch of model inputs (``input_ids``, ``attention_mask``), in
        order, with continuous batching: where our beam search serves the request, the sentences of the next
        batches join the search as those of earlier ones end (:func:`~.decoding.beam_search_stream`), so that the
        steps stay wide; the tokens are those of one ``generate()`` per batch. Batches are read as needed."""
        if not all(hasattr(layer, "forward_segments") for layer in self.model.decoder.layers):
            # Only layers that run several batches' products together (FusedDecoderLayer) gain from joining them.
            yield from (self.generate(**batch, **kwargs) for batch in batches)
            return
        prepared = (self.generate(**batch, **kwargs, _search_later=True) for batch in batches)
        for later, group in groupby(prepared, key=lambda item: isinstance(item, SearchRequest)):
            if later:
                yield from beam_search_stream(self, group, refill_below)
            else:
                yield from group

    def _prepare_generation_config(self, generation_config: GenerationConfig | None, **kwargs):
        """transformers' per-call copy of the generation config, carrying this call's ``length_penalty_type``,
        ``decoding_loop`` and whether :meth:`generate_stream` searches it later (transformers' own defaults,
        ``"hf"`` and ``"vaswani"``, when :meth:`generate` did not set them, as for
        ``GenerationMixin.generate(model, ...)``)."""
        settings = {
            "length_penalty_type": kwargs.pop("length_penalty_type", "hf"),
            "decoding_loop": kwargs.pop("decoding_loop", "vaswani"),
            "search_later": kwargs.pop("search_later", False),
        }
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        for name, value in settings.items():
            setattr(generation_config, name, value)
        return generation_config, model_kwargs

    def _our_loop_serves(self, *request, **options) -> bool:
        """Whether the call asked for our loop and it supports the request (``input_ids``, ``logits_processor``,
        ``stopping_criteria``, ``generation_config``, ``model_kwargs``)."""
        loop = getattr(request[3], "decoding_loop", "vaswani")
        return loop == "vaswani" and not unsupported_options(self, *request, **options)

    def _beam_search(
        self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False, **model_kwargs
    ):
        request = (input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs)
        penalty_type = getattr(generation_config, "length_penalty_type", "hf")
        if self._our_loop_serves(*request, synced_gpus=synced_gpus):
            if getattr(generation_config, "search_later", False):  # generate_stream searches it with other batches
                return SearchRequest(input_ids, logits_processor, generation_config, model_kwargs, penalty_type)
            return beam_search(self, input_ids, logits_processor, generation_config, model_kwargs, penalty_type)
        if penalty_type == "gnmt":  # transformers' loop passes length_penalty on to the hooks below
            generation_config = copy.copy(generation_config)
            generation_config.length_penalty = GnmtAlpha(generation_config.length_penalty)
        return super()._beam_search(
            input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, **model_kwargs
        )

    def _sample(
        self,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus=False,
        streamer=None,
        **model_kwargs,
    ):
        request = (input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs)
        if self._our_loop_serves(*request, synced_gpus=synced_gpus, streamer=streamer):
            return greedy_search(self, input_ids, logits_processor, generation_config, model_kwargs)
        return super()._sample(
            input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, **model_kwargs
        )

    def _update_finished_beams(self, **kwargs):
        """With the GNMT penalty, rank finished hypotheses by log P / ((5 + |Y|) / 6)^α."""
        if isinstance(kwargs["length_penalty"], GnmtAlpha):
            length = kwargs["cur_len"] + 1 - kwargs["decoder_prompt_len"]  # |Y|, the final </s> included
            kwargs["topk_log_probs"] = kwargs["topk_log_probs"] / gnmt_length_penalty(length, kwargs["length_penalty"])
            kwargs["length_penalty"] = 0.0  # transformers then divides by |Y|^0 = 1
        return super()._update_finished_beams(**kwargs)

    def _check_early_stop_heuristic(self, **kwargs):
        """transformers' test "can a running beam still beat the worst finished one", with the GNMT penalty."""
        alpha = kwargs["length_penalty"]
        if not isinstance(alpha, GnmtAlpha):
            return GenerationMixin._check_early_stop_heuristic(**kwargs)
        prompt = kwargs["decoder_prompt_len"]
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

    def _reorder_cache(self, cache: Cache, beam_idx: torch.LongTensor) -> Cache:
        """transformers' beam search: give each row the cached states of the beam it continues. The
        encoder-decoder keys and values stay where they are when the move would not change them (all beams of a
        sentence attend to the same source), instead of being copied at every step as
        ``EncoderDecoderCache.reorder_cache`` does."""
        if not isinstance(cache, EncoderDecoderCache):
            cache.reorder_cache(beam_idx)
            return cache
        cache.self_attention_cache.reorder_cache(beam_idx)
        cross = cache.cross_attention_cache
        classes = identical_row_classes(cross)
        if classes is None:
            cross.reorder_cache(beam_idx)
        elif not torch.equal(classes[beam_idx.to(classes.device)], classes):
            cross.reorder_cache(beam_idx)
            _remember_row_classes(cross, classes[beam_idx.to(classes.device)])
        return cache


def _cross_tensors(cross: Cache) -> list[torch.Tensor] | None:
    """The keys and values of a filled cross-attention cache made of ``DynamicLayer`` s (which replace their
    tensors rather than writing into them), else None."""
    layers = getattr(cross, "layers", None)
    if not layers or not all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers):
        return None
    tensors = [t for layer in layers for t in (layer.keys, layer.values)]
    return tensors if all(t is not None and t.numel() for t in tensors) else None


def _remember_row_classes(cross: Cache, classes: torch.Tensor) -> None:
    tensors = _cross_tensors(cross)
    cross._vaswani_row_classes = None if tensors is None else ([weakref.ref(t) for t in tensors], classes)


def identical_row_classes(cross: Cache) -> torch.Tensor | None:
    """One class id per batch row of a filled cross-attention cache: rows of one class hold bitwise-equal keys
    and values in every layer (the beams of one sentence). Computed with one pass over the cache and kept
    while the cache holds the same tensors; None where this cannot be known."""
    tensors = _cross_tensors(cross)
    if tensors is None:
        return None
    remembered = getattr(cross, "_vaswani_row_classes", None)
    if remembered is not None and len(remembered[0]) == len(tensors):
        if all(ref() is t for ref, t in zip(remembered[0], tensors)):
            return remembered[1]
    _, classes = torch.unique(tensors[0].flatten(1), dim=0, return_inverse=True)
    rows = torch.arange(classes.numel(), device=classes.device)
    first = torch.full_like(rows, classes.numel()).scatter_reduce_(0, classes, rows, "amin")[classes]
    if not all(torch.equal(t, t[first]) for t in tensors):
        classes = rows  # equal first-layer keys but different states elsewhere: treat every row as its own
    _remember_row_classes(cross, classes)
    return classes
