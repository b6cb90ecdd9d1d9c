"""Int8 linear layers (vaswani.quantization) and ``--dtype int8``: close to float32, every linear replaced,
the same translations as float32 on the test model, CPU only."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from torch import nn
from translation_helpers import make_model_folder

from vaswani.cli import main
from vaswani.quantization import Int8Linear, quantize_linear_layers, quantize_rows
from vaswani.translate import load_translation_model, translate


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("int8") / "model")


def test_rows_round_trip_within_half_a_step():
    x = torch.randn(7, 33) * torch.logspace(-3, 3, 7)[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.all((q.float() * scale - x).abs() <= scale / 2 + 1e-6 * x.abs())


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    expected = linear(x)
    got = Int8Linear(linear)(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    error = (got - expected).norm() / expected.norm()
    assert error < 0.02, error  # two roundings to 1/254 of each row's range
    assert not torch.equal(got, expected)  # it really computes in int8


def test_every_linear_is_replaced_and_logits_stay_close():
    model = tiny_model().eval()
    ids = torch.tensor([[5, 6, 7, 8, 3], [9, 10, 3, 0, 0]])
    mask = (ids != 0).long()
    decoder = torch.tensor([[2, 5, 6], [2, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        linears = sum(type(m) is nn.Linear for m in model.modules())
        quantize_linear_layers(model)
        got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == linears
    assert ((got - expected).norm() / expected.norm()) < 0.05


def test_int8_translations_match_float32_on_the_test_model(folder):
    sentences = ["A dog runs.", "Two men are talking in the street.", "", "A woman reads a book."]
    fp32 = translate(*load_translation_model(folder), sentences)
    int8_model, tokenizer = load_translation_model(folder, dtype="int8")
    assert isinstance(int8_model.lm_head, Int8Linear)
    assert translate(int8_model, tokenizer, sentences) == fp32


def test_cli_dtype_int8(folder, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("A dog runs.\nA woman reads a book.\n")
    main(["translate", str(folder), "-i", str(source), "--dtype", "int8", "--no-progress"])
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_int8_off_the_cpu_is_refused(folder):
    with pytest.raises(ValueError, match="int8 runs on the CPU only"):
        load_translation_model(folder, device="meta", dtype="int8")
