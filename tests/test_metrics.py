import os
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
from transformers import EvalPrediction

from vaswani.training.metrics import bleu, load_sacrebleu, make_compute_metrics

HYPOTHESES = ["The cat sat on the mat.", "Hello, world!", "a b c d e f"]
REFERENCES = ["The cat sat on a mat.", "hello, world!", "a b c d e g"]


def test_metric_module_loads_without_network(tmp_path):
    """A fresh HF cache, offline mode and a socket that refuses to connect: the metric still loads."""
    script = (
        "import socket\n"
        "def refuse(*args, **kwargs):\n"
        "    raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "from vaswani.training.metrics import bleu\n"
        "print(bleu(['a b c d'], ['a b c d']))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) == pytest.approx(100.0)
    assert load_sacrebleu().name == "sacre_bleu"


def test_bleu_equals_sacrebleu():
    assert bleu(HYPOTHESES, REFERENCES) == sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
    lower = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES], lowercase=True).score
    assert bleu(HYPOTHESES, REFERENCES, lowercase=True) == lower > bleu(HYPOTHESES, REFERENCES)


def test_bleu_known_cases():
    assert bleu(REFERENCES, REFERENCES) == pytest.approx(100.0)
    assert bleu(["x y z w"], ["a b c d"]) == pytest.approx(0.0)
    multi = bleu(HYPOTHESES, [[r, h] for r, h in zip(REFERENCES, HYPOTHESES)])
    assert multi == pytest.approx(100.0)
    with pytest.raises(ValueError, match="one each"):
        bleu(HYPOTHESES, REFERENCES[:2])


class WordTokenizer:
    """Stand-in for the real tokenizer: id i is word i; ids 0-2 are special (pad, bos, eos)."""

    vocab = ["<pad>", "<s>", "</s>", "the", "The", "cat", "sat", "on", "mat", "dog"]

    def batch_decode(self, ids, skip_special_tokens=False):
        assert not (np.asarray(ids) < 0).any(), "-100 must be mapped to pad before decoding"
        return [" ".join(self.vocab[i] for i in row if not (skip_special_tokens and i < 3)) for row in ids]


def test_compute_metrics():
    # generate() pads with pad (0); the Trainer pads across batches with -100.
    predictions = np.array([[1, 4, 5, 6, 7, 3, 8, 2, 0], [1, 3, 9, 6, 7, 3, 8, 2, -100]])
    labels = np.array([[4, 5, 6, 7, 3, 8, 2, -100], [4, 9, 6, 7, 3, 8, 2, -100]])
    metrics = make_compute_metrics(WordTokenizer(), pad_token_id=0)(EvalPrediction(predictions, labels))
    hypotheses = ["The cat sat on the mat", "the dog sat on the mat"]
    references = ["The cat sat on the mat", "The dog sat on the mat"]
    assert metrics["bleu"] == pytest.approx(bleu(hypotheses, references))
    assert metrics["bleu"] < 100.0
    assert metrics["bleu_lowercase"] == pytest.approx(100.0)
    assert metrics["gen_len"] == pytest.approx((8 + 8) / 2)
    tuple_predictions = EvalPrediction((predictions, np.zeros(1)), labels)
    assert make_compute_metrics(WordTokenizer(), 0)(tuple_predictions) == metrics
