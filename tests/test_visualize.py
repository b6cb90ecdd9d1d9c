"""Attention maps, the HTML page, positional-encoding pictures and the encoder-layer trace (issue 6)."""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from vaswani import VaswaniConfig, VaswaniForConditionalGeneration
from vaswani.cli import main
from vaswani.demo.numbers import make_number_corpus
from vaswani.tokenization import train_tokenizer
from vaswani.visual.pictures import (
    AttentionCapture,
    attention_html,
    capture_attention,
    plot_attention,
    plot_encoder_layer,
    plot_positions,
    select_map,
    trace_encoder_layer,
)

LAYERS, HEADS = 2, 4
SOURCE, TARGET = "three hundred forty-two", "dreihundertzweiundvierzig"


@pytest.fixture(scope="module")
def tokenizer():
    corpus = make_number_corpus(500, 0, 0, max_value=999)
    return train_tokenizer([t for pair in corpus["train"] for t in pair], vocab_size=300, show_progress=False)


def _model(tokenizer, attn_implementation="eager"):
    torch.manual_seed(0)
    config = VaswaniConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=64, decoder_ffn_dim=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
    )
    config._attn_implementation = attn_implementation
    return VaswaniForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _model(tokenizer)


@pytest.fixture(scope="module")
def capture(model, tokenizer) -> AttentionCapture:
    return capture_attention(model, tokenizer, SOURCE, TARGET)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("model")
    _model(tokenizer, "sdpa").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _pixels(path) -> tuple[int, int]:
    height, width = imread(path).shape[:2]
    return width, height


def test_capture_shapes_and_probabilities(capture, tokenizer):
    s = len(tokenizer(SOURCE)["input_ids"])
    t = len(tokenizer(TARGET)["input_ids"])
    assert capture.encoder.shape == (LAYERS, HEADS, s, s)
    assert capture.decoder.shape == (LAYERS, HEADS, t, t)
    assert capture.cross.shape == (LAYERS, HEADS, t, s)
    assert len(capture.source_tokens) == s and capture.source_tokens[-1] == "</s>"
    assert len(capture.target_tokens) == t and capture.target_tokens[-1] == "</s>"
    assert capture.decoder_input_tokens[0] == "<s>" and capture.decoder_input_tokens[1:] == capture.target_tokens[:-1]
    for stack in (capture.encoder, capture.decoder, capture.cross):
        np.testing.assert_allclose(stack.sum(-1), 1.0, atol=1e-5)
    assert "".join(capture.source_tokens[:-1]).replace("▁", " ") == SOURCE
    assert not capture.translated and capture.notes == []


def test_masked_self_attention_is_lower_triangular(capture):
    upper = np.triu(np.ones(capture.decoder.shape[-2:], dtype=bool), k=1)
    assert upper.any()
    assert np.all(capture.decoder[..., upper] == 0.0)  # exactly zero: future positions are masked
    assert np.all(np.diagonal(capture.decoder, axis1=-2, axis2=-1) > 0)
    assert np.all(capture.encoder > 0)  # the encoder sees every position


def test_plot_attention_files_and_sizes(capture, tmp_path):
    paths = plot_attention(capture, tmp_path / "maps")
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"{stem}{suffix}.png"
        for stem in ("encoder_self_attention", "decoder_masked_self_attention", "cross_attention")
        for suffix in ("", "_grid")
    )
    for path in paths:
        assert path.is_file()
        if path.stem.endswith("_grid"):  # (heads + 1) x 2 in by (layers + 1) x 2 in + 0.5 in, 100 dpi
            assert _pixels(path) == ((HEADS + 1) * 200, (LAYERS + 1) * 200 + 50)
        else:
            assert _pixels(path) == (800, 800)
    # The causal mask is drawn grey (#d9d9d9): present in the decoder map, absent from the encoder map.
    grey = np.array([217, 217, 217]) / 255

    def grey_pixels(name):
        image = imread(tmp_path / "maps" / name)[..., :3]
        return int(np.all(np.abs(image - grey) < 1e-3, axis=-1).sum())

    assert grey_pixels("decoder_masked_self_attention.png") > 10_000
    assert grey_pixels("encoder_self_attention.png") < 500  # a few anti-aliased text pixels


