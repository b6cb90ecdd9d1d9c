"""`vaswani export marian`: a Vaswani folder becomes a MarianMTModel folder that plain transformers (no vaswani, no
remote code) loads and that gives the same logits, greedy and beam tokens and token ids; clear refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import fixture_lines, tiny_model
from transformers import AutoTokenizer

from vaswani.cli import main
from vaswani.convert import permute_residual_stream, residual_permutation, vaswani_to_marian
from vaswani.tokenization import train_tokenizer

SENTENCES = ["Two dogs play in the snow.", "A man in a blue shirt is standing on a ladder.", "Kinder."]
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(fixture_lines("en") + fixture_lines("de"), vocab_size=300, show_progress=False, output_dir=out)
    return out


def _vaswani_folder(folder: Path, tokenizer_dir: Path, **overrides) -> Path:
    """A tiny Vaswani model with an output bias (favouring </s> a little, so some beams end) and the test tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model(vocab_size=len(tokenizer), lm_head_bias=True, **overrides)
    with torch.no_grad():
        model.lm_head.bias.normal_()
        model.lm_head.bias[tokenizer.eos_token_id] += 2.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def _outputs(model, batch: dict, **generate_kwargs) -> dict:
    decoder_input_ids = batch["input_ids"][:, :5]
    logits = model(**batch, decoder_input_ids=decoder_input_ids).logits
    return {
        "logits": logits.tolist(),
        **{
            f"beam{beams}": model.generate(**batch, num_beams=beams, max_new_tokens=MAX_NEW_TOKENS, **generate_kwargs)
            .tolist()
            for beams in (1, 4)
        },
    }


_WITHOUT_VASWANI = """
import json, sys
sys.modules["vaswani"] = None  # the package is not importable here
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
folder, sentences, max_new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
assert type(model).__name__ == "MarianMTModel" and type(tokenizer).__module__.startswith("transformers."), type(model)
batch = dict(tokenizer(sentences, return_tensors="pt", padding=True))
with torch.no_grad():
    logits = model(**batch, decoder_input_ids=batch["input_ids"][:, :5]).logits
    out = {"ids": batch["input_ids"].tolist(), "logits": logits.tolist()}
    for beams in (1, 4):
        out[f"beam{beams}"] = model.generate(**batch, num_beams=beams, max_new_tokens=max_new_tokens).tolist()
print(json.dumps(out))
"""


def _run_without_vaswani(folder: Path, cwd: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_VASWANI, str(folder), json.dumps(SENTENCES), str(MAX_NEW_TOKENS)],
        capture_output=True, text=True, env=env, cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("layout", ["interleaved", "concatenated"])
def test_exported_folder_computes_the_same_without_vaswani(layout, tokenizer_dir, tmp_path, capsys):
    source = _vaswani_folder(tmp_path / "vaswani", tokenizer_dir, sinusoid_layout=layout)
    main(["export", "marian", str(source), str(tmp_path / "marian")])
    notes = capsys.readouterr().err
    assert "GNMT length penalty" in notes and "max_len_a=1.0" in notes  # the paper's decoding, said to change

    from vaswani.translate import load_translation_model

    model, tokenizer = load_translation_model(source)
    batch = dict(tokenizer(SENTENCES, return_tensors="pt", padding=True))
    # transformers' |Y|^alpha is what Marian has; with it (and one length limit) the beams must agree exactly
    expected = _outputs(model, batch, length_penalty_type="hf")
    got = _run_without_vaswani(tmp_path / "marian", tmp_path)

    assert got["ids"] == batch["input_ids"].tolist()
    assert (torch.tensor(got["logits"]) - torch.tensor(expected["logits"])).abs().max() < 1e-5
    assert got["beam1"] == expected["beam1"]
    assert got["beam4"] == expected["beam4"]
    assert any(len(row) > 2 for row in got["beam1"])  # real translations, not just </s>


def test_exported_generation_config_keeps_what_marian_expresses(tokenizer_dir, tmp_path):
    from transformers import GenerationConfig

    source = _vaswani_folder(tmp_path / "vaswani", tokenizer_dir, max_position_embeddings=256)
    main(["export", "marian", str(source), str(tmp_path / "marian")])
    config = json.loads((tmp_path / "marian" / "config.json").read_text())
    generation = GenerationConfig.from_pretrained(tmp_path / "marian")
    assert config["model_type"] == "marian" and "auto_map" not in config
    assert (generation.num_beams, generation.length_penalty, generation.early_stopping) == (4, 0.6, True)
    assert generation.max_length == 256  # the per-sentence limit becomes the position table's size
    assert (generation.decoder_start_token_id, generation.eos_token_id, generation.pad_token_id) == (2, 3, 0)
    assert not any(hasattr(generation, name) for name in ("length_penalty_type", "max_len_a", "max_len_b"))


