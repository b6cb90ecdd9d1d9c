"""vaswani: the Transformer of "Attention Is All You Need" (Vaswani et al., 2017) for Hugging Face transformers.

``import vaswani`` imports neither torch nor transformers, so the ``vaswani`` command answers ``--help`` at once.
What the import promises still holds: transformers' ``AutoConfig``, ``AutoModel``, ``AutoModelForSeq2SeqLM``,
``AutoTokenizer`` and ``pipeline("translation")`` know the Vaswani model whenever they are used, because each
registration runs as soon as transformers has loaded the module that holds the registry (at once if it already
has). The names in ``__all__`` load on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

#: Public name → the module that defines it.
_EXPORTS = {
    "PRESETS": "configuration",
    "VaswaniConfig": "configuration",
    "VaswaniForConditionalGeneration": "modeling",
    "VaswaniModel": "modeling",
    "VaswaniPreTrainedModel": "modeling",
    "VaswaniTokenizerFast": "tokenization",
    "VaswaniTranslationPipeline": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_all()
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def _register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from .configuration import VaswaniConfig

    AutoConfig.register(VaswaniConfig.model_type, VaswaniConfig, exist_ok=True)
    VaswaniConfig.register_for_auto_class()


def _register_models() -> None:
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForSeq2SeqLM

    from .configuration import VaswaniConfig
    from .modeling import VaswaniForConditionalGeneration, VaswaniModel
    from .pipeline import CUSTOM_PIPELINES

    AutoModel.register(VaswaniConfig, VaswaniModel, exist_ok=True)
    AutoModelForSeq2SeqLM.register(VaswaniConfig, VaswaniForConditionalGeneration, exist_ok=True)
    VaswaniModel.register_for_auto_class("AutoModel")
    VaswaniForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
    VaswaniForConditionalGeneration.saved_pipelines = CUSTOM_PIPELINES  # saved folders declare them, with pipeline.py


def _register_tokenizer() -> None:
    from transformers.models.auto.tokenization_auto import AutoTokenizer

    from .configuration import VaswaniConfig
    from .tokenization import VaswaniTokenizerFast

    AutoTokenizer.register(VaswaniConfig, tokenizer_class=VaswaniTokenizerFast, exist_ok=True)


def _register_pipelines() -> None:
    from .pipeline import register_pipelines

    register_pipelines()  # translation and text2text-generation, removed in transformers 5.24


#: Each registration, under the transformers module whose registry it fills.
_PENDING: dict[str, Callable[[], None]] = {
    "transformers.models.auto.configuration_auto": _register_config,
    "transformers.models.auto.modeling_auto": _register_models,
    "transformers.models.auto.tokenization_auto": _register_tokenizer,
    "transformers.pipelines": _register_pipelines,
}


def register_all() -> None:
    """Run every registration still pending now (loading the transformers modules they need)."""
    for name in list(_PENDING):
        importlib.import_module(name)
    _run_ready()


#: How many watched modules are executing right now. Registrations wait for 0: one that ran while a module was
#: half executed (``import vaswani.modeling`` makes transformers load its Auto registry) would import it half made.
_executing = 0


def _run_ready() -> None:
    """Run the pending registrations whose transformers module is loaded, unless a watched import is under way."""
    global _executing
    while _executing == 0 and (ready := [name for name in _PENDING if name in sys.modules]):
        register = _PENDING.pop(ready[0])
        _executing += 1
        try:
            register()
        finally:
            _executing -= 1


class _AfterImport(importlib.abc.MetaPathFinder):
    """Watches the modules registrations wait for (and this package's own, which they import): once the outermost
    of them has executed, the registrations that are ready run."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None):
        if fullname not in _PENDING and not fullname.startswith(f"{__name__}."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            global _executing
            _executing += 1
            try:
                execute(module)
            finally:
                _executing -= 1
            _run_ready()

        spec.loader.exec_module = exec_then_register
        return spec


sys.meta_path.insert(0, _AfterImport())
_run_ready()
