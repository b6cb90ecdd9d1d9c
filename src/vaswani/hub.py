"""Sharing a model folder on the Hugging Face Hub: the files that go up and a generated model card.

``vaswani push MODEL_DIR REPO_ID`` uploads, in one commit: ``model*.safetensors`` (and the shard index),
``config.json``, ``generation_config.json``, the tokenizer files (a plain ``PreTrainedTokenizerFast``, so
``AutoTokenizer`` needs no remote code), the model code that ``save_pretrained`` copied (``configuration.py``,
``modeling.py`` and the modules it imports, ``pipeline.py``: the modules ``auto_map`` names and what they import,
so ``trust_remote_code=True`` works without the package) and ``README.md``, a model card with the
Hub's metadata header (languages, license, datasets, BLEU as a model-index result) and the training recipe.
Nothing else in the folder (checkpoints, optimizer state, logs, other ``.py`` or ``.safetensors`` files) is sent.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Files of a model folder that are uploaded (glob patterns, matched against names in the folder's top level);
#: the model's code files are added by :func:`code_files`.
UPLOAD_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "source.spm",
    "target.spm",
)
RUN_FILE = "vaswani_run.json"  # written by `vaswani train`: its settings and results go into the card


@dataclass
class CardInfo:
    """What the model card says beyond what the folder's config tells."""

    source_lang: str | None = None
    target_lang: str | None = None
    dataset: str | None = None  # a Hub dataset id, e.g. "bentrevett/multi30k"
    dataset_name: str | None = None  # human-readable, e.g. "Multi30k test_2016_flickr"
    bleu: float | None = None
    license: str = "apache-2.0"
    recipe: dict[str, Any] = field(default_factory=dict)


def files_to_upload(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The folder's files that make a loadable model repo; raises if weights, config or tokenizer are missing."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    files = [
        path for path in folder.iterdir()
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in UPLOAD_PATTERNS)
    ]
    names = {path.name for path in files}
    if "config.json" not in names:
        raise FileNotFoundError(f"{folder} has no config.json; save the model there with model.save_pretrained().")
    if not any(name.endswith(".safetensors") for name in names):
        hint = " (it has pytorch_model.bin: re-save with save_pretrained(), which writes safetensors)" if (
            folder / "pytorch_model.bin"
        ).exists() else ""
        raise FileNotFoundError(f"{folder} has no *.safetensors weights{hint}.")
    if not names & {"tokenizer.json", "tokenizer_config.json", "source.spm"}:
        raise FileNotFoundError(
            f"{folder} has no tokenizer; save it next to the model: tokenizer.save_pretrained('{folder}')."
        )
    return sorted(files + code_files(folder))


def code_files(folder: Path) -> list[Path]:
    """The model's own code: the modules the ``auto_map`` of config.json and tokenizer_config.json and the
    ``custom_pipelines`` of config.json name, and the modules they import relatively (as ``trust_remote_code``
    loads them); other ``.py`` files stay home."""
    from transformers.dynamic_module_utils import get_relative_imports

    refs = []
    for name in ("config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            saved = json.loads((folder / name).read_text())
            for ref in saved.get("auto_map", {}).values():
                refs += ref if isinstance(ref, list) else [ref]
            refs += [spec.get("impl") for spec in saved.get("custom_pipelines", {}).values()]
    pending = {f"{ref.split('.')[0]}.py" for ref in refs if isinstance(ref, str)}
    found: set[str] = set()
    while pending:
        name = pending.pop()
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} lacks {name}, which the model's auto_map needs (trust_remote_code would fail); save the "
                "model again with the vaswani package installed."
            )
        found.add(name)
        pending |= {f"{module}.py" for module in get_relative_imports(folder / name)} - found
    return [folder / name for name in found]


def _card_info_from_run(folder: Path, info: CardInfo) -> CardInfo:
    """Fill the recipe (and BLEU, if not given) from ``vaswani_run.json`` when `vaswani train` left one."""
    run_file = folder / RUN_FILE
    if not run_file.is_file():
        return info
    run = json.loads(run_file.read_text())
    settings, result = run.get("settings", {}), run.get("result", {})
    keys = ("init_from", "preset", "max_tokens", "update_tokens", "num_train_epochs", "max_steps", "lr_schedule",
            "learning_rate", "warmup_steps", "label_smoothing_factor", "average_last", "bf16", "seed")
    recipe = {key: settings[key] for key in keys if settings.get(key) not in (None, -1)}
    recipe.update({key: result[key] for key in ("steps", "train_pairs", "train_seconds") if key in result})
    bleu = info.bleu
    if bleu is None:
        bleu = result.get("eval_metrics", {}).get("eval_bleu")
    return CardInfo(**{**info.__dict__, "recipe": {**recipe, **info.recipe}, "bleu": bleu})


