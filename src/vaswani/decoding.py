"""Our own decoding loop for :class:`VaswaniForConditionalGeneration`: incremental beam search and greedy search.

transformers' ``generate()`` runs each step through the model's ``forward`` (general-purpose masks and a
growing cache), repeats the encoder-decoder keys and values for every beam and keeps finished sentences in
the batch. This loop computes the same search with less work per step, as fairseq's incremental decoding does:

* The encoder runs once, and each decoder layer projects its output to keys and values once per sentence.
  In encoder-decoder attention (§3.2.3) the k beams of a sentence are k queries against that one copy
  (queries ``[sentences, heads, k, d_k]``, keys ``[sentences, heads, source length, d_k]``), so these are
  never repeated or reordered.
* Masked self-attention keeps its keys and values in preallocated buffers, written once where they were
  computed: when the beams are re-ranked, nothing is copied; each hypothesis' query sees the keys of its
  own prefix through a mask (:class:`IncrementalDecoder`).
* A sentence leaves the batch (its rows, encoder keys and values, caches) as soon as its search is over.
* Given several batches (:func:`beam_search_stream`, ``model.generate_stream``), the next one joins the search
  while the last sentences of the earlier ones are still decoded (continuous batching): each batch keeps its own
  :class:`IncrementalDecoder`, and the products of a step run over the rows of all (:func:`next_token_logits_of`).

The search is transformers' vectorised beam search (``GenerationMixin._beam_search``) step for step: the top
2k continuations over all beams; those ending in ``</s>`` among the top k become finished hypotheses, scored
log P(Y|X) / lp(Y) with transformers' |Y|^α or GNMT's ((5 + |Y|) / 6)^α (Wu et al. 2016, §7;
``length_penalty_type``, see :mod:`.generation`; :func:`gnmt_length_penalty`); the best k others continue;
transformers' early-stopping rules end a sentence. Greedy search (``num_beams=1``) is transformers' too. So the
output tokens are the same as with transformers' loops. :func:`unsupported_options` lists what this loop does not
do; ``generate()`` then uses transformers' loop, as it does when asked with ``decoding_loop="transformers"``. The
per-sentence output limit (§6.1) is a logits processor, :class:`SentenceLengthLimit`, that both loops apply.

This file is copied next to a saved model (``generation.py`` imports it), so it imports only torch and
transformers, and :mod:`vaswani.kernels` where it runs inside the package.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from functools import partial
from typing import NamedTuple

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.logits_process import MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.masking_utils import create_bidirectional_mask

try:  # inside the vaswani package; a copy next to a saved model keeps to torch's operations
    from . import kernels
except ImportError:
    kernels = None

# ----------------------------------------------------------------------------------------------------------
# The paper's length penalty and output limit (§6.1)
# ----------------------------------------------------------------------------------------------------------


def gnmt_length_penalty(length: int | torch.Tensor, alpha: float) -> float | torch.Tensor:
    """lp(Y) = ((5 + |Y|) / 6)^α (Wu et al. 2016, Eq. 14; the paper's α = 0.6)."""
    return ((5 + length) / 6) ** alpha


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
        if not bool((generated + 1 >= limits).any()):
            return scores
        return force_eos_at_limits(scores.clone(), generated, limits, self.eos_token_id)


def force_eos_at_limits(
    scores: torch.Tensor, generated: int | torch.Tensor, limits: torch.Tensor, eos_token_id: int
) -> torch.Tensor:
    """Rows whose next token is the last their limit allows (``limits``, one per row) keep only ``</s>``'s score
    (in place; returns ``scores``)."""
    last_step = (generated + 1 >= limits).nonzero()[:, 0]
    if last_step.numel():
        eos_scores = scores[last_step, eos_token_id]
        scores[last_step] = -math.inf
        scores[last_step, eos_token_id] = eos_scores  # </s> keeps its own score, as in fairseq
    return scores


# ----------------------------------------------------------------------------------------------------------
# What this loop supports
# ----------------------------------------------------------------------------------------------------------

SUPPORTED_ATTENTION = ("eager", "sdpa")
SUPPORTED_LOGITS_PROCESSORS = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor, SentenceLengthLimit)
SUPPORTED_STOPPING_CRITERIA = (MaxLengthCriteria, EosTokenCriteria)
SUPPORTED_MODEL_KWARGS = {"encoder_outputs", "attention_mask", "cache", "use_cache"}
EXTRA_OUTPUTS = (
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
    "output_attentions",
    "output_hidden_states",
)

#: transformers' score for empty slots, unstarted beams and candidates ruled out (added, not assigned).
NEG = -1.0e9


