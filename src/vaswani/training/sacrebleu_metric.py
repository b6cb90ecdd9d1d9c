"""Local ``evaluate`` metric module for corpus BLEU with sacreBLEU, loadable offline.

``evaluate.load("sacrebleu")`` fetches its script from the Hub; this file is the offline replacement, loaded
with ``evaluate.load(<path of this file>)`` (see ``vaswani.training.metrics``). It must stay self-contained:
``evaluate`` copies this single file into its module cache and imports it there.
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "Corpus BLEU computed by sacreBLEU on detokenized text (default tokenizer 13a, cased)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of hypothesis strings.
    references: list of lists of reference strings, the same number of references for every prediction.
    lowercase: compute BLEU on lower-cased text (default False).
    tokenize: sacreBLEU tokenizer name (default "13a").
Returns:
    score (BLEU, 0-100), counts, totals, precisions, bp, sys_len, ref_len, signature.
"""


class SacreBleu(evaluate.Metric):
    """sacreBLEU's ``corpus_bleu`` as an ``evaluate`` metric."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores. WMT.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, lowercase=False, tokenize="13a"):
        n_refs = {len(refs) for refs in references}
        if len(n_refs) > 1:
            raise ValueError(f"every prediction needs the same number of references, got {sorted(n_refs)}")
        streams = [list(stream) for stream in zip(*references)]
        result = sacrebleu.BLEU(lowercase=lowercase, tokenize=tokenize)
        score = result.corpus_score(predictions, streams)
        return {
            "score": score.score,
            "counts": score.counts,
            "totals": score.totals,
            "precisions": score.precisions,
            "bp": score.bp,
            "sys_len": score.sys_len,
            "ref_len": score.ref_len,
            "signature": str(result.get_signature()),
        }