def test_layer_and_head_selection(capture, tmp_path):
    np.testing.assert_allclose(select_map(capture.cross, None, None), capture.cross.mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_array_equal(select_map(capture.cross, 1, 2), capture.cross[1, 2])
    plot_attention(capture, tmp_path, layer=1, head=3, kinds=["cross"])
    with pytest.raises(ValueError, match="layer 5 does not exist: this stack has 2 layers"):
        plot_attention(capture, tmp_path, layer=5)
    with pytest.raises(ValueError, match="head 4 does not exist"):
        plot_attention(capture, tmp_path, head=4)
    with pytest.raises(ValueError, match="attention kind"):
        plot_attention(capture, tmp_path, kinds=["feed-forward"])


def test_long_sentence_is_truncated_with_a_message(model, tokenizer, tmp_path):
    source = " ".join(["seven hundred seventy-seven thousand"] * 6)
    long = capture_attention(model, tokenizer, source, TARGET)
    assert len(long.source_tokens) > 12
    with pytest.warns(UserWarning, match=r"drawing only the first 12 of each"):
        paths = plot_attention(long, tmp_path, max_tokens=12)
    assert all(p.is_file() for p in paths)
    cut, note = long.truncated(12)
    assert cut.encoder.shape[-2:] == (12, 12) and cut.cross.shape[-1] == 12 and len(cut.source_tokens) == 12
    assert "the source has" in note
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        long.truncated(0)


def test_unwritable_output_path(capture, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="cannot write pictures to .*a-file/maps"):
        plot_attention(capture, blocker / "maps")
    with pytest.raises(OSError, match="cannot write pictures"):
        plot_positions(blocker / "positions")
    with pytest.raises(OSError, match="cannot write pictures"):
        attention_html(capture, blocker / "page.html")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        attention_html(capture, tmp_path)


def test_sdpa_model_switches_to_eager_with_a_message(tokenizer):
    model = _model(tokenizer, "sdpa")
    with pytest.warns(UserWarning, match="'sdpa' attention, which returns no attention weights; switched to 'eager'"):
        captured = capture_attention(model, tokenizer, SOURCE, TARGET)
    assert any("switched to 'eager'" in note for note in captured.notes)
    assert model.config._attn_implementation == "sdpa"  # restored after the capture
    reference = capture_attention(_model(tokenizer), tokenizer, SOURCE, TARGET)
    np.testing.assert_allclose(captured.cross, reference.cross, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an eager model needs no switch and no message
        capture_attention(_model(tokenizer), tokenizer, SOURCE, TARGET)


def test_translation_when_no_target(model, tokenizer):
    translated = capture_attention(model, tokenizer, SOURCE, max_new_tokens=6)
    assert translated.translated
    assert 1 <= len(translated.target_tokens) <= 6
    assert translated.cross.shape[-2:] == (len(translated.target_tokens), len(translated.source_tokens))
    with pytest.raises(ValueError, match="source sentence is empty"):
        capture_attention(model, tokenizer, "  ")
    with pytest.raises(ValueError, match="target sentence is empty"):
        capture_attention(model, tokenizer, SOURCE, "")


def test_html_page_is_self_contained(capture, tmp_path):
    page = attention_html(capture, tmp_path / "attention.html").read_text(encoding="utf-8")
    assert not re.search(r"https?://|//cdn|<link|\bsrc\s*=", page)
    assert page.count("</script>") == 2  # "</s>" tokens are escaped inside the JSON
    data = json.loads(re.search(r'<script id="attention-data"[^>]*>(.*?)</script>', page, re.S).group(1))
    assert set(data["kinds"]) == {"encoder", "decoder", "cross"}
    cross = np.array(data["kinds"]["cross"]["attention"])
    np.testing.assert_allclose(cross, capture.cross, atol=1e-4)
    decoder = data["kinds"]["decoder"]["attention"]
    assert decoder[0][0][0][1] is None and decoder[0][0][1][0] is not None  # future masked as null
    assert data["kinds"]["cross"]["rows"] == capture.target_tokens
    assert data["kinds"]["encoder"]["cols"] == capture.source_tokens
    for control in ('id="kind"', 'id="layer"', 'id="head"', "<canvas"):
        assert control in page


def test_plot_positions(tmp_path):
    paths = plot_positions(tmp_path, length=60, d_model=64)
    assert [p.name for p in paths] == ["positional_encoding.png", "position_similarity.png"]
    assert _pixels(paths[0]) == (1000, 600) and _pixels(paths[1]) == (1200, 500)
    plot_positions(tmp_path / "concat", length=10, d_model=8, layout="concatenated", dpi=50)
    assert _pixels(tmp_path / "concat" / "positional_encoding.png") == (500, 300)
    for kwargs, message in (
        ({"d_model": 7}, "d_model must be an even integer"),
        ({"length": 1}, "length must be an integer"),
        ({"layout": "diagonal"}, "layout must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            plot_positions(tmp_path, **kwargs)


def test_encoder_layer_trace_matches_the_model(model, tokenizer, tmp_path):
    for layer in range(LAYERS):
        trace = trace_encoder_layer(model, tokenizer, SOURCE, layer=layer)
        np.testing.assert_allclose(trace.output, trace.layer_output, atol=1e-5)
    np.testing.assert_allclose(trace.weights.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(trace.weights, capture_attention(model, tokenizer, SOURCE, TARGET).encoder[layer],
                               atol=1e-5)
    assert trace.ffn_hidden.min() >= 0  # ReLU
    paths = plot_encoder_layer(trace, tmp_path, head=1)
    assert [_pixels(p) for p in paths] == [(1600, 800), (1400, 450)]
    with pytest.raises(ValueError, match="encoder layer 9 does not exist"):
        trace_encoder_layer(model, tokenizer, SOURCE, layer=9)


def test_cli_attention_and_plot(model_dir, tmp_path, capsys):
    out = tmp_path / "attention"
    main(["attention", str(model_dir), SOURCE, "--target-text", TARGET, "--output", str(out), "--steps"])
    captured = capsys.readouterr()
    assert "switched to 'eager'" in captured.err
    assert "wrote" in captured.out and (out / "attention.html").is_file()
    assert len(list(out.glob("*.png"))) == 8
    main(["attention", str(model_dir), SOURCE, "--target-text", TARGET, "--output", str(out),
          "--max-drawn-tokens", "5"])
    assert "drawing only the first 5" in capsys.readouterr().err
    main(["plot", "positions", "--length", "20", "--d-model", "16", "--output", str(tmp_path / "pos")])
    assert (tmp_path / "pos" / "position_similarity.png").is_file()


def test_cli_errors(model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv, message in (
        (["attention", str(model_dir), SOURCE, "--output", str(blocker / "out")], "cannot write pictures"),
        (["attention", str(tmp_path / "missing"), SOURCE, "--output", str(tmp_path / "o")], "no such folder"),
        (["attention", str(model_dir), SOURCE, "--target-text", TARGET, "--output", str(tmp_path / "o"),
          "--layer", "7"], "layer 7 does not exist"),
        (["plot", "positions", "--d-model", "5", "--output", str(tmp_path / "p")], "d_model must be"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
