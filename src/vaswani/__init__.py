"""vaswani: the Transformer of "Attention Is All You Need" (Vaswani et al., 2017) for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.pipelines import PIPELINE_REGISTRY, REMOVED_TASKS

from .configuration import PRESETS, VaswaniConfig
from .modeling import VaswaniForConditionalGeneration, VaswaniModel, VaswaniPreTrainedModel
from .pipeline import TRANSLATION_TASKS, VaswaniTranslationPipeline
from .tokenization import VaswaniTokenizerFast

AutoConfig.register(VaswaniConfig.model_type, VaswaniConfig, exist_ok=True)
AutoModel.register(VaswaniConfig, VaswaniModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(VaswaniConfig, VaswaniForConditionalGeneration, exist_ok=True)
VaswaniConfig.register_for_auto_class()
VaswaniModel.register_for_auto_class("AutoModel")
VaswaniForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
AutoTokenizer.register(VaswaniConfig, tokenizer_class=VaswaniTokenizerFast, exist_ok=True)
VaswaniTokenizerFast.register_for_auto_class("AutoTokenizer")
for _task in TRANSLATION_TASKS:  # removed in transformers 5.24; served again by the package's pipeline
    REMOVED_TASKS.pop(_task, None)
    PIPELINE_REGISTRY.register_pipeline(
        _task, pipeline_class=VaswaniTranslationPipeline, pt_model=AutoModelForSeq2SeqLM, type="text"
    )

__all__ = [
    "PRESETS",
    "VaswaniConfig",
    "VaswaniForConditionalGeneration",
    "VaswaniModel",
    "VaswaniPreTrainedModel",
    "VaswaniTokenizerFast",
    "VaswaniTranslationPipeline",
]
