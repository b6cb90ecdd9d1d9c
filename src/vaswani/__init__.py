"""vaswani: the Transformer of "Attention Is All You Need" (Vaswani et al., 2017) for Hugging Face transformers."""

from .configuration import PRESETS, VaswaniConfig

__all__ = ["PRESETS", "VaswaniConfig"]
