"""The CPU linear layers for decoding (vaswani.cpu_linears): prepacked float32 (the same function) and int8
(``--dtype int8``: close to float32, CPU only); every linear replaced, the same translations on the test model."""

from __future__ import annotations

import platform

import pytest
import torch
from helpers import tiny_model
from torch import nn
from transformers import AutoModelForSeq2SeqLM
from translation_helpers import make_model_folder

from vaswani.cli import main
from vaswani.cpu_linears import (
    MKL_MARGIN,
    ROW_MULTIPLE,
    Int8Linear,
    PackedLinear,
    can_prepack,
    faster_backend,
    measure_backends,
    pack_linear_layers,
    padded_rows,
    prepack,
    product,
    product_backend,
    product_plus,
    quantize_linear_layers,
    quantize_rows,
)
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


needs_prepack = pytest.mark.skipif(not can_prepack(), reason="this torch has no oneDNN prepacked linear")


@needs_prepack
def test_packed_linear_computes_the_same_function(products_backend):
    torch.manual_seed(0)
    for linear in (nn.Linear(64, 300), nn.Linear(48, 16, bias=False)):
        x = torch.randn(3, 7, linear.in_features)
        packed = PackedLinear.from_linear(linear)
        assert packed.weight is linear.weight
        with torch.no_grad():
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
            linear.weight.mul_(2)  # a changed weight is packed again
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        packed(x).sum().backward()  # with gradients it is the plain layer
        assert linear.weight.grad is not None


@needs_prepack
def test_translation_models_load_packed_with_the_same_outputs(folder, products_backend):
    sentences = ["A dog runs.", "Two men are talking in the street.", "", "A woman reads a book."]
    plain, tokenizer = load_translation_model(folder, fast_linears=False)
    packed, _ = load_translation_model(folder)
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    assert isinstance(packed.lm_head, PackedLinear) and not any(type(m) is nn.Linear for m in packed.modules())
    assert translate(packed, tokenizer, sentences) == translate(plain, tokenizer, sentences)
    ids = tokenizer(sentences[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(packed(**ids, decoder_input_ids=ids["input_ids"][:, :3]).logits,
                                   plain(**ids, decoder_input_ids=ids["input_ids"][:, :3]).logits)


@needs_prepack
def test_a_packed_model_saves_and_trains_as_before(tmp_path):
    model = pack_linear_layers(tiny_model())
    assert model.lm_head.weight is model.model.shared.weight  # still tied
    model.save_pretrained(tmp_path / "saved")
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "saved").state_dict().keys() == model.state_dict().keys()
    ids = torch.tensor([[5, 6, 7, 3]])
    loss = model.train()(input_ids=ids, labels=ids).loss
    loss.backward()
    assert model.lm_head.weight.grad is not None
    bf16 = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        assert bf16(input_ids=ids, decoder_input_ids=ids).logits.dtype == torch.bfloat16


def test_int8_translations_match_float32_on_the_test_model(folder):
    sentences = ["A dog runs.", "Two men are talking in the street.", "", "A woman reads a book."]
    fp32 = translate(*load_translation_model(folder, fast_linears=False), sentences)
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


@needs_prepack
def test_products_of_any_row_count_are_the_layer_on_those_rows(products_backend):
    """The rows are padded to a multiple of ROW_MULTIPLE for oneDNN (one kernel for many counts), and the padding
    never reaches the result: each row count gives the plain layer's rows, the residual and ReLU included."""
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    packed = (prepack(linear.weight), linear.bias.detach())
    with torch.no_grad():
        for rows in (1, ROW_MULTIPLE - 1, ROW_MULTIPLE, ROW_MULTIPLE + 3, 3 * ROW_MULTIPLE):
            x, residual = torch.randn(rows, 40), torch.randn(rows, 24)
            assert padded_rows(x).shape[0] % ROW_MULTIPLE == 0 and torch.equal(padded_rows(x)[:rows], x)
            expected = linear(x)
            torch.testing.assert_close(product(x, packed), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(product(x, packed, "relu"), expected.relu(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(product_plus(x, packed, residual), expected + residual, rtol=1e-5, atol=1e-5)
            assert product(x, packed).shape == (rows, 24)
    assert padded_rows(x) is x  # a multiple already: no copy


@needs_prepack
def test_a_changed_backend_lays_the_weight_out_again(set_products_backend):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40)
    packed, x = PackedLinear.from_linear(linear), torch.randn(5, 24)
    with torch.no_grad():
        for backend in ("onednn", "mkl", "onednn"):
            if backend == "mkl" and not torch.backends.mkl.is_available():
                continue
            set_products_backend(backend)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
            assert packed._packed_key[0] == backend


def test_the_backend_named_in_the_environment_is_used_or_refused(set_products_backend):
    set_products_backend(" OneDNN ")
    assert product_backend() == "onednn"
    set_products_backend("blas")
    with pytest.raises(ValueError, match="'blas' is not a backend: use one of onednn, mkl, or leave it unset"):
        product_backend()


@needs_prepack
def test_a_bad_backend_stops_the_cli_with_the_fix(folder, tmp_path, set_products_backend, capsys):
    source = tmp_path / "in.txt"
    source.write_text("A dog runs.\n")
    set_products_backend("blas")
    with pytest.raises(SystemExit) as stop:
        main(["translate", str(folder), "-i", str(source), "--no-progress"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "VASWANI_CPU_PRODUCTS='blas' is not a backend" in error and "Traceback" not in error


def test_mkl_is_chosen_only_when_clearly_faster():
    assert faster_backend({"onednn": 1.0, "mkl": 0.9}) == "mkl"
    assert faster_backend({"onednn": 1.0, "mkl": 1.0 - MKL_MARGIN / 2}) == "onednn"  # within the noise
    assert faster_backend({"onednn": 1.0, "mkl": 1.3}) == "onednn"


@needs_prepack
@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch has no MKL")
def test_the_measurement_times_both_backends_on_one_thread_and_restores_the_threads():
    threads = torch.get_num_threads()
    seen = []
    original = torch.set_num_threads
    try:
        torch.set_num_threads = lambda n: (seen.append(n), original(n))
        seconds = measure_backends(rounds=1)
    finally:
        torch.set_num_threads = original
    assert set(seconds) == {"onednn", "mkl"} and all(value > 0 for value in seconds.values())
    assert seen == [1, threads] and torch.get_num_threads() == threads


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available(),
                    reason="oneDNN's prepacked linear is checked on x86 builds with mkldnn")
def test_prepacking_is_available_on_x86():
    assert can_prepack()  # were it to fail (e.g. by recursing into the backend choice), every fast path would be off
