"""``pipeline("translation")`` / ``pipeline("text2text-generation")`` for Vaswani models.

transformers 5.24 removed both tasks. :class:`VaswaniTranslationPipeline` brings them back for any
encoder-decoder model with a tokenizer; decoding is the model's ``generate()`` (for Vaswani models the
paper's beam search, §6.1), and every ``generate()`` option can be passed at construction or per call.

How ``pipeline(task, model=folder)`` finds it:

* every saved Vaswani folder lists it in ``config.json`` under ``custom_pipelines`` and carries this file
  (``import vaswani`` hands :data:`CUSTOM_PIPELINES` to the model class, whose ``save_pretrained`` writes them
  and copies this file): ``pipeline("translation", model=folder, trust_remote_code=True)`` works where the
  package is not installed, with or without it;
* ``import vaswani`` registers it under both task names, so a model object works without remote code:
  ``pipeline("translation", model=model, tokenizer=tokenizer)``; transformers 4's language-pair names
  (``"translation_en_to_de"``) resolve to ``"translation"`` (the languages are the model's).

Output: ``[{"translation_text": ...}]`` per input for ``translation``, ``[{"generated_text": ...}]`` for
``text2text-generation`` (transformers 4's formats). An empty or blank input gives an empty output.

This file imports only torch and transformers (it is copied next to saved models).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import AutoModelForSeq2SeqLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY, REMOVED_TASKS

TRANSLATION_TASKS = ("translation", "text2text-generation")
#: Written into ``config.custom_pipelines`` of saved models (``module.Class`` as remote code expects it).
CUSTOM_PIPELINES = {
    task: {"impl": "pipeline.VaswaniTranslationPipeline", "pt": ["AutoModelForSeq2SeqLM"], "type": "text"}
    for task in TRANSLATION_TASKS
}


class VaswaniTranslationPipeline(Pipeline):
    """Text in, translated text out: tokenizer → ``model.generate`` → ``batch_decode``."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    _pipeline_calls_generate = True

    def _sanitize_parameters(
        self, truncation: bool | None = None, max_input_tokens: int | None = None, **generate_kwargs: Any
    ) -> tuple[dict, dict, dict]:
        preprocess = {}
        if truncation is not None:
            preprocess["truncation"] = truncation
        if max_input_tokens is not None:
            preprocess["max_input_tokens"] = max_input_tokens
        return preprocess, generate_kwargs, {}

    def __call__(self, inputs: str | list[str], **kwargs: Any) -> list[dict[str, str]] | list[list[dict[str, str]]]:
        """Translate one text (→ a list with one dict) or a list of texts (→ one such list per text)."""
        return super().__call__(inputs, **kwargs)

    def preprocess(self, text: str, truncation: bool = True, max_input_tokens: int | None = None) -> dict:
        if not isinstance(text, str):
            raise ValueError(f"{self.task or 'translation'} takes a string or a list of strings, got {type(text)}")
        encoded = self.tokenizer(
            text, return_tensors="pt", truncation=truncation, max_length=max_input_tokens
        )
        encoded["is_blank"] = torch.tensor([not text.strip()])
        return encoded

    def _forward(self, model_inputs: dict, **generate_kwargs: Any) -> dict:
        is_blank = model_inputs.pop("is_blank")
        output_ids = self.model.generate(**model_inputs, **self._prepare_generate_kwargs(generate_kwargs))
        rows = model_inputs["input_ids"].shape[0]
        return {"output_ids": output_ids.reshape(rows, -1, output_ids.shape[-1]), "is_blank": is_blank}

    def postprocess(self, model_outputs: dict) -> list[dict[str, str]]:
        key = "generated_text" if self.task == "text2text-generation" else "translation_text"
        texts = self.tokenizer.batch_decode(model_outputs["output_ids"][0], skip_special_tokens=True)
        if bool(model_outputs["is_blank"].reshape(-1)[0]):
            texts = [""] * len(texts)
        return [{key: text} for text in texts]


def language_pair_task(task: str) -> str:
    """``translation_XX_to_YY`` (transformers 4's task names) → ``translation``; any other task unchanged."""
    return "translation" if re.fullmatch(r"translation_\w+_to_\w+", task) else task


def register_pipelines() -> None:
    """Serve the tasks transformers 5.24 removed with :class:`VaswaniTranslationPipeline`, under their names and
    transformers 4's ``translation_XX_to_YY`` names."""
    for task in TRANSLATION_TASKS:
        REMOVED_TASKS.pop(task, None)
        PIPELINE_REGISTRY.register_pipeline(
            task, pipeline_class=VaswaniTranslationPipeline, pt_model=AutoModelForSeq2SeqLM, type="text"
        )
    check_task = PIPELINE_REGISTRY.check_task
    PIPELINE_REGISTRY.check_task = lambda task: check_task(language_pair_task(task))
