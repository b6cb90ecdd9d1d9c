"""vaswani: the Transformer of "Attention Is All You Need" (Vaswani et al., 2017) for Hugging Face transformers."""

from transformers import AutoTokenizer

from .configuration import PRESETS, VaswaniConfig
from .tokenization import VaswaniTokenizerFast

AutoTokenizer.register(VaswaniConfig, tokenizer_class=VaswaniTokenizerFast, exist_ok=True)
VaswaniTokenizerFast.register_for_auto_class("AutoTokenizer")

__all__ = ["PRESETS", "VaswaniConfig", "VaswaniTokenizerFast"]
