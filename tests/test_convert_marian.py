"""`vaswani convert marian`: a MarianMTModel folder + its SentencePiece tokenizer → a Vaswani folder that
translates identically (greedy and beam), and clear refusals."""

import json

import pytest
import torch
from helpers import fixture_lines
from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, MarianConfig, MarianMTModel

from vaswani.cli import main
from vaswani.translate import load_translation_model, translate

spm = pytest.importorskip("sentencepiece")
SENTENCES = ["Two dogs play in the snow.", "A man in a blue shirt is standing on a ladder.", "Kinder."]


def _marian_tokenizer(folder):
    """A MarianTokenizer from a SentencePiece model trained here (Marian's layout: source/target.spm, vocab)."""
    import io

    from transformers import MarianTokenizer

    texts = fixture_lines("en") + fixture_lines("de")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=120, character_coverage=1.0,
        unk_id=1, bos_id=-1, eos_id=0, pad_id=-1, minloglevel=2,
    )
    for name in ("source.spm", "target.spm"):
        (folder / name).write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    vocab["<pad>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return MarianTokenizer(str(folder / "source.spm"), str(folder / "target.spm"), str(folder / "vocab.json"))


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("marian")
    tokenizer = _marian_tokenizer(folder)
    pad = tokenizer.pad_token_id
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=len(tokenizer), decoder_vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=0,
        max_position_embeddings=128, activation_function="swish", scale_embedding=True,
    )
    marian = MarianMTModel(config).eval()
    with torch.no_grad():
        marian.final_logits_bias.normal_()
        marian.final_logits_bias[0, 0] += 3.0  # end sentences within a few tokens
    marian.generation_config.update(num_beams=4, max_length=40, bad_words_ids=[[pad]])
    marian.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