def unsupported_options(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    model_kwargs: dict,
    synced_gpus: bool = False,
    streamer: object | None = None,
) -> list[str]:
    """What in a request for beam or greedy search our loop does not do (empty: it does all of it).

    Supported: eager or sdpa attention in eval mode; no sampling; one returned sequence; just the sequences
    (no ``return_dict_in_generate`` / ``output_*``); ``early_stopping`` True, False or "never"; a
    non-negative ``length_penalty``; exactly one ``eos_token_id``; the start token as the decoder prompt;
    source ``attention_mask`` / ``encoder_outputs`` as the only model inputs, no cache passed in; the logits
    processors for ``min_length``, ``min_new_tokens`` and the per-sentence limit; the stopping criteria for
    ``max_length`` / ``max_new_tokens`` and ``</s>``. Anything else (e.g. ``logits_processor``,
    ``stopping_criteria``, ``bad_words_ids``, ``no_repeat_ngram_size``, ``repetition_penalty``, forced tokens,
    ``prefix_allowed_tokens_fn``, a streamer) adds a processor, a criterion or an input and lands here.
    """
    config = generation_config
    attention = model.config._attn_implementation
    eos = config._eos_token_tensor
    other_inputs = sorted(set(model_kwargs) - SUPPORTED_MODEL_KWARGS)
    checks = {
        f"attention implementation {attention!r}": attention in SUPPORTED_ATTENTION,
        "training mode (dropout)": not model.training,
        "sampling": not config.do_sample,
        "num_return_sequences > 1": config.num_return_sequences == 1,
        "outputs beyond the sequences": not any(getattr(config, name, False) for name in EXTRA_OUTPUTS),
        f"early_stopping={config.early_stopping!r}": config.early_stopping in (True, False, "never"),
        "negative length_penalty": config.num_beams == 1 or config.length_penalty >= 0,
        "no max_length": config.max_length is not None,
        "not exactly one eos_token_id": eos is not None and eos.numel() == 1,
        "a decoder prompt beyond the start token": input_ids.shape[1] == 1,
        f"model inputs {other_inputs}": not other_inputs,
        "a cache passed in": not getattr(model_kwargs.get("cache"), "_is_user_defined", False),
        "other logits processors": all(type(p) in SUPPORTED_LOGITS_PROCESSORS for p in logits_processor),
        "a minimum length beyond a sentence's limit": not _eos_forbidden_at_a_limit(
            logits_processor, input_ids.shape[1]
        ),
        "other stopping criteria": all(type(c) in SUPPORTED_STOPPING_CRITERIA for c in stopping_criteria),
        "synced_gpus": not synced_gpus,
        "a streamer": streamer is None,
    }
    return [option for option, supported in checks.items() if not supported]


def _eos_forbidden_at_a_limit(processors: LogitsProcessorList, prompt: int) -> bool:
    """Whether ``min_length`` / ``min_new_tokens`` forbid ``</s>`` at the step where a sentence's own limit allows
    only ``</s>``: every continuation is then -inf, and transformers' pick among them is arbitrary."""
    least = max((_new_tokens_before_eos(p, prompt) for p in processors), default=0)
    return any(
        bool((processor.limits - 1 < least).any())
        for processor in processors
        if isinstance(processor, SentenceLengthLimit)
    )


def _new_tokens_before_eos(processor: object, prompt: int) -> int:
    """How many new tokens a ``min_length`` / ``min_new_tokens`` processor requires before ``</s>`` (0 for others)."""
    if isinstance(processor, MinLengthLogitsProcessor):
        return processor.min_length - prompt
    if isinstance(processor, MinNewTokensLengthLogitsProcessor):
        return processor.min_new_tokens + processor.prompt_length_to_skip - prompt
    return 0


# ----------------------------------------------------------------------------------------------------------
# The decoder, one position at a time
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SourceKeysValues:
    """One decoder layer's encoder-decoder keys and values, projected once per sentence (what a cache layer holds)."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class CrossAttentionCache:
    layers: list[SourceKeysValues]


class BeamSlotCache:
    """What :class:`MultiHeadAttention` reads of transformers' ``EncoderDecoderCache``, over the buffers of an
    :class:`IncrementalDecoder`, so that each step runs the model's own ``DecoderLayer`` (§3.1): the
    encoder-decoder keys and values are always ready (``is_updated``), and ``self_attention_cache.update`` is
    :meth:`IncrementalDecoder.update`, which writes a step's keys and values into their beam slots."""

    def __init__(self, decoder: IncrementalDecoder) -> None:
        self.self_attention_cache = decoder
        self.cross_attention_cache = CrossAttentionCache(decoder.cross)
        self.is_updated = dict.fromkeys(range(len(decoder.cross)), True)


class Segment(NamedTuple):
    """One batch's inputs to a decoder layer at one position (:meth:`IncrementalDecoder.begin_step`)."""

    hidden: torch.Tensor  # [sentences, queries, d_model]
    self_mask: torch.Tensor
    encoder_states: torch.Tensor
    cross_mask: torch.Tensor | None
    cache: BeamSlotCache


#: Positions the self-attention buffers of an :class:`IncrementalDecoder` hold at first; they double when full.
FIRST_CACHE_STEPS = 16


class SpareBuffers:
    """The self-attention buffers of decoders that are done (or have grown), for the next ones to reuse: the memory
    of a fresh buffer comes from the kernel one zeroed page at a time as it is first written, and a cache filled
    step by step took a page fault every few steps, costing as much as the writes themselves. Keeps the ``keep``
    largest."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.free: list[torch.Tensor] = []  # one-dimensional, smallest first

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A buffer of ``shape`` (``like``'s dtype and device): the smallest spare one that is large enough, or new."""
        size = math.prod(shape)
        for index, flat in enumerate(self.free):
            if flat.numel() >= size and flat.dtype == like.dtype and flat.device == like.device:
                return self.free.pop(index)[:size].view(shape)
        return like.new_empty(size).view(shape)

    def give(self, buffers: Iterable[torch.Tensor]) -> None:
        self.free.extend(buffer if buffer._base is None else buffer._base for buffer in buffers)
        self.free.sort(key=torch.Tensor.numel)
        del self.free[: max(len(self.free) - self.keep, 0)]


def _source_keys_values(attention: nn.Module, encoder_states: torch.Tensor) -> SourceKeysValues:
    """One layer's encoder-decoder keys and values, ``[sentences, heads, source length, d_k]``, contiguous: each
    step's attention then reads them without a copy."""
    keys, values = (attention.split_heads(linear(encoder_states)) for linear in (attention.k_proj, attention.v_proj))
    return SourceKeysValues(keys.contiguous(), values.contiguous())