def model_card(model_dir: str | os.PathLike[str], repo_id: str, info: CardInfo | None = None) -> str:
    """README.md for ``repo_id``: the Hub metadata header, what the model is, how it was trained and scored,
    and how to use it (CLI, Python, pipeline)."""
    from huggingface_hub import EvalResult, ModelCardData

    folder = Path(model_dir)
    info = _card_info_from_run(folder, info or CardInfo())
    config = json.loads((folder / "config.json").read_text())
    pair = f"{info.source_lang}-{info.target_lang}" if info.source_lang and info.target_lang else None
    results = []
    if info.bleu is not None:
        results.append(
            EvalResult(
                task_type="translation", task_name=f"Translation {pair}" if pair else "Translation",
                dataset_type=info.dataset or "custom", dataset_name=info.dataset_name or info.dataset or "test set",
                metric_type="bleu", metric_value=round(float(info.bleu), 2),
                metric_name="BLEU (sacreBLEU 13a, detokenized, cased)",
            )
        )
    data = ModelCardData(
        language=[lang for lang in (info.source_lang, info.target_lang) if lang] or None,
        license=info.license,
        library_name="transformers",
        pipeline_tag="translation",
        tags=["translation", "vaswani", "transformer", "attention-is-all-you-need"],
        datasets=[info.dataset] if info.dataset else None,
        metrics=["bleu"],
        model_name=repo_id,
        eval_results=results or None,
    )
    shape = (
        f"{config.get('encoder_layers')}+{config.get('decoder_layers')} layers, d_model {config.get('d_model')}, "
        f"d_ff {config.get('encoder_ffn_dim')}, {config.get('encoder_attention_heads')} heads, "
        f"vocabulary {config.get('vocab_size')}"
    )
    recipe = "\n".join(f"| {key} | {value} |" for key, value in info.recipe.items())
    recipe_table = f"| setting | value |\n|---|---|\n{recipe}\n" if recipe else "Not recorded with this folder.\n"
    score = (
        f"BLEU **{float(info.bleu):.2f}** on {info.dataset_name or info.dataset or 'the test set'} "
        "(sacreBLEU, 13a tokenizer, detokenized, cased; not the paper's tokenized BLEU)."
        if info.bleu is not None else "No BLEU score was given when this card was made."
    )
    generation_file = folder / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    if generation.get("length_penalty_type") == "gnmt":
        decoding = (
            f"Decoding as in the paper (§6.1): beam size {generation.get('num_beams')}, GNMT length penalty "
            f"α = {generation.get('length_penalty')}, at most {generation.get('max_len_a')} · source length + "
            f"{generation.get('max_len_b')} tokens."
        )
    else:
        decoding = (
            f"Decoding: beam size {generation.get('num_beams', 1)}, transformers' length penalty "
            f"{generation.get('length_penalty', 1.0)} (the model's generation_config.json)."
        )
    sample = "A man is riding a bicycle." if info.source_lang in (None, "en") else "..."
    body = f"""
# {repo_id.split('/')[-1]}

The Transformer of "Attention Is All You Need" (Vaswani et al., 2017){f' for {pair} translation' if pair else ''},
as a Hugging Face transformers model made with the `vaswani` package: {shape}.

## Results

{score}

{decoding}

## Training recipe

Adam (β1 0.9, β2 0.98, ε 1e-9) with the paper's warm-up schedule (§5.3), label smoothing and dropout (§5.4).

{recipe_table}
## Usage

With the `vaswani` package installed:

```bash
echo "{sample}" | vaswani translate {repo_id}
```

Without it, through the code shipped in this repository:

```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model = AutoModelForSeq2SeqLM.from_pretrained("{repo_id}", trust_remote_code=True)
batch = tokenizer(["{sample}"], return_tensors="pt", padding=True)
print(tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True))

translator = pipeline("translation", model="{repo_id}", trust_remote_code=True)
print(translator("{sample}"))
```
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def push_model_folder(
    model_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    info: CardInfo | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload Vaswani Transformer model",
) -> str:
    """Create ``repo_id`` (if needed) and upload the model folder and a generated README.md in one commit.

    Returns the commit URL.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    files = files_to_upload(model_dir)
    card = model_card(model_dir, repo_id, info).encode("utf-8")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    commit = api.create_commit(repo.repo_id, operations=operations, commit_message=commit_message)
    return commit.commit_url
