"""`vaswani translate` and vaswani.translate: batching, order, line alignment, bad input."""

import gzip
import io
import sys

import pytest
import torch
from translation_helpers import make_model_folder

from vaswani import perf
from vaswani.cli import main
from vaswani.translate import _one_line, load_translation_model, token_batches, translate


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def loaded(folder):
    return load_translation_model(folder)


SENTENCES = [
    "A man in a blue shirt is standing on a ladder.",
    "",
    "Two dogs.",
    "   ",
    "Ein Mädchen spielt im Sand 🏖️ mit 漢字 und ∮ E⋅da = Q — never seen.",
    "Line\u2028separator inside one sentence.",
    "A group of people are sitting at tables outside a restaurant on a sunny day.",
]


def test_token_batches_sorted_within_budget():
    lengths = [5, 30, 7, 7, 12, 3, 100]
    batches = token_batches(lengths, max_tokens=30)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches[0] == [6]  # longer than the budget: alone
    for batch in batches:
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 30
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(flat, reverse=True)


def test_order_restored_and_blank_lines_kept(loaded):
    model, tokenizer = loaded
    together = translate(model, tokenizer, SENTENCES, max_tokens=40)
    alone = [translate(model, tokenizer, [sentence])[0] for sentence in SENTENCES]
    assert together == alone
    assert [i for i, t in enumerate(together) if t == ""] == [1, 3]
    assert all(text and "\n" not in text for i, text in enumerate(together) if i not in (1, 3))


def test_overlong_line_is_cut_and_reported(loaded):
    model, tokenizer = loaded
    warnings = []
    long_line = ("A very long sentence about dogs and people in the park. " * 200)[:10_000]
    out = translate(model, tokenizer, ["Hi.", long_line, ""], max_input_tokens=64, warn=warnings.append)
    assert len(out) == 3 and out[1] and out[2] == ""
    assert len(warnings) == 1 and warnings[0].startswith("sentence 2:") and "cut to the first 64" in warnings[0]


def test_translation_line_breaks_become_spaces():
    assert _one_line("eins\nzwei\r\ndrei\u2028vier") == "eins zwei drei vier"
    assert _one_line("") == ""


def test_cli_file_to_file_line_for_line(folder, tmp_path, capsys):
    source = tmp_path / "in.en.gz"
    with gzip.open(source, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(SENTENCES) + "\n")
    target = tmp_path / "out.de"
    main(["translate", str(folder), "--input", str(source), "--output-file", str(target), "--max-input-tokens", "64"])
    lines = target.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(SENTENCES)
    assert [i for i, line in enumerate(lines[:-1]) if line == ""] == [1, 3]
    assert "sent" in capsys.readouterr().err  # the progress bar


def test_cli_arguments_and_stdin(folder, monkeypatch, capsys):
    main(["translate", str(folder), "Two dogs.", "", "A man."])
    from_args = capsys.readouterr().out.split("\n")
    assert len(from_args) == 4 and from_args[1] == ""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Two dogs.\r\n\nA man.")))
    main(["translate", str(folder), "--beam", "2", "--max-len-b", "5"])
    from_stdin = capsys.readouterr().out.split("\n")
    assert len(from_stdin) == 4 and from_stdin[1] == ""


def test_cli_empty_file_gives_empty_output(folder, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    main(["translate", str(folder), "-i", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "out.txt")])
    assert (tmp_path / "out.txt").read_text() == ""


def _error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_folder_without_tokenizer_is_refused_clearly(folder, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (bare / name).write_bytes((folder / name).read_bytes())
    message = _error_of(["translate", str(bare), "Hello."], capsys)
    assert "has no tokenizer" in message and "tokenizer.save_pretrained" in message


def test_bfloat16_on_a_cpu_that_emulates_it_warns_when_loading(folder, monkeypatch):
    monkeypatch.setattr(perf, "bf16_is_emulated", lambda: True)
    with pytest.warns(UserWarning, match="translating in bfloat16 on a CPU without bf16 products.*use float32"):
        model, _ = load_translation_model(folder, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16  # a warning, not a refusal


def test_unreachable_hub_id_says_how_to_use_a_folder(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _error_of(["translate", "someone/opus-mt-xx-yy", "Hello."], capsys)
    assert "could not reach 'someone/opus-mt-xx-yy'" in message and "pass its path instead" in message
