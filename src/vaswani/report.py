"""Reports about the model itself: its parameter count next to the paper's (Table 3)."""

from __future__ import annotations

import torch

from .configuration import VaswaniConfig
from .modeling import VaswaniForConditionalGeneration

#: Parameter counts the paper reports in Table 3 (millions).
PAPER_PARAMETERS_M = {"base": 65, "big": 213}


def parameter_count_table(vocab_size: int = 37000) -> str:
    """A Markdown table of parameter counts of the paper's presets with a shared vocabulary."""
    rows = ["| preset | parameters (this package) | paper (Table 3) |", "|---|---|---|"]
    for name in ("base", "big"):
        config = VaswaniConfig.from_preset(name, vocab_size=vocab_size)
        with torch.device("meta"):  # counts without allocating the weights
            model = VaswaniForConditionalGeneration(config)
        count = model.num_parameters()
        rows.append(f"| {name} | {count:,} ({count / 1e6:.1f}M) | {PAPER_PARAMETERS_M[name]}M |")
    return "\n".join(rows)
