"""Corpus BLEU (Vaswani et al. 2017, §6.1 reports BLEU) and chrF for evaluation and model choice, offline.

chrF (Popović 2015, character n-gram F-score) is sacreBLEU's beside BLEU: it rewards partly right words, so it
tells apart models on small validation sets where BLEU's 4-gram matches are few.

Scores are sacreBLEU on detokenized text: cased by default, tokenizer 13a. The paper's numbers are tokenized
BLEU with compound splitting instead (tensor2tensor's ``get_ende_bleu.sh``: Moses tokenizer, ``##AT##-##AT##``
compound split, multi-bleu.perl), so they are not directly comparable.
``evaluate.load("sacrebleu")`` would fetch a script from the Hub; the package ships the metric module
``sacrebleu_metric.py`` and loads that file, which needs no network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

SACREBLEU_METRIC_PATH = Path(__file__).with_name("sacrebleu_metric.py")


@lru_cache(maxsize=1)
def load_sacrebleu() -> Any:
    """The packaged sacreBLEU ``evaluate`` metric (loaded once, kept in memory; no download)."""
    import evaluate

    return evaluate.load(str(SACREBLEU_METRIC_PATH), keep_in_memory=True)


def bleu(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], lowercase: bool = False
) -> float:
    """Corpus BLEU (0-100) of detokenized ``predictions`` against one reference string (or list) each."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; pass one each")
    refs = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    result = load_sacrebleu().compute(predictions=list(predictions), references=refs, lowercase=lowercase)
    return float(result["score"])


def _streams(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """sacreBLEU's reference streams (one list per reference) for one reference string (or list) each."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; pass one each")
    refs = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    return [list(stream) for stream in zip(*refs)]


def chrf(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus chrF (0-100) with sacreBLEU's defaults (character 6-grams, β = 2)."""
    import sacrebleu

    return float(sacrebleu.CHRF().corpus_score(list(predictions), _streams(predictions, references)).score)


def scores_with_signatures(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], lowercase: bool = False
) -> list[tuple[str, float, str]]:
    """(name, score, sacreBLEU signature) for corpus BLEU and chrF: the signature says how the score was
    computed (tokenizer, case, smoothing, version), so that others can compare with it."""
    import sacrebleu

    streams = _streams(predictions, references)
    metrics = {"BLEU": sacrebleu.BLEU(lowercase=lowercase), "chrF": sacrebleu.CHRF(lowercase=lowercase)}
    return [
        (name, float(metric.corpus_score(list(predictions), streams).score), str(metric.get_signature()))
        for name, metric in metrics.items()
    ]


def make_compute_metrics(tokenizer: Any, pad_token_id: int) -> Callable[[Any], dict[str, float]]:
    """``compute_metrics`` for ``Seq2SeqTrainer(predict_with_generate=True)``: BLEU, lower-cased BLEU, chrF,
    length.

    The Trainer pads labels (and predictions gathered across batches) with -100; those become
    ``pad_token_id`` before ``tokenizer.batch_decode(..., skip_special_tokens=True)``. ``gen_len`` is the
    mean number of non-pad tokens per generated sequence.
    """

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        predictions = np.where(predictions == -100, pad_token_id, predictions)
        labels = np.where(labels == -100, pad_token_id, labels)
        hypotheses = [text.strip() for text in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        references = [text.strip() for text in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return {
            "bleu": bleu(hypotheses, references),
            "bleu_lowercase": bleu(hypotheses, references, lowercase=True),
            "chrf": chrf(hypotheses, references),
            "gen_len": float(np.mean(np.count_nonzero(predictions != pad_token_id, axis=-1))),
        }

    return compute_metrics