class IncrementalDecoder:
    """The model's decoder and output layer run one position at a time over sentences × beams, with the
    encoder-decoder keys and values projected once per sentence (fairseq's incremental decoding).

    Within a layer a sentence's k beams are k query positions (``[sentences, beams, d_model]``). Masked
    self-attention keeps the keys and values of every beam at every step where they were computed
    (``[sentences, heads, steps, beams, d_k]``) and never moves them when beam search re-ranks the beams:
    each hypothesis instead records which beam slot its prefix held at each step (``ancestry``), and its query
    attends to the k × steps keys of its sentence through a mask that keeps the keys of its own prefix. This
    computes the same attention as reordered caches, with k times as many (masked) scores, which are cheap
    next to copying every layer's keys and values at every step. The layers themselves are the model's, given
    a :class:`BeamSlotCache` over these buffers. The buffers start with room for :data:`FIRST_CACHE_STEPS`
    positions and double when full; they come from and go back to ``spare`` (:class:`SpareBuffers`).
    """

    def __init__(
        self,
        model: nn.Module,
        encoder_states: torch.Tensor,
        source_mask: torch.Tensor | None,
        beams: int,
        steps: int,
        spare: SpareBuffers | None = None,
    ) -> None:
        self.decoder = model.model.decoder
        self.lm_head = model.lm_head
        self.beams = beams
        self.steps = steps  # positions the search may reach
        self.spare = SpareBuffers(keep=0) if spare is None else spare
        self.step = 0  # positions computed so far
        self.sentences = encoder_states.shape[0]
        self.encoder_states = encoder_states.clone()  # rows are moved in place when sentences leave
        self.source_mask = source_mask
        self.cross = [_source_keys_values(layer.encoder_attn, encoder_states) for layer in self.decoder.layers]
        self.cross_mask = self._cross_attention_mask()
        self.self_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cache = BeamSlotCache(self)
        device = encoder_states.device
        self.ancestry = torch.zeros(self.sentences, beams, steps, dtype=torch.long, device=device)
        self.slots = torch.arange(beams, device=device)

    def _cross_attention_mask(self) -> torch.Tensor | None:
        """The model's own mask for encoder-decoder attention with each sentence's beams as queries."""
        queries = self.encoder_states[:, :1].expand(-1, self.beams, -1)  # stands in for [sentences, beams, d_model]
        return create_bidirectional_mask(
            config=self.decoder.config,
            inputs_embeds=queries,
            attention_mask=self.source_mask,
            encoder_hidden_states=self.encoder_states,
        )

    def _self_attention_mask(self) -> torch.Tensor:
        """``[sentences, 1, beams, (step + 1) · beams]``: hypothesis i sees the key of beam slot j at step s iff
        its prefix held slot j at step s (boolean for sdpa, additive for eager, as the model's masks are)."""
        seen = self.ancestry[:, :, : self.step + 1, None] == self.slots  # [sentences, beams, steps, slots]
        mask = seen.flatten(2)[:, None]
        if self.decoder.config._attn_implementation == "sdpa":
            return mask
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)

    @property
    def queries(self) -> int:
        """Rows per sentence at the next position: at the first, all beams of a sentence hold the same prefix (the
        start token), so it is computed once per sentence and shared (CTranslate2 does the same on CPUs), its keys
        and values written to every beam slot; then one per beam."""
        return 1 if self.step == 0 else self.beams

    def next_token_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (fp32, ``[sentences · queries, vocab]``, see :attr:`queries`) of the token after ``tokens`` (one
        per hypothesis), which sit at position ``self.step``."""
        return next_token_logits_of([self], [tokens])

    def begin_step(self, tokens: torch.Tensor) -> Segment:
        """The first decoder layer's inputs for the next position (:attr:`queries` rows per sentence)."""
        decoder = self.decoder
        queries = self.queries
        tokens = tokens.view(self.sentences, self.beams)[:, :queries].reshape(-1, 1)
        hidden = decoder.embed(decoder.embed_tokens(tokens), self.step).view(self.sentences, queries, -1)
        self.ancestry[:, :, self.step] = self.slots
        self_mask = self._self_attention_mask()[:, :, :queries]
        cross_mask = None if self.cross_mask is None else self.cross_mask[:, :, :queries]
        return Segment(hidden, self_mask, self.encoder_states, cross_mask, self.cache)

    def end_step(self) -> None:
        """The position :meth:`begin_step` started is computed."""
        self.step += 1

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new position's keys and values (``[sentences, heads, beams or 1, d_k]``) into layer
        ``layer_idx``'s buffers; return those of all positions so far, ``[sentences, heads, (step + 1) · beams,
        d_k]`` (a cache's ``update``, called by the layer's masked self-attention)."""
        if layer_idx == len(self.self_cache):
            self.self_cache.append(self._buffers(key, min(self.steps, FIRST_CACHE_STEPS)))
        elif self.step == self.self_cache[layer_idx][0].shape[2]:
            self.self_cache[layer_idx] = self._grown(self.self_cache[layer_idx])
        keys, values = self.slot_buffers(layer_idx)
        keys[:, :, self.step] = key
        values[:, :, self.step] = value
        return keys[:, :, : self.step + 1].flatten(2, 3), values[:, :, : self.step + 1].flatten(2, 3)

    def slot_buffers(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer_idx``'s keys and values of the current sentences, ``[sentences, heads, positions, beams,
        d_k]`` (position p of hypothesis b lies in slot ``ancestry[sentence, b, p]``)."""
        keys, values = self.self_cache[layer_idx]
        return keys[: self.sentences], values[: self.sentences]

    def _buffers(self, like: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value buffers ``[sentences, heads, positions, beams, d_k]`` for keys shaped like ``like``."""
        shape = (self.sentences, like.shape[1], positions, self.beams, like.shape[-1])
        return self.spare.take(shape, like), self.spare.take(shape, like)

    def _grown(self, buffers: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``buffers`` (full) copied into ones with twice the positions (at most :attr:`steps`)."""
        grown = self._buffers(buffers[0], min(self.steps, 2 * buffers[0].shape[2]))
        for old, new in zip(buffers, grown):
            new[:, :, : self.step] = old[: self.sentences, :, : self.step]
        self.spare.give(buffers)
        return grown

    def release(self) -> None:
        """Hand the self-attention buffers to :attr:`spare` (this decoder's search is over)."""
        self.spare.give(buffer for buffers in self.self_cache for buffer in buffers)
        self.self_cache = []

    def select(self, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> None:
        """Continue with new hypotheses, hypothesis i (``sentence · beams + beam``) extending the prefix of old
        hypothesis ``rows[i]`` (beam re-ranking); with ``sentences``, only these sentences (indices among the
        current ones) stay in the batch."""
        ancestry = self.ancestry.view(-1, self.steps)[rows]
        if sentences is not None:
            self.sentences = sentences.numel()
            # Only the sentences that change rows are copied: with the order of :func:`survivors`, those that
            # take the place of sentences that left.
            moved = (sentences != torch.arange(self.sentences, device=sentences.device)).nonzero()[:, 0]
            origins = sentences[moved]
            for buffer in (buffer for buffers in self.self_cache for buffer in buffers):
                buffer[moved, :, : self.step] = buffer[origins, :, : self.step]
            for layer in self.cross:
                layer.keys, layer.values = (
                    _move_rows(tensor, moved, origins, self.sentences) for tensor in (layer.keys, layer.values)
                )
            self.encoder_states = _move_rows(self.encoder_states, moved, origins, self.sentences)
            self.source_mask = None if self.source_mask is None else self.source_mask[sentences]
            self.cross_mask = self._cross_attention_mask()
        self.ancestry = ancestry.view(self.sentences, self.beams, self.steps)


def _move_rows(tensor: torch.Tensor, moved: torch.Tensor, origins: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` rows of ``tensor`` after copying its rows ``origins`` to rows ``moved`` (in place)."""
    if moved.numel():
        tensor[moved] = tensor[origins]
    return tensor[:count]


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts one after the other along the first dimension (the one part itself, not a copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def next_token_logits_of(decoders: list[IncrementalDecoder], tokens: list[torch.Tensor]) -> torch.Tensor:
    """The next-token logits of several decoders of one model (each its own batch at its own position), their rows
    (:attr:`IncrementalDecoder.queries` per sentence) one after the other. A layer that has ``forward_segments``
    (:class:`~vaswani.fused_decoder.FusedDecoderLayer`) computes its products over the rows of all and attention
    for each; others run each batch in turn. The final LayerNorm and the output layer run over all rows at once
    (continuous batching, :func:`beam_search_stream`)."""
    segments = [decoder.begin_step(step_tokens) for decoder, step_tokens in zip(decoders, tokens)]
    model_decoder = decoders[0].decoder
    for layer in model_decoder.layers:
        if len(segments) > 1 and hasattr(layer, "forward_segments"):
            hiddens = layer.forward_segments(segments)
        else:
            hiddens = [layer(s.hidden, s.self_mask, s.encoder_states, s.cross_mask, cache=s.cache) for s in segments]
        segments = [segment._replace(hidden=hidden) for segment, hidden in zip(segments, hiddens)]
    for decoder in decoders:
        decoder.end_step()
    hidden = joined([segment.hidden.flatten(0, 1) for segment in segments])
    return decoders[0].lm_head(model_decoder.final_norm(hidden)).float()


def survivors(going: torch.Tensor) -> torch.Tensor:
    """The sentences that stay (``going``: one boolean per sentence), in an order that moves few rows: of the
    first n rows (n = how many stay), those that stay keep their place, and the others' places are taken by the
    sentences that stay from beyond row n."""
    stay = int(going.sum())
    order = torch.arange(stay, device=going.device)
    order[~going[:stay]] = going[stay:].nonzero()[:, 0] + stay
    return order


def _pad(tensor: torch.Tensor, dim: int, size: int, fill: int = 0) -> torch.Tensor:
    """``tensor`` with dimension ``dim`` filled up to ``size`` with ``fill``."""
    missing = size - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat((tensor, tensor.new_full(shape, fill)), dim=dim)


# ----------------------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Beams:
    """transformers' beam-search state for the sentences still being searched (first dimension: sentences)."""

    request: torch.Tensor  # [b] which request (generate() call or batch of a stream) each sentence is from
    row: torch.Tensor  # [b] its row there
    generated: torch.Tensor  # [b] tokens generated so far
    max_new: torch.Tensor  # [b] its request's max_length less the prompt: all hypotheses end there
    limits: torch.Tensor  # [b] its own limit: the last token it may generate must be </s> (SentenceLengthLimit)
    least: torch.Tensor  # [b] tokens it must generate before </s> may come (min_length, min_new_tokens)
    running: torch.Tensor  # [b, k, max_length] tokens of the running hypotheses, start token first
    running_scores: torch.Tensor  # [b, k] their log-probabilities
    finished: torch.Tensor  # [b, k, max_length] the best finished hypotheses so far, best first
    finished_scores: torch.Tensor  # [b, k] their scores, log P / lp(|Y|) (about NEG for empty slots)
    finished_lengths: torch.Tensor  # [b, k] their generated lengths (</s> included)
    is_finished: torch.Tensor  # [b, k] which slots hold a finished hypothesis
    improvable: torch.Tensor  # [b, 1] transformers' "early-stop heuristic unsatisfied"

    @classmethod
    def start(cls, request: SearchRequest, index: int, beams: int, fill: int) -> Beams:
        """The request's sentences: every beam holds the prompt; only beam 0 is live (the others start at NEG,
        as in transformers)."""
        prompts, max_length = request.input_ids, request.generation_config.max_length
        batch, device = prompts.shape[0] // beams, prompts.device
        running = torch.full((batch, beams, max_length), fill, dtype=torch.long, device=device)
        running[:, :, : prompts.shape[1]] = prompts.view(batch, beams, -1)
        running_scores = torch.zeros(batch, beams, device=device)
        running_scores[:, 1:] = NEG
        max_new = max_length - prompts.shape[1]
        limits, least = _length_bounds(request.logits_processor, prompts.shape[1], batch, max_new)
        return cls(
            request=torch.full((batch,), index, device=device),
            row=torch.arange(batch, device=device),
            generated=torch.zeros(batch, dtype=torch.long, device=device),
            max_new=torch.full((batch,), max_new, device=device),
            limits=limits.to(device),
            least=least.to(device),
            running=running,
            running_scores=running_scores,
            finished=running.clone(),
            finished_scores=torch.full((batch, beams), NEG, device=device),
            finished_lengths=torch.zeros(batch, beams, dtype=torch.long, device=device),
            is_finished=torch.zeros(batch, beams, dtype=torch.bool, device=device),
            improvable=torch.ones(batch, 1, dtype=torch.bool, device=device),
        )

    def keep(self, sentences: torch.Tensor) -> Beams:
        return Beams(**{field.name: getattr(self, field.name)[sentences] for field in fields(self)})

    def join(self, other: Beams, fill: int) -> Beams:
        """These sentences and ``other``'s, one after the other (hypotheses padded with ``fill`` to one width)."""
        width = max(self.running.shape[2], other.running.shape[2])
        return Beams(**{
            field.name: torch.cat([
                _pad(getattr(beams, field.name), 2, width, fill) if field.name in ("running", "finished")
                else getattr(beams, field.name) for beams in (self, other)
            ]) for field in fields(self)
        })


def _length_bounds(
    processors: LogitsProcessorList, prompt: int, sentences: int, max_new: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sentence's limit (its last allowed token must be ``</s>``; ``max_new + 1``, never reached, without a
    :class:`SentenceLengthLimit`) and the tokens it must generate before ``</s>`` (``min_length`` /
    ``min_new_tokens``): what the supported logits processors do, as numbers per sentence."""
    limits = torch.full((sentences,), max_new + 1)
    for processor in processors:
        if isinstance(processor, SentenceLengthLimit):
            limits = torch.minimum(limits, processor.limits.cpu())
    least = max((_new_tokens_before_eos(processor, prompt) for processor in processors), default=0)
    return limits, torch.full((sentences,), least)


def _apply_bounds(
    scores: torch.Tensor, generated: int | torch.Tensor, limits: torch.Tensor, least: torch.Tensor, eos: int
) -> torch.Tensor:
    """The scores (``[rows, vocab]``, changed in place) with ``</s>`` ruled out (-inf) in rows that have not yet
    generated their ``least`` tokens and forced in rows at their limit, as transformers' processors and
    :class:`SentenceLengthLimit` do (``generated``, ``limits`` and ``least``: per row, or ``generated`` for all)."""
    too_short = generated < least
    if bool(too_short.any()):
        scores[:, eos].masked_fill_(too_short, -math.inf)
    return force_eos_at_limits(scores, generated, limits, eos)


def length_penalty(length: torch.Tensor, alpha: float, kind: str) -> torch.Tensor:
    """lp(Y) per sentence (``length``: |Y|, a tensor): transformers' |Y|^α (``"hf"``) or GNMT's ((5 + |Y|) / 6)^α
    (``"gnmt"``, Wu et al. 2016, Eq. 14), in float64 and then float32, so that dividing by it gives what dividing
    by the Python number gives."""
    length = length.double()
    return (gnmt_length_penalty(length, alpha) if kind == "gnmt" else length**alpha).float()


def log_softmax_in_place(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last dimension written over ``logits`` (returns it): the same numbers as
    ``torch.log_softmax`` without a second ``[rows, vocab]`` tensor, whose fresh memory costs about as much as the
    computation."""
    return torch._log_softmax(logits, -1, False, out=logits)


#: Columns per block in :func:`top_k_per_row`.
TOP_K_BLOCK = 64


def top_k_per_row(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k)`` over the last dimension of ``[rows, vocab]`` scores (values and columns, best
    first; among equal scores another column may be chosen), faster when k is small next to the vocabulary.

    The k best scores of a row lie in the k blocks of :data:`TOP_K_BLOCK` columns with the largest maxima: a score
    in any other block has k block maxima at least as large above it. So one pass takes each block's maximum, and
    ``topk`` sorts only those maxima and then the k·64 scores of the chosen blocks (and the columns past the last
    whole block), not all of each row (a few times faster over an 8,000-word vocabulary on a CPU)."""
    rows, vocab = scores.shape
    blocks = vocab // TOP_K_BLOCK
    if blocks <= 2 * k:
        return torch.topk(scores, k)
    whole = blocks * TOP_K_BLOCK
    best_blocks = torch.topk(scores[:, :whole].view(rows, blocks, TOP_K_BLOCK).amax(-1), k).indices
    offsets = torch.arange(TOP_K_BLOCK, device=scores.device)
    columns = (best_blocks[:, :, None] * TOP_K_BLOCK + offsets).flatten(1)
    if whole < vocab:
        columns = torch.cat((columns, torch.arange(whole, vocab, device=scores.device).expand(rows, -1)), dim=1)
    values, chosen = torch.topk(scores.gather(1, columns), k)
    return values, columns.gather(1, chosen)


def queries_per_sentence(decoders: list[IncrementalDecoder]) -> int | torch.Tensor:
    """The rows :func:`next_token_logits_of` is about to give each sentence of ``decoders``: one number where all
    decoders agree, else one per sentence."""
    counts = {decoder.queries for decoder in decoders}
    if len(counts) == 1:
        return counts.pop()
    device = decoders[0].encoder_states.device
    return torch.cat([torch.full((decoder.sentences,), decoder.queries, device=device) for decoder in decoders])


def best_continuations(
    logits: torch.Tensor, generated: torch.Tensor, limits: torch.Tensor, least: torch.Tensor, eos: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``count`` best next tokens and their log-probabilities (``[rows, count]``, best first), with
    ``</s>`` ruled out or forced as :func:`_apply_bounds` rules (``generated``, ``limits``, ``least``: per row):
    log-softmax over the vocabulary, the bounds, then :func:`top_k_per_row`. Inside the vaswani package, where its
    native kernels are built (:mod:`vaswani.kernels`), one pass over the float32 CPU logits instead, writing only
    the chosen; among equal log-probabilities either may then choose another token."""
    if kernels is None or logits.dtype != torch.float32 or logits.device.type != "cpu" or not kernels.available():
        log_probs = _apply_bounds(log_softmax_in_place(logits), generated, limits, least, eos)
        return top_k_per_row(log_probs, count)
    too_short = generated < least
    values, tokens, normalizers = kernels.log_softmax_top_k(logits, count, too_short, eos)
    last_step = (generated + 1 >= limits).nonzero()[:, 0]
    if last_step.numel():  # only </s>, with its own log-probability (-inf where it is ruled out), as in fairseq
        eos_scores = (logits[last_step, eos] - normalizers[last_step]).masked_fill_(too_short[last_step], -math.inf)
        values[last_step] = -math.inf
        values[last_step, 0] = eos_scores
        tokens[last_step, 0] = eos
    return values, tokens


def beam_candidates(
    best: tuple[torch.Tensor, torch.Tensor], queries: int | torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each beam's best ``min(2k, vocab)`` continuations (log-probs and tokens, ``[b·k, ·]``) from those of the
    rows of :func:`next_token_logits_of` (``best``, :func:`best_continuations`; ``queries`` rows per sentence,
    :func:`queries_per_sentence`). The top 2k continuations of a sentence (2k, so that k of them do not end in
    ``</s>``) are among the top 2k of each of its beams: those are all that get the beam's score added (not
    ``[b, k, vocab]`` of them). A row shared by a sentence's beams (its first position) is copied to each of them
    only here, as 2k numbers instead of a vocabulary's."""
    if isinstance(queries, int):
        return best if queries == k else tuple(part.repeat_interleave(k // queries, dim=0) for part in best)
    copies = torch.repeat_interleave(k // queries, queries)
    return tuple(part.repeat_interleave(copies, dim=0) for part in best)


def _take(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tensor[b, indices[b, j], ...]`` (transformers' ``_gather_beams``)."""
    return torch.take_along_dim(tensor, indices.view(*indices.shape, *(1,) * (tensor.dim() - 2)), dim=1)


def _beam_step(
    beams: Beams, beam_best: torch.Tensor, beam_best_tokens: torch.Tensor, prompt: int, eos: int, lp, early_stopping
) -> torch.Tensor:
    """One step of transformers' beam search on ``beams`` (updated in place) given each beam's best continuations
    (``[b·k, per_beam]`` log-probs and tokens, :func:`beam_candidates`); returns the running beam each new running
    beam extends (``[b, k]``)."""
    b, k = beams.running_scores.shape
    per_beam = beam_best.shape[-1]
    scores = (beam_best.view(b, k, per_beam) + beams.running_scores[:, :, None]).view(b, k * per_beam)
    top_scores, top_indices = torch.topk(scores, 2 * k)
    top_beams, top_tokens = top_indices // per_beam, beam_best_tokens.view(b, k * per_beam).gather(1, top_indices)
    candidates = _take(beams.running, top_beams)
    column = (prompt + beams.generated).view(b, 1, 1).expand(b, 2 * k, 1)
    candidates.scatter_(2, column, top_tokens[:, :, None])
    ended = (top_tokens == eos) | (beams.generated + 1 >= beams.max_new)[:, None]

    # The best k candidates that did not end keep running.
    running_scores = top_scores + ended.to(torch.float32) * NEG
    best = torch.topk(running_scores, k)[1]
    beams.running, beams.running_scores = _take(candidates, best), _take(running_scores, best)

    # Candidates among the top k that ended join the finished hypotheses if they beat the worst of them, unless
    # the sentence is already done (transformers' _update_finished_beams).
    just_finished = ended & (torch.arange(2 * k, device=ended.device) < k)
    final_scores = top_scores / lp(beams.generated + 1)[:, None]
    full = beams.is_finished.all(-1, keepdim=True) & (early_stopping is True)
    final_scores += full.to(torch.float32) * NEG
    final_scores += (~beams.improvable).to(torch.float32) * NEG
    final_scores += (~just_finished) * NEG
    merged_scores = torch.cat((beams.finished_scores, final_scores), dim=1)
    kept = torch.topk(merged_scores, k)[1]
    beams.finished = _take(torch.cat((beams.finished, candidates), dim=1), kept)
    beams.finished_scores = _take(merged_scores, kept)
    lengths = (beams.generated + 1)[:, None].expand_as(top_beams)
    beams.finished_lengths = _take(torch.cat((beams.finished_lengths, lengths), dim=1), kept)
    beams.is_finished = _take(torch.cat((beams.is_finished, just_finished), dim=1), kept)
    beams.generated += 1
    return _take(top_beams, best)


def _update_improvable(beams: Beams, alpha: float, lp, early_stopping) -> None:
    """transformers' early-stop heuristic: can the best running beam still beat the worst finished hypothesis?
    (With ``early_stopping="never"`` and α > 0 it is scored at the longest length, else at its own.)"""
    length = beams.max_new if early_stopping == "never" and alpha > 0.0 else beams.generated
    best_running = beams.running_scores[:, :1] / lp(length)[:, None]
    worst_finished = torch.where(beams.is_finished, beams.finished_scores.min(1, keepdim=True)[0], NEG)
    beams.improvable = beams.improvable & (best_running > worst_finished).any(-1, keepdim=True)


def _sentence_done(beams: Beams, early_stopping) -> torch.Tensor:
    """Sentences whose finished hypotheses can no longer change: no running beam can improve on them,
    (``early_stopping=True``) there are k of them, or the request's length is reached."""
    done = ~beams.improvable[:, 0] | (beams.generated >= beams.max_new)
    return done | (beams.is_finished.all(-1) & (early_stopping is True))


@dataclass
class SearchRequest:
    """A batch as ``generate()`` prepared it for beam search (the arguments of :func:`beam_search`), to be
    searched later, together with other batches (:func:`beam_search_stream`)."""

    input_ids: torch.Tensor
    logits_processor: LogitsProcessorList
    generation_config: GenerationConfig
    model_kwargs: dict
    length_penalty_type: str

    def settings(self) -> tuple:
        """What must be the same for requests searched together: beams, prompt length, ``</s>``, the fill
        value, α, the length penalty's form and ``early_stopping``."""
        config = self.generation_config
        return (config.num_beams, self.input_ids.shape[1], int(config._eos_token_tensor.view(-1)[0]),
                _beam_fill_value(config), config.length_penalty, self.length_penalty_type, config.early_stopping)


@dataclass
class _Output:
    """A request's best hypotheses, filled in as its sentences are done."""

    tokens: torch.Tensor  # [sentences, max_length]
    lengths: torch.Tensor  # [sentences] generated tokens
    left: int  # sentences not yet done

    def result(self, prompt: int) -> torch.LongTensor:
        return self.tokens[:, : prompt + int(self.lengths.max())]


def beam_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    generation_config: GenerationConfig,
    model_kwargs: dict,
    length_penalty_type: str,
) -> torch.LongTensor:
    """Beam search (§6.1) for ``generate()``'s prepared request (``input_ids``: the start token per sentence ×
    beam); returns the best hypothesis per sentence, as transformers' beam search does."""
    request = SearchRequest(input_ids, logits_processor, generation_config, model_kwargs, length_penalty_type)
    return next(beam_search_stream(model, [request]))


#: :func:`beam_search_stream` takes in the next request when fewer sentences than this fraction of the last
#: request's are still being searched.
REFILL_BELOW = 0.25


@torch.inference_mode(False)  # autocast caches its bf16/fp16 weights only outside inference mode
@torch.no_grad()
def beam_search_stream(
    model: nn.Module, requests: Iterable[SearchRequest], refill_below: float = REFILL_BELOW
) -> Iterator[torch.LongTensor]:
    """Beam search over a stream of requests with continuous batching; yields each request's result, in order.

    A batch's sentences end at different steps, and its last steps decode a few long ones, where a step's
    fixed cost (reading every weight, Python, the beam step) is shared by few hypotheses. Here the next request's
    sentences join the search as soon as fewer than ``refill_below`` × the last request's sentences are left. Each
    request keeps its own :class:`IncrementalDecoder` (its own position, caches and attention), and a step runs
    the products of all of them together (:func:`next_token_logits_of`) and one beam step over all sentences. A
    sentence's search does not depend on the others in the batch: the results are what :func:`beam_search` gives
    for each request alone.
    """
    requests = iter(requests)
    pending = next(requests, None)
    if pending is None:
        return
    settings = pending.settings()
    k, prompt, eos, fill, alpha, penalty_type, early_stopping = settings
    lp = partial(length_penalty, alpha=alpha, kind=penalty_type)
    cohorts: list[IncrementalDecoder] = []  # one per request still being searched; beams' rows in this order
    spare = SpareBuffers(keep=2 * len(model.model.decoder.layers))  # a decoder's keys and values
    beams: Beams | None = None
    outputs: list[_Output | None] = []
    delivered = last_size = 0
    while True:
        while pending is not None and (beams is None or beams.request.numel() < refill_below * last_size):
            if pending.settings() != settings:
                raise ValueError(f"requests searched together need the same settings: {pending.settings()} after "
                                 f"{settings}")
            joining = Beams.start(pending, len(outputs), k, fill)
            cohorts.append(_start_decoder(model, pending.model_kwargs, k, int(joining.max_new[0]), spare))
            beams = joining if beams is None else beams.join(joining, fill)
            last_size = joining.request.numel()
            outputs.append(_Output(joining.finished[:, 0].clone(), torch.zeros_like(joining.row), last_size))
            pending = next(requests, None)
        if beams is None:
            return
        b, sizes = beams.request.numel(), [cohort.sentences for cohort in cohorts]
        queries = queries_per_sentence(cohorts)
        last_tokens = beams.running.gather(2, (prompt - 1 + beams.generated).view(b, 1, 1).expand(b, k, 1))
        logits = next_token_logits_of(cohorts, [tokens.reshape(-1) for tokens in last_tokens.split(sizes)])
        rows_of = partial(torch.repeat_interleave, repeats=queries)
        bounds = rows_of(beams.generated), rows_of(beams.limits), rows_of(beams.least)
        best = best_continuations(logits, *bounds, eos, min(2 * k, logits.shape[-1]))
        parents = _beam_step(beams, *beam_candidates(best, queries, k), prompt, eos, lp, early_stopping)
        _update_improvable(beams, alpha, lp, early_stopping)
        done = _sentence_done(beams, early_stopping)
        ended = bool(done.any())
        if ended:
            _deliver(beams, done, outputs)
        kept, offset = [], 0
        for cohort, cohort_parents, cohort_done in zip(cohorts, parents.split(sizes), done.split(sizes)):
            rows = cohort_parents + torch.arange(0, cohort.sentences * k, k, device=parents.device)[:, None]
            going = survivors(~cohort_done) if ended else None  # which stay: only worked out when some ended
            if going is None or going.numel() == cohort_done.numel():
                cohort.select(rows.view(-1))
            else:
                cohort.select(rows[going].view(-1), going)
            if ended:
                kept.append(going + offset)
            offset += cohort_done.numel()
        if ended:
            order = torch.cat(kept)
            beams = beams.keep(order) if order.numel() else None
            for cohort in cohorts:
                if not cohort.sentences:
                    cohort.release()
            cohorts = [cohort for cohort in cohorts if cohort.sentences]
        while delivered < len(outputs) and outputs[delivered].left == 0:
            yield outputs[delivered].result(prompt)
            outputs[delivered] = None  # delivered: its memory can go
            delivered += 1


def _deliver(beams: Beams, done: torch.Tensor, outputs: list[_Output | None]) -> None:
    """Copy the best finished hypothesis of each sentence that is ``done`` to its request's output."""
    for index in beams.request[done].unique().tolist():
        ours = done & (beams.request == index)
        output = outputs[index]
        rows = beams.row[ours]
        output.tokens[rows] = beams.finished[ours, 0, : output.tokens.shape[1]]
        output.lengths[rows] = beams.finished_lengths[ours, 0]
        output.left -= rows.numel()


def _beam_fill_value(config: GenerationConfig) -> int:
    """What transformers' beam search writes after a hypothesis' end: ``pad_token_id``, or ``</s>`` where that
    is None or 0 (its ``pad_token_id or eos_token_id[0]``)."""
    pad = config._pad_token_tensor
    return int(pad) if pad is not None and int(pad) != 0 else int(config._eos_token_tensor.view(-1)[0])


# ----------------------------------------------------------------------------------------------------------
# Greedy search and shared pieces
# ----------------------------------------------------------------------------------------------------------


@torch.inference_mode(False)  # autocast caches its bf16/fp16 weights only outside inference mode
@torch.no_grad()
def greedy_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    generation_config: GenerationConfig,
    model_kwargs: dict,
) -> torch.LongTensor:
    """Greedy search: the most likely next token until ``</s>`` or the length limit; ended sentences leave
    the batch and are padded with ``pad_token_id``, as in transformers' greedy search."""
    config = generation_config
    max_length, prompt = config.max_length, input_ids.shape[1]
    eos, pad = int(config._eos_token_tensor.view(-1)[0]), int(config._pad_token_tensor)
    decoder = _start_decoder(model, model_kwargs, 1, max_length - prompt)
    limits, least = (bound.to(input_ids.device) for bound in _length_bounds(
        logits_processor, prompt, input_ids.shape[0], max_length - prompt
    ))
    output = torch.full((input_ids.shape[0], max_length), pad, dtype=torch.long, device=input_ids.device)
    output[:, :prompt] = input_ids
    active = torch.arange(input_ids.shape[0], device=input_ids.device)
    for cur_len in range(prompt, max_length):
        logits = decoder.next_token_logits(output[active, cur_len - 1])
        tokens = _apply_bounds(logits, cur_len - prompt, limits[active], least[active], eos).argmax(-1)
        output[active, cur_len] = tokens
        going = tokens != eos
        if cur_len + 1 >= max_length or not bool(going.any()):
            break
        if not bool(going.all()):
            rows = survivors(going)
            active = active[rows]
            decoder.select(rows, rows)
    return output[:, : cur_len + 1]


def _start_decoder(
    model: nn.Module, model_kwargs: dict, beams: int, steps: int, spare: SpareBuffers | None = None
) -> IncrementalDecoder:
    """An :class:`IncrementalDecoder` over the encoder output ``generate()`` prepared (one row per sentence
    × beam, of which it keeps one per sentence)."""
    encoder_states = model_kwargs["encoder_outputs"].last_hidden_state[::beams]
    mask = model_kwargs.get("attention_mask")
    return IncrementalDecoder(model, encoder_states, None if mask is None else mask[::beams], beams, steps, spare)
