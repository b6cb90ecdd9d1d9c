"""`vaswani convert marian`: a MarianMTModel folder + its SentencePiece tokenizer → a Vaswani folder that
translates identically (greedy and beam), and clear refusals."""

import json

import pytest
import torch
from helpers import save_small_marian
from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, MarianConfig, MarianMTModel

from vaswani.cli import main
from vaswani.translate import load_translation_model, translate

spm = pytest.importorskip("sentencepiece")
SENTENCES = ["Two dogs play in the snow.", "A man in a blue shirt is standing on a ladder.", "Kinder."]


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
    return save_small_marian(tmp_path_factory.mktemp("marian"))


@pytest.fixture(scope="module")
def converted(marian_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "vaswani"
    main(["convert", "marian", str(marian_dir), str(out)])
    return out


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 4])
def test_converted_folder_translates_identically(marian_dir, converted, num_beams):
    marian = MarianMTModel.from_pretrained(marian_dir).eval()
    marian_tok = AutoTokenizer.from_pretrained(marian_dir)
    model, tokenizer = load_translation_model(converted)
    assert type(model).__name__ == "VaswaniForConditionalGeneration"
    assert type(tokenizer).__name__ == "MarianTokenizer"
    batch = marian_tok(SENTENCES, return_tensors="pt", padding=True)
    assert torch.equal(batch["input_ids"], tokenizer(SENTENCES, return_tensors="pt", padding=True)["input_ids"])
    expected = marian.generate(**batch, num_beams=num_beams)
    assert torch.equal(model.generate(**batch, num_beams=num_beams), expected)
    texts = marian_tok.batch_decode(expected, skip_special_tokens=True)
    assert translate(model, tokenizer, SENTENCES, num_beams=num_beams) == texts


def test_converted_folder_contents(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "source.spm", "target.spm",
            "vocab.json", "modeling.py", "generation.py"} <= names
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "vaswani" and config["sinusoid_layout"] == "concatenated"


def test_refusals_are_clear(marian_dir, converted, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert", "marian", str(marian_dir), str(converted)])
    assert "already holds a model" in capsys.readouterr().err

    layerdrop = tmp_path / "layerdrop"
    config = MarianConfig.from_pretrained(marian_dir)
    config.encoder_layerdrop = 0.1
    MarianMTModel(config).save_pretrained(layerdrop)
    with pytest.raises(SystemExit):
        main(["convert", "marian", str(layerdrop), str(tmp_path / "out1")])
    assert "LayerDrop" in capsys.readouterr().err

    bart = tmp_path / "bart"
    BartForConditionalGeneration(BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                            encoder_attention_heads=2, decoder_attention_heads=2,
                                            encoder_ffn_dim=32, decoder_ffn_dim=32)).save_pretrained(bart)
    with pytest.raises(SystemExit):
        main(["convert", "marian", str(bart), str(tmp_path / "out2")])
    assert "only MarianMTModel checkpoints" in capsys.readouterr().err
