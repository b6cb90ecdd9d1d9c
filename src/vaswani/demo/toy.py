"""A tiny English→German number-words Transformer trained in seconds on a CPU, for tests and pictures.

Not the demo (``vaswani demo`` trains the real one): a plain Adam loop over a small byte-level BPE and a
2+2-layer model, enough for the encoder-decoder attention to learn the units-before-tens reordering.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from ..configuration import VaswaniConfig
from ..modeling import VaswaniForConditionalGeneration
from ..tokenization import VaswaniTokenizerFast, train_tokenizer
from .numbers import number_to_english, number_to_german


@dataclass
class ToyRun:
    model: VaswaniForConditionalGeneration
    tokenizer: VaswaniTokenizerFast
    steps: int
    final_loss: float
    seconds: float
    held_out: list[int]  # numbers not trained on


def train_number_model(
    *,
    max_value: int = 999,
    steps: int = 200,
    batch_size: int = 64,
    vocab_size: int = 300,
    d_model: int = 64,
    layers: int = 2,
    heads: int = 4,
    lr: float = 2e-3,
    n_held_out: int = 100,
    seed: int = 0,
    threads: int | None = 1,
) -> ToyRun:
    """Train a small model on number words 0 … ``max_value`` (minus ``n_held_out`` held-out numbers).

    Adam (β 0.9/0.98, §5.3) at a constant ``lr`` after a 20-step linear warm-up, no dropout and no label
    smoothing. ``threads``: torch CPU threads while training (restored after); one thread is much faster
    than several for a model this small, especially on a busy machine (about 0.05 s per step).
    """
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(max_value, steps, batch_size, vocab_size, d_model, layers, heads, lr, n_held_out, seed, start)
    finally:
        torch.set_num_threads(previous_threads)


def _train(max_value, steps, batch_size, vocab_size, d_model, layers, heads, lr, n_held_out, seed, start) -> ToyRun:
    if not 0 <= n_held_out < max_value:
        raise ValueError(f"n_held_out must be in 0 … {max_value - 1}, got {n_held_out}")
    numbers = random.Random(seed).sample(range(max_value + 1), max_value + 1)
    held_out, train = numbers[:n_held_out], numbers[n_held_out:]
    pairs = [(number_to_english(n), number_to_german(n)) for n in train]
    tokenizer = train_tokenizer([text for pair in pairs for text in pair], vocab_size=vocab_size, show_progress=False)
    config = VaswaniConfig(
        vocab_size=len(tokenizer),
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = VaswaniForConditionalGeneration(config)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    rng = random.Random(seed + 1)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = rng.sample(pairs, min(batch_size, len(pairs)))
        encoded = tokenizer(
            [src for src, _ in batch], text_target=[tgt for _, tgt in batch], padding=True, return_tensors="pt"
        )
        labels = encoded["labels"].masked_fill(encoded["labels"] == tokenizer.pad_token_id, -100)
        loss = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return ToyRun(model, tokenizer, steps, float(loss.detach()), time.perf_counter() - start, held_out)


__all__ = ["ToyRun", "train_number_model"]