def test_residual_permutation_puts_sines_first():
    assert residual_permutation(tiny_model(d_model=8, encoder_attention_heads=2, decoder_attention_heads=2).config
                                ).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert residual_permutation(tiny_model(sinusoid_layout="concatenated").config) is None


def test_refuses_what_marian_cannot_express():
    with pytest.raises(ValueError, match=r"normalize_before=True \(Marian is post-norm\)"):
        vaswani_to_marian(tiny_model(normalize_before=True))
    with pytest.raises(ValueError, match="learned positions"):
        vaswani_to_marian(tiny_model(position_embedding_type="learned"))
    with pytest.raises(ValueError, match="layer_norm_eps=1e-06"):
        vaswani_to_marian(tiny_model(layer_norm_eps=1e-6))
    with pytest.raises(ValueError, match="weight 'model.adapter.weight' has no Marian counterpart"):
        permute_residual_stream({"model.adapter.weight": torch.zeros(2, 2)}, torch.tensor([1, 0]))


def _export(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "marian", *argv])
    return exit_info.value.code, capsys.readouterr().err


def test_bad_input_is_refused_and_nothing_is_half_written(tokenizer_dir, tmp_path, capsys):
    pre_norm = _vaswani_folder(tmp_path / "pre_norm", tokenizer_dir, normalize_before=True)
    code, err = _export([str(pre_norm), str(tmp_path / "out")], capsys)
    assert code == 2 and "normalize_before=True" in err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["pre_norm"]

    source = _vaswani_folder(tmp_path / "vaswani", tokenizer_dir)
    main(["export", "marian", str(source), str(tmp_path / "out")])
    code, err = _export([str(tmp_path / "out"), str(tmp_path / "again")], capsys)  # a Marian folder
    assert code == 2 and "holds a 'marian' model, not a Vaswani one" in err
    code, err = _export([str(tmp_path / "missing"), str(tmp_path / "again")], capsys)
    assert code == 2 and "missing" in err
    assert not (tmp_path / "again").exists()


def test_output_folder_with_a_model_needs_overwrite(tokenizer_dir, tmp_path, capsys):
    source = _vaswani_folder(tmp_path / "vaswani", tokenizer_dir)
    out = tmp_path / "out"
    main(["export", "marian", str(source), str(out)])
    (out / "model.safetensors").write_bytes(b"old")  # stands for an earlier export
    code, err = _export([str(source), str(out)], capsys)
    assert code == 2 and "already holds a model" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == b"old"

    main(["export", "marian", str(source), str(out), "--overwrite"])
    assert (out / "model.safetensors").read_bytes() != b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "vaswani"]  # no staging folder left

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    code, err = _export([str(source), str(tmp_path / "notes"), "--overwrite"], capsys)
    assert code == 2 and "holds files but no model" in err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


ctranslate2 = pytest.importorskip("ctranslate2", reason="vaswani[ct2] (ctranslate2) is not installed")
CT2_LINES = ["Two dogs play in the snow.", "", "A man in a blue shirt is standing on a ladder.", "Kinder.",
             "A woman reads a book in the park while children play."]


def _translate_lines(argv: list[str], lines: list[str], tmp_path: Path, capsys) -> list[str]:
    source = tmp_path / "source.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    main(["translate", *argv, "-i", str(source), "--no-progress"])
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("layout", ["interleaved", "concatenated"])
def test_ctranslate2_export_translates_as_pytorch(layout, tokenizer_dir, tmp_path, capsys):
    source = _vaswani_folder(tmp_path / "vaswani", tokenizer_dir, sinusoid_layout=layout)
    main(["export", "ctranslate2", str(source), str(tmp_path / "ct2")])
    assert "GNMT length penalty" in capsys.readouterr().err
    settings = json.loads((tmp_path / "ct2" / "vaswani_decoding.json").read_text())
    assert settings == {"num_beams": 4, "length_penalty": 0.6, "length_penalty_type": "gnmt", "max_len_a": 1.0,
                        "max_len_b": 50}

    for options in (["--beam", "1"], ["--beam", "1", "--max-len-a", "0.5", "--max-len-b", "2"]):
        expected = _translate_lines([str(source), *options], CT2_LINES, tmp_path, capsys)
        got = _translate_lines(["--engine", "ctranslate2", str(tmp_path / "ct2"), *options], CT2_LINES, tmp_path,
                               capsys)
        assert got == expected and len(got) == len(CT2_LINES) and got[1] == ""
        assert any(len(line) > 3 for line in got), got  # real translations, not just </s>


