"""Training from a dataset in the Hub's `translation` layout (WMT14 / OPUS style), tested on a local folder of
that layout: its train split, its validation split (--valid-split), and the refusals that name what exists."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from helpers import fixture_lines

from vaswani.cli import main
from vaswani.training.data import load_parallel_corpus

QUICK = ["--preset", "tiny", "--set", "d_model=32", "encoder_ffn_dim=64", "decoder_ffn_dim=64", "--vocab-size", "300",
         "--max-tokens", "400", "--warmup-steps", "4", "--no-progress", "--seed", "1"]


@pytest.fixture(scope="module", autouse=True)
def _denormals_back():
    yield
    torch.set_flush_denormal(False)  # training here flushed denormals for the whole process (tune_cpu_training)


@pytest.fixture(scope="module")
def wmt_like(tmp_path_factory):
    """A folder as `datasets` reads a Hub translation dataset: train.jsonl and validation.jsonl of
    {"translation": {"de": ..., "en": ...}} rows."""
    folder = tmp_path_factory.mktemp("wmt_like")
    pairs = list(zip(fixture_lines("en"), fixture_lines("de")))
    for split, rows in (("train", pairs), ("validation", pairs[:6])):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for en, de in rows:
                handle.write(json.dumps({"translation": {"de": de, "en": en}}) + "\n")
    return folder


def test_both_splits_load_in_the_asked_direction(wmt_like):
    train, _ = load_parallel_corpus(dataset=str(wmt_like), split="train", source_lang="en", target_lang="de")
    valid, _ = load_parallel_corpus(dataset=str(wmt_like), split="validation", source_lang="en", target_lang="de")
    assert train[0] == {"source": fixture_lines("en")[0], "target": fixture_lines("de")[0]}
    assert len(valid) == 6


def test_translation_feature_languages_are_checked():
    feature = datasets.Features({"translation": datasets.Translation(languages=["de", "en"])})
    dataset = datasets.Dataset.from_dict({"translation": [{"de": "Hallo", "en": "Hello"}]}, features=feature)
    with pytest.raises(ValueError, match=r"'fr' is not in the translation column; it has \['de', 'en'\]"):
        load_parallel_corpus(dataset=dataset, source_lang="en", target_lang="fr")


def test_train_validates_on_the_datasets_validation_split(wmt_like, tmp_path):
    out = tmp_path / "run"
    main(["train", "--dataset", str(wmt_like), "--source-lang", "en", "--target-lang", "de", "--valid-split",
          "validation", "--eval-max-sentences", "4", "--eval-beams", "1", "--output", str(out), "--max-steps", "2",
          "--eval-steps", "2", "--save-steps", "2", *QUICK])
    result = json.loads((out / "vaswani_run.json").read_text())["result"]
    assert {"eval_bleu", "eval_loss"} <= set(result["eval_metrics"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--valid-split", "dev"], "dev"),  # datasets names the splits there are
        (["--valid-split", "validation", "--valid-source", "x.en", "--valid-target", "x.de"], "not both"),
    ],
)
def test_bad_validation_requests_are_refused(wmt_like, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", str(wmt_like), "--source-lang", "en", "--target-lang", "de", "--output",
              str(tmp_path / "run"), "--max-steps", "1", *extra, *QUICK])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err, err
    assert "Traceback" not in err


def test_valid_split_needs_a_dataset(tmp_path, capsys):
    from helpers import FIXTURES

    with pytest.raises(SystemExit) as info:
        main(["train", "--source", str(FIXTURES / "pairs.en"), "--target", str(FIXTURES / "pairs.de"), "--output",
              str(tmp_path / "run"), "--valid-split", "validation", *QUICK])
    assert info.value.code == 2 and "--valid-source and --valid-target" in capsys.readouterr().err
