"""Builders shared by the tests: the test sentence pairs, a tiny model and a padded batch."""

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
#: 300 short English-German pairs written for the tests (line i of pairs.de translates line i of pairs.en).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
#: Multi30k (task 1, raw) for the optional quality tests: the folder in $VASWANI_MULTI30K, else multi30k/ in the
#: repository (where the README's commands read it).
MULTI30K = Path(os.environ.get("VASWANI_MULTI30K", REPO_ROOT / "multi30k"))
needs_multi30k = pytest.mark.skipif(
    not (MULTI30K / "train.en.gz").is_file(),
    reason=f"Multi30k not found in {MULTI30K}: put train.en.gz, train.de.gz etc. of github.com/multi30k/dataset "
    "(data/task1/raw) there, or point VASWANI_MULTI30K at such a folder",
)


def fixture_lines(lang: str) -> list[str]:
    """The ``lang`` side ("en" or "de") of the test sentence pairs."""
    return (FIXTURES / f"pairs.{lang}").read_text(encoding="utf-8").splitlines()


def tiny_config(**overrides):
    from vaswani import VaswaniConfig

    values = {
        "vocab_size": 97,
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
    }
    values.update(overrides)
    return VaswaniConfig(**values)


def tiny_model(seed: int = 0, **overrides):
    from vaswani import VaswaniForConditionalGeneration

    torch.manual_seed(seed)
    return VaswaniForConditionalGeneration(tiny_config(**overrides)).eval()


def padded_batch(vocab_size: int = 97, lengths=(9, 6, 3), seed: int = 1, pad: int = 0, eos: int = 3):
    """Source ids with right padding and an attention mask; each row ends with </s>."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : length - 1] = torch.randint(4, vocab_size, (length - 1,), generator=generator)
        ids[row, length - 1] = eos
        mask[row, :length] = 1
    return ids, mask