@pytest.fixture(scope="module")
def ct2_export(tokenizer_dir, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ct2")
    source = _vaswani_folder(folder / "vaswani", tokenizer_dir)
    main(["export", "ctranslate2", str(source), str(folder / "ct2")])
    return source, folder / "ct2"


def test_ctranslate2_beam_search_with_transformers_length_penalty(ct2_export, tmp_path, capsys):
    source, exported = ct2_export
    expected = _translate_lines([str(source), "--length-penalty-type", "hf"], CT2_LINES, tmp_path, capsys)
    got = _translate_lines(["--engine", "ctranslate2", str(exported), "--length-penalty-type", "hf"], CT2_LINES,
                           tmp_path, capsys)
    assert got == expected
    main(["translate", "--engine", "ctranslate2", str(exported), *SENTENCES])  # the exported GNMT penalty
    assert "no GNMT length penalty" in capsys.readouterr().err


def test_ctranslate2_int8_export_translates(ct2_export, tmp_path, capsys):
    source, _ = ct2_export
    main(["export", "ctranslate2", str(source), str(tmp_path / "int8"), "--quantization", "int8"])
    assert "(int8)" in capsys.readouterr().out
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["decoder_start_token"] == "<s>"
    got = _translate_lines(["--engine", "ctranslate2", str(tmp_path / "int8"), "--beam", "1"], CT2_LINES, tmp_path,
                           capsys)
    assert len(got) == len(CT2_LINES) and got[1] == "" and any(got)


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_ctranslate2_bad_input_is_refused_and_nothing_is_half_written(ct2_export, tmp_path, capsys, monkeypatch):
    source, exported = ct2_export
    assert "already holds a model" in _fails(["export", "ctranslate2", str(source), str(exported)], capsys)
    err = _fails(["export", "ctranslate2", str(exported), str(tmp_path / "out")], capsys)  # not a Vaswani folder
    assert "model_type None, which neither transformers nor vaswani provides" in err
    err = _fails(["translate", "--engine", "ctranslate2", str(source), "x"], capsys)
    assert "not a folder written by `vaswani export ctranslate2`" in err
    assert "--dtype are for --engine torch" in _fails(
        ["translate", "--engine", "ctranslate2", str(exported), "x", "--dtype", "bfloat16"], capsys)

    monkeypatch.setattr(ctranslate2, "get_supported_compute_types", lambda device: {"float32", "int8"})
    err = _fails(["export", "ctranslate2", str(source), str(tmp_path / "out"), "--quantization", "bfloat16"], capsys)
    assert "'bfloat16' is not supported by this CTranslate2 build on this CPU (supported: float32, int8)" in err

    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # not installed
    for argv in (["export", "ctranslate2", str(source), str(tmp_path / "out")],
                 ["translate", "--engine", "ctranslate2", str(exported), "x"]):
        assert "pip install vaswani[ct2]" in _fails(argv, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ONNX (vaswani[onnx]) ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_export(tokenizer_dir, tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    folder = tmp_path_factory.mktemp("onnx")
    source = _vaswani_folder(folder / "vaswani", tokenizer_dir)  # the paper's interleaved positions
    main(["export", "onnx", str(source), str(folder / "onnx")])
    return source, folder / "onnx"


def test_onnx_export_computes_what_pytorch_does(onnx_export):
    """ONNX Runtime on the exported graphs: the logits of a prefix within 1e-4, and the same greedy tokens as
    ``generate(num_beams=1)``, on sentences of different lengths (dynamic batch, source and target sizes)."""
    from vaswani.modeling import VaswaniForConditionalGeneration
    from vaswani.onnx_export import OnnxGreedyTranslator

    source, exported = onnx_export
    model = VaswaniForConditionalGeneration.from_pretrained(source).eval()
    batch = AutoTokenizer.from_pretrained(exported)(SENTENCES, padding=True, return_tensors="pt")
    onnx = OnnxGreedyTranslator(exported, threads=1)
    expected = model.generate(**batch, num_beams=1, max_new_tokens=MAX_NEW_TOKENS)
    got = onnx.generate(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), MAX_NEW_TOKENS)
    assert got.tolist() == expected.tolist()
    prefix = expected[:, :5]
    with torch.no_grad():
        logits = model(**batch, decoder_input_ids=prefix).logits
    onnx_logits = onnx.logits(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), prefix.numpy())
    assert float((torch.from_numpy(onnx_logits) - logits).abs().max()) < 1e-4


def test_onnx_bad_input_is_refused_and_nothing_is_half_written(onnx_export, tmp_path, capsys, monkeypatch):
    source, exported = onnx_export
    assert "already holds a model" in _fails(["export", "onnx", str(source), str(exported)], capsys)
    err = _fails(["export", "onnx", str(exported), str(tmp_path / "out")], capsys)  # graphs, no model weights
    assert "no file named model.safetensors" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
    assert "pip install vaswani[onnx]" in _fails(["export", "onnx", str(source), str(tmp_path / "out")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
