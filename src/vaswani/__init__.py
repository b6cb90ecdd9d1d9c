"""vaswani: the Transformer of "Attention Is All You Need" (Vaswani et al., 2017) for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

from .configuration import PRESETS, VaswaniConfig
from .modeling import VaswaniForConditionalGeneration, VaswaniModel, VaswaniPreTrainedModel
from .pipeline import CUSTOM_PIPELINES, VaswaniTranslationPipeline, register_pipelines
from .tokenization import VaswaniTokenizerFast

AutoConfig.register(VaswaniConfig.model_type, VaswaniConfig, exist_ok=True)
AutoModel.register(VaswaniConfig, VaswaniModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(VaswaniConfig, VaswaniForConditionalGeneration, exist_ok=True)
VaswaniConfig.register_for_auto_class()
VaswaniModel.register_for_auto_class("AutoModel")
VaswaniForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
AutoTokenizer.register(VaswaniConfig, tokenizer_class=VaswaniTokenizerFast, exist_ok=True)
register_pipelines()  # translation and text2text-generation, removed in transformers 5.24
VaswaniForConditionalGeneration.saved_pipelines = CUSTOM_PIPELINES  # saved folders declare them, with pipeline.py

__all__ = [
    "PRESETS",
    "VaswaniConfig",
    "VaswaniForConditionalGeneration",
    "VaswaniModel",
    "VaswaniPreTrainedModel",
    "VaswaniTokenizerFast",
    "VaswaniTranslationPipeline",
]
