"""Word alignment from encoder-decoder attention (§3.2.3), scored on the number corpus.

In encoder-decoder attention "the queries come from the previous decoder layer, and the memory keys and
values come from the output of the encoder" (§3.2.3), so row j of a cross-attention matrix says where in
the source the decoder looks while it produces target token j. Taking the argmax of that row gives an
alignment; how often it is right is a simple measure of whether a layer/head has learned "which source
word does this target word translate".

Subwords to words, by character offsets. The model sees byte-level BPE tokens, but alignments are between
words. Every token carries its character span in the text (``return_offsets_mapping=True``), and every
word is a character span too, so the link between them is the number of characters they share:

* source side: a word's attention is the **sum** over its tokens (the probability mass the row puts on the
  word); a token shared by two words is split by its share of characters. Tokens that overlap no word
  (``</s>``, a hyphen, a lone space) are left out.
* target side: a word's row is the **average** of the rows of the tokens that overlap it, weighted by
  the characters they share. The English words of the number corpus are split at spaces *and* hyphens
  ("forty-two" → forty, two), which the byte-level pre-tokenizer also splits, so every English token
  lies inside one word; the Ġ prefix (a leading space) is not used because "two" after a hyphen begins a
  word without one.
* German numbers are one word ("zweiundvierzig"); the generator knows its morphemes (zwei|und|vierzig),
  and their spans follow from the cumulative lengths of the pieces. BPE may merge pieces into one token
  ("undvierzig", "hundertzwei"): pieces covered by the same tokens then share one row, and if they align
  to different English words (hundert → hundred, zwei → two) at most one of them can be right. The
  report gives this tokenization ceiling next to the accuracy.

Rows: with teacher forcing the decoder reads ``<s> y1 … y(n-1)`` and row j predicts label ``yj``
(``row="predicting"``, the default, as in Garg et al. 2019); ``row="input"`` uses the row whose *query*
is ``yj`` itself (the next step), which some heads align better.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..demo.numbers import NumberPair

Span = tuple[int, int]
ROWS = ("predicting", "input")


def word_spans(text: str, pattern: str = r"[^\s]+") -> list[Span]:
    """Character spans of the words of ``text``: maximal runs matching ``pattern`` (default: no whitespace).

    The number corpus splits English at spaces and hyphens: ``word_spans(text, r"[^\\s-]+")``.
    """
    return [match.span() for match in re.finditer(pattern, text)]


def piece_spans(pieces: Sequence[str]) -> list[Span]:
    """Spans of consecutive pieces of one word (German morphemes): cumulative lengths of the pieces."""
    spans, start = [], 0
    for piece in pieces:
        spans.append((start, start + len(piece)))
        start += len(piece)
    return spans


def overlap_matrix(token_offsets: Sequence[Span], spans: Sequence[Span]) -> np.ndarray:
    """``[tokens, spans]`` number of characters each token shares with each span (0 for special tokens)."""
    matrix = np.zeros((len(token_offsets), len(spans)), dtype=np.float64)
    for t, (t_start, t_end) in enumerate(token_offsets):
        for s, (s_start, s_end) in enumerate(spans):
            matrix[t, s] = max(0, min(t_end, s_end) - max(t_start, s_start))
    return matrix


def source_word_weights(source_offsets: Sequence[Span], source_spans: Sequence[Span]) -> np.ndarray:
    """``[tokens, words]``: each token's share of characters in each word (rows sum to 1, or 0 for a token in
    no word); ``attention @ weights`` sums a row's attention over each word's tokens."""
    source = overlap_matrix(source_offsets, source_spans)
    token_chars = source.sum(axis=1, keepdims=True)
    return np.divide(source, token_chars, out=np.zeros_like(source), where=token_chars > 0)


def word_attention(
    attention: np.ndarray,
    source_offsets: Sequence[Span],
    target_offsets: Sequence[Span],
    source_spans: Sequence[Span],
    target_spans: Sequence[Span],
) -> np.ndarray:
    """Token attention ``[..., target_tokens, source_tokens]`` → word attention ``[..., target_words,
    source_words]``: source tokens summed into words, target rows averaged into words (see the module doc).

    A target word that no token overlaps gets a row of NaN.
    """
    attention = np.asarray(attention, dtype=np.float64)
    if attention.shape[-2:] != (len(target_offsets), len(source_offsets)):
        raise ValueError(
            f"attention has shape {attention.shape[-2:]} (target, source) but there are {len(target_offsets)} "
            f"target and {len(source_offsets)} source token offsets; pass the offsets of the tokens the "
            "attention was computed on"
        )
    source = source_word_weights(source_offsets, source_spans)
    target = overlap_matrix(target_offsets, target_spans)
    word_chars = target.sum(axis=0, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        target = target / word_chars  # NaN columns for words no token covers
    return np.einsum("tw,...ts,sv->...wv", target, attention, source)


def align_from_cross_attention(
    attention: np.ndarray,
    source_offsets: Sequence[Span],
    target_offsets: Sequence[Span],
    source_spans: Sequence[Span],
    target_spans: Sequence[Span],
) -> list[tuple[int, int]]:
    """Argmax alignment: for each target word, the source word its (word-level) attention row peaks on.

    ``attention`` is one ``[target_tokens, source_tokens]`` cross-attention matrix (one head, or a mean of
    heads/layers) whose row j belongs to target token j. Returns ``(target_word, source_word)`` pairs in
    target order; target words no token covers are left out.
    """
    attention = np.asarray(attention)
    if attention.ndim != 2:
        raise ValueError(f"expected one [target, source] attention matrix, got shape {attention.shape}")
    if not source_spans:
        raise ValueError("the source has no words to align to")
    words = word_attention(attention, source_offsets, target_offsets, source_spans, target_spans)
    return [(t, int(np.argmax(row))) for t, row in enumerate(words) if not np.isnan(row).any()]


def _tokenize_with_offsets(tokenizer, texts: Sequence[str]) -> tuple[list[list[int]], list[list[Span]]]:
    encoded = tokenizer(list(texts), return_offsets_mapping=True)
    return encoded["input_ids"], [[tuple(span) for span in row] for row in encoded["offset_mapping"]]


@contextmanager
def eager_attention(model) -> Iterator[str | None]:
    """Run the block with eager attention, the only implementation that returns attention probabilities
    (§3.2.1 written out), and restore the model's own implementation afterwards.

    Yields None when the model already runs eager attention, else a note saying that it was switched (also
    issued as a ``UserWarning``), e.g. for a model saved or loaded with ``"sdpa"``.
    """
    current = getattr(model.config, "_attn_implementation", None)
    if current in (None, "eager"):
        yield None
        return
    try:
        model.set_attn_implementation("eager")
    except (ValueError, ImportError, AttributeError, NotImplementedError) as err:
        raise ValueError(
            f"the model uses {current!r} attention, which returns no attention weights, and cannot switch to "
            f"'eager' ({err}); load it with attn_implementation='eager'"
        ) from err
    note = (
        f"the model runs {current!r} attention, which returns no attention weights; "
        "switched to 'eager' (same results) to capture them"
    )
    warnings.warn(note, UserWarning, stacklevel=3)
    try:
        yield note
    finally:
        model.set_attn_implementation(current)


def cross_attention_batch(
    model, tokenizer, sources: Sequence[str], targets: Sequence[str]
) -> tuple[list[np.ndarray], list[list[Span]], list[list[Span]]]:
    """Teacher-forced cross-attention of each (source, target) pair: per pair ``[layers, heads, T, S]``
    (row j predicts target token j, ``</s>`` included), plus the source and target token offsets."""
    source_ids, source_offsets = _tokenize_with_offsets(tokenizer, sources)
    target_ids, target_offsets = _tokenize_with_offsets(tokenizer, targets)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch, s_len, t_len = len(sources), max(map(len, source_ids)), max(map(len, target_ids))
    input_ids = torch.full((batch, s_len), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((batch, t_len), -100, dtype=torch.long)
    for row, (src, tgt) in enumerate(zip(source_ids, target_ids)):
        input_ids[row, : len(src)] = torch.tensor(src)
        attention_mask[row, : len(src)] = 1
        labels[row, : len(tgt)] = torch.tensor(tgt)
    start = model.config.decoder_start_token_id
    start = tokenizer.bos_token_id if start is None else start
    decoder_input_ids = torch.full_like(labels, pad)
    decoder_input_ids[:, 0] = start
    decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad)
    decoder_mask = (labels != -100).long()
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_mask,
            output_attentions=True,
        )
    if not out.cross_attentions:
        raise ValueError("the model returned no cross-attention weights; use attn_implementation='eager'")
    cross = torch.stack(out.cross_attentions, dim=1).float().numpy()  # [batch, layers, heads, T, S]
    per_pair = [cross[b, :, :, : len(target_ids[b]), : len(source_ids[b])] for b in range(batch)]
    return per_pair, source_offsets, target_offsets


@dataclass
class AlignmentReport:
    """Argmax-alignment accuracy of every cross-attention layer/head against the gold alignment.

    Arrays are ``[layers + 1, heads + 1]``: the last column is the mean of a layer's heads, the last row the
    mean over layers; ``best_layer`` / ``best_head`` are None for a mean.

    * ``accuracy``: German pieces whose argmax English word is the gold one (the headline figure);
    * ``crossing_accuracy``: the same over the reordered links only (those crossing another link: units
      and tens of "zwei|und|vierzig" ↔ "forty two"), which a monotonic alignment gets wrong;
    * ``token_accuracy``: target subword tokens whose argmax English word is aligned to one of the pieces
      the token overlaps; it does not penalise a vocabulary that merges pieces ("hundertzwei").

    ``ceiling`` is the best piece accuracy any attention could reach with this tokenization (pieces whose
    rows are identical because one token covers them share one argmax); ``diagonal_baseline`` and
    ``token_diagonal_baseline`` align monotonically (position i of n to word round(i·(m-1)/(n-1))).
    """

    accuracy: np.ndarray
    crossing_accuracy: np.ndarray
    token_accuracy: np.ndarray
    best_layer: int | None
    best_head: int | None
    best_accuracy: float
    best_crossing_accuracy: float
    best_token_accuracy: float
    ceiling: float
    diagonal_baseline: float
    token_diagonal_baseline: float
    n_sentences: int
    n_links: int
    n_crossing: int
    n_tokens: int
    row: str = "predicting"
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def name(layer: int | None, head: int | None) -> str:
        return f"layer {'mean' if layer is None else layer}, head {'mean' if head is None else head}"

    @staticmethod
    def _grid(values: np.ndarray) -> list[str]:
        layers, heads = values.shape[0] - 1, values.shape[1] - 1
        lines = ["layer  " + " ".join(f"{f'h{h}':>6}" for h in range(heads)) + f" {'mean':>6}"]
        for layer in range(layers + 1):
            label = f"{layer:>5}" if layer < layers else " mean"
            lines.append(label + "  " + " ".join(f"{v:6.1%}" for v in values[layer]))
        return lines

    def best_token_head(self) -> tuple[int | None, int | None]:
        layer, head = np.unravel_index(int(np.argmax(self.token_accuracy)), self.token_accuracy.shape)
        n_layers, n_heads = self.token_accuracy.shape[0] - 1, self.token_accuracy.shape[1] - 1
        return (None if layer == n_layers else int(layer)), (None if head == n_heads else int(head))

    def table(self) -> str:
        """Both accuracy grids as text, with the best heads, the ceiling and the baselines."""
        lines = [
            f"argmax alignment accuracy of cross-attention, German pieces → English words ({self.n_links} pieces "
            f"in {self.n_sentences} sentences, rows: {self.row})",
            *self._grid(self.accuracy),
            f"best: {self.name(self.best_layer, self.best_head)}: {self.best_accuracy:.1%} of all pieces, "
            f"{self.best_crossing_accuracy:.1%} of the {self.n_crossing} reordered (crossing) ones",
            f"tokenization ceiling: {self.ceiling:.1%}; monotonic (diagonal) baseline: {self.diagonal_baseline:.1%}",
            "",
            f"target subword tokens → English words ({self.n_tokens} tokens; right if the word is aligned to a "
            "piece the token overlaps)",
            *self._grid(self.token_accuracy),
            f"best: {self.name(*self.best_token_head())}: {self.best_token_accuracy:.1%}; "
            f"monotonic baseline: {self.token_diagonal_baseline:.1%}",
        ]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def crossing_links(alignment: Sequence[tuple[int, int]]) -> list[bool]:
    """For each ``(target, source)`` link, whether it crosses another link (the order is swapped)."""
    return [any((p - q) * (w - v) < 0 for q, v in alignment) for p, w in alignment]


def tokenization_ceiling(target_overlap: np.ndarray, gold: Sequence[int]) -> int:
    """How many pieces can be right at best: pieces with identical (normalised) token weights get identical
    rows, so within such a group only the most common gold word can be predicted."""
    weights = target_overlap / np.maximum(target_overlap.sum(axis=0, keepdims=True), 1)
    groups: dict[bytes, list[int]] = {}
    for piece in range(weights.shape[1]):
        if weights[:, piece].any():
            groups.setdefault(np.round(weights[:, piece], 6).tobytes(), []).append(gold[piece])
    return sum(max(words.count(w) for w in set(words)) for words in groups.values())


def _monotonic(i: int, n: int, m: int) -> int:
    return round(i * (m - 1) / max(n - 1, 1))


def alignment_accuracy(
    model,
    tokenizer,
    pairs: Sequence[NumberPair],
    *,
    batch_size: int = 64,
    row: str = "predicting",
) -> AlignmentReport:
    """Score the argmax alignment of every cross-attention layer/head against the number corpus' gold
    alignment (German piece → English word, units before tens), with teacher forcing on the reference.

    The model's own translations play no part: the decoder reads the gold German, so this measures the
    attention, not the translation. A model on another attention implementation is switched to eager
    for the measurement (with a warning) and back.
    """
    if row not in ROWS:
        raise ValueError(f"row must be one of {ROWS}, got {row!r}")
    if not pairs:
        raise ValueError("alignment_accuracy needs at least one NumberPair (see vaswani.demo.numbers)")
    with eager_attention(model) as switched:
        return _alignment_accuracy(model, tokenizer, pairs, batch_size, row, [switched] if switched else [])


def _alignment_accuracy(model, tokenizer, pairs, batch_size: int, row: str, notes: list[str]) -> AlignmentReport:
    model.eval()
    sums: dict[str, np.ndarray | int] = {"pieces": 0, "crossing": 0, "tokens": 0}
    counts = {"pieces": 0, "crossing": 0, "tokens": 0, "ceiling": 0, "diagonal": 0, "token_diagonal": 0}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        attentions, source_offsets, target_offsets = cross_attention_batch(
            model, tokenizer, [p.english for p in chunk], [p.german for p in chunk]
        )
        for pair, attention, src_off, tgt_off in zip(chunk, attentions, source_offsets, target_offsets):
            if row == "input":  # row j+1 reads target token j; the last token (</s>) has no such row
                attention = attention[:, :, 1:, :]
                tgt_off = tgt_off[: attention.shape[2]]
            source_spans = word_spans(pair.english, r"[^\s-]+")
            if len(source_spans) != len(pair.english_words):
                raise ValueError(f"cannot split {pair.english!r} into the words {pair.english_words}")
            target_spans = piece_spans(pair.german_pieces)
            full = np.concatenate([attention, attention.mean(axis=0, keepdims=True)], axis=0)
            full = np.concatenate([full, full.mean(axis=1, keepdims=True)], axis=1)  # [L+1, H+1, T, S]
            gold = np.asarray([word for _, word in sorted(pair.alignment)])
            crosses = np.asarray(crossing_links(sorted(pair.alignment)))

            # pieces: rows averaged into pieces, source tokens summed into words
            words = word_attention(full, src_off, tgt_off, source_spans, target_spans)
            predicted = np.nan_to_num(words, nan=-1.0).argmax(axis=-1)  # [L+1, H+1, pieces]
            right = predicted == gold
            sums["pieces"] = sums["pieces"] + right.sum(axis=-1)
            sums["crossing"] = sums["crossing"] + right[..., crosses].sum(axis=-1)
            counts["pieces"] += len(gold)
            counts["crossing"] += int(crosses.sum())
            target_overlap = overlap_matrix(tgt_off, target_spans)
            counts["ceiling"] += tokenization_ceiling(target_overlap, list(gold))
            counts["diagonal"] += sum(
                int(_monotonic(p, len(gold), len(source_spans)) == w) for p, w in enumerate(gold)
            )

            # tokens: each target token's row, source tokens summed into words
            per_token = full @ source_word_weights(src_off, source_spans)  # [L+1, H+1, tokens, words]
            allowed = [set(gold[target_overlap[t] > 0]) for t in range(len(tgt_off))]
            scored = [t for t, words_ok in enumerate(allowed) if words_ok]
            token_pred = per_token.argmax(axis=-1)
            sums["tokens"] = sums["tokens"] + sum(np.isin(token_pred[..., t], list(allowed[t])) for t in scored)
            counts["tokens"] += len(scored)
            counts["token_diagonal"] += sum(
                int(_monotonic(i, len(scored), len(source_spans)) in allowed[t]) for i, t in enumerate(scored)
            )
    accuracy = sums["pieces"] / counts["pieces"]
    crossing_accuracy = sums["crossing"] / max(counts["crossing"], 1)
    token_accuracy = sums["tokens"] / max(counts["tokens"], 1)
    layer, head = np.unravel_index(int(np.argmax(accuracy)), accuracy.shape)
    n_layers, n_heads = accuracy.shape[0] - 1, accuracy.shape[1] - 1
    return AlignmentReport(
        accuracy=accuracy,
        crossing_accuracy=crossing_accuracy,
        token_accuracy=token_accuracy,
        best_layer=None if layer == n_layers else int(layer),
        best_head=None if head == n_heads else int(head),
        best_accuracy=float(accuracy[layer, head]),
        best_crossing_accuracy=float(crossing_accuracy[layer, head]),
        best_token_accuracy=float(token_accuracy.max()),
        ceiling=counts["ceiling"] / counts["pieces"],
        diagonal_baseline=counts["diagonal"] / counts["pieces"],
        token_diagonal_baseline=counts["token_diagonal"] / max(counts["tokens"], 1),
        n_sentences=len(pairs),
        n_links=counts["pieces"],
        n_crossing=counts["crossing"],
        n_tokens=counts["tokens"],
        row=row,
        notes=notes,
    )


__all__ = [
    "AlignmentReport",
    "align_from_cross_attention",
    "alignment_accuracy",
    "cross_attention_batch",
    "crossing_links",
    "eager_attention",
    "overlap_matrix",
    "piece_spans",
    "source_word_weights",
    "tokenization_ceiling",
    "word_attention",
    "word_spans",
]
