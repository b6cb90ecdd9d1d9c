"""The shared BPE tokenizer: special tokens, targets, lossless round trip, training errors, save/load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MULTI30K, fixture_lines, needs_multi30k
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import vaswani.tokenization
from vaswani.tokenization import (
    MIN_VOCAB_SIZE,
    VaswaniTokenizerFast,
    load_tokenizer,
    tokenizer_from_backend,
    train_tokenizer,
)
from vaswani.training.data import read_lines, train_tokenizer_from_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRICKY = [
    "Two young, White males are outside near many bushes.",
    "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    "  leading and trailing spaces  ",
    "double  spaces,\ttabs and (punctuation)!? « guillemets » — dashes… “quotes”",
    "Ça coûte 3,50 € à l'hôtel Größe ÄÖÜ ß",
    "emoji 😀👍🏽 and flags 🇩🇪",
    "中文句子。日本語の文。한국어 문장.",
    "decomposed e\u0301 vs composed é, ligature ﬁ, full-width ＡＢＣ",
    "a",
]


VOCAB_SIZE = 500  # fewer merges than the test sentences allow, so the vocabulary is full


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    corpus = fixture_lines("en") + fixture_lines("de") + TRICKY
    train_tokenizer(corpus, vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False, output_dir=out)
    return out


@pytest.fixture(scope="module")
def tok(folder: Path) -> VaswaniTokenizerFast:
    return AutoTokenizer.from_pretrained(folder)


def test_saved_as_a_plain_fast_tokenizer_with_fixed_special_ids(tok: VaswaniTokenizerFast, folder: Path) -> None:
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert [tok.convert_ids_to_tokens(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert len(tok) == len(tok.get_vocab()) == VOCAB_SIZE
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in config
    assert sorted(path.name for path in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_source_and_target_end_with_eos_without_bos(tok: VaswaniTokenizerFast) -> None:
    enc = tok(["Two dogs run.", "A man."], text_target=["Zwei Hunde rennen.", "Ein Mann."])
    assert set(enc) == {"input_ids", "attention_mask", "labels"}
    for ids in enc["input_ids"] + enc["labels"]:
        assert ids[-1] == tok.eos_token_id
        assert tok.eos_token_id not in ids[:-1]
        assert tok.bos_token_id not in ids and tok.pad_token_id not in ids
    assert [sum(m) for m in enc["attention_mask"]] == [len(i) for i in enc["input_ids"]]
    assert tok.batch_decode(enc["labels"], skip_special_tokens=True) == ["Zwei Hunde rennen.", "Ein Mann."]


@pytest.mark.parametrize("text", TRICKY)
def test_lossless_on_tricky_text_and_no_unk(tok: VaswaniTokenizerFast, text: str) -> None:
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_padded_batch_decodes_to_the_text(tok: VaswaniTokenizerFast) -> None:
    batch = tok(TRICKY, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == len(TRICKY)
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == TRICKY


@pytest.mark.parametrize("lang", ["en", "de"])
def test_round_trip_on_all_test_sentences(tok: VaswaniTokenizerFast, lang: str) -> None:
    lines = fixture_lines(lang)
    ids = tok(lines)["input_ids"]
    assert tok.batch_decode(ids, skip_special_tokens=True) == lines
    assert all(tok.unk_token_id not in row for row in ids)
    assert sum(map(len, ids)) < sum(map(len, lines)) / 3  # merges learnt: well under one token per 3 bytes


@needs_multi30k
@pytest.mark.parametrize("lang", ["en", "de"])
def test_round_trip_on_all_multi30k_train_lines(tok: VaswaniTokenizerFast, lang: str) -> None:
    lines = list(read_lines(MULTI30K / f"train.{lang}.gz"))
    assert len(lines) == 29000
    decoded = tok.batch_decode(tok(lines)["input_ids"], skip_special_tokens=True)
    differ = [(a, b) for a, b in zip(lines, decoded) if a != b]
    exact = 1 - len(differ) / len(lines)
    print(f"round trip {lang}: {exact:.4%} exact, differing: {differ[:3]}")
    assert exact >= 0.999


def test_vocab_smaller_than_alphabet_is_an_error() -> None:
    with pytest.raises(ValueError, match="smaller than the alphabet"):
        train_tokenizer(["a b c"], vocab_size=MIN_VOCAB_SIZE - 1, show_progress=False)
    # The smallest legal vocabulary still encodes anything losslessly (bytes only).
    small = train_tokenizer(TRICKY, vocab_size=MIN_VOCAB_SIZE, min_frequency=1, show_progress=False)
    assert len(small) == MIN_VOCAB_SIZE
    assert small.batch_decode(small(TRICKY)["input_ids"], skip_special_tokens=True) == TRICKY


def test_empty_corpus_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([], vocab_size=1000, show_progress=False)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(["", ""], vocab_size=1000, show_progress=False)


def test_backend_with_wrong_special_ids_is_refused() -> None:
    backend = Tokenizer(models.BPE(vocab={"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, "a": 4}, merges=[]))
    with pytest.raises(ValueError, match="'<pad>' at id 0"):
        tokenizer_from_backend(backend)


def test_folder_missing_files_is_a_clear_error(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="lacks tokenizer.json"):
        load_tokenizer(tmp_path)
    assert load_tokenizer(folder)("a b")["input_ids"][-1] == 3


def test_train_from_files_is_joint_on_source_and_target(tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("hello world\n" * 20, encoding="utf-8")
    (tmp_path / "t.txt").write_text("Grüße Welt\n" * 20, encoding="utf-8")
    tok, report = train_tokenizer_from_corpus(
        tmp_path / "s.txt",
        tmp_path / "t.txt",
        vocab_size=300,
        output_dir=tmp_path / "out",
        show_progress=False,
    )
    assert report.pairs == 20
    vocab = tok.get_vocab()
    assert "hello" in vocab and "Ġworld" in vocab
    assert tok.convert_ids_to_tokens(tok("Grüße")["input_ids"][:-1]) == ["GrÃ¼ÃŁe"]  # byte-level form
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("Grüße")["input_ids"] == tok("Grüße")["input_ids"]


def test_train_from_the_first_pairs_only(tmp_path: Path) -> None:
    source = ["hello world"] * 20 + ["zebra quagga"] * 20
    target = ["Hallo Welt"] * 20 + ["Zebra Quagga"] * 20
    (tmp_path / "s.txt").write_text("\n".join(source) + "\n", encoding="utf-8")
    (tmp_path / "t.txt").write_text("\n".join(target) + "\n", encoding="utf-8")
    sample, report = train_tokenizer_from_corpus(
        tmp_path / "s.txt", tmp_path / "t.txt", vocab_size=300, max_pairs=20, show_progress=False
    )
    alone = train_tokenizer(source[:20] + target[:20], vocab_size=300, show_progress=False)
    assert report.pairs == 40  # the corpus is read whole; the vocabulary comes from its first 20 pairs
    assert sample.get_vocab() == alone.get_vocab()
    assert "Ġworld" in sample.get_vocab() and "Ġquagga" not in sample.get_vocab()
    with pytest.raises(ValueError, match="max_pairs must be at least 1"):
        train_tokenizer_from_corpus(tmp_path / "s.txt", tmp_path / "t.txt", vocab_size=300, max_pairs=0)


def _encoded_in_a_fresh_process_without_vaswani(folder: Path, tmp_path: Path, remote_code: bool) -> str:
    code = f"""
import sys
sys.modules["vaswani"] = None  # the package is not importable here
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(folder)!r}{", trust_remote_code=True" if remote_code else ""})
assert type(tok).__module__.startswith({"'transformers_modules'" if remote_code else "'transformers.'"}), type(tok)
enc = tok(["Zwei Männer 😀."], text_target=["Two men 😀."])
print(enc["input_ids"][0], enc["labels"][0], tok.batch_decode(enc["labels"], skip_special_tokens=True)[0])
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def _encoded_here(tokenizer: PreTrainedTokenizerFast) -> str:
    here = tokenizer(["Zwei Männer 😀."], text_target=["Two men 😀."])
    return f"{here['input_ids'][0]} {here['labels'][0]} Two men 😀."


def test_fresh_process_loads_without_vaswani_and_without_remote_code(
    tok: VaswaniTokenizerFast, folder: Path, tmp_path: Path
) -> None:
    assert _encoded_in_a_fresh_process_without_vaswani(folder, tmp_path, remote_code=False) == _encoded_here(tok)


@pytest.fixture
def old_folder(folder: Path, tmp_path: Path) -> Path:
    """A folder as the package saved it before: class VaswaniTokenizer, loaded by the remote code beside it."""
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    config = json.loads((old / "tokenizer_config.json").read_text())
    remote_class = {"AutoTokenizer": [None, "tokenization.VaswaniTokenizerFast"]}
    config.update(tokenizer_class="VaswaniTokenizer", auto_map=remote_class)
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(vaswani.tokenization.__file__, old / "tokenization.py")
    return old


def test_folders_saved_before_still_load(tok: VaswaniTokenizerFast, old_folder: Path, tmp_path: Path) -> None:
    assert type(load_tokenizer(old_folder)) is VaswaniTokenizerFast
    assert _encoded_here(load_tokenizer(old_folder)) == _encoded_here(tok)
    assert _encoded_here(AutoTokenizer.from_pretrained(old_folder)) == _encoded_here(tok)
    remote = _encoded_in_a_fresh_process_without_vaswani(old_folder, tmp_path, remote_code=True)
    assert remote == _encoded_here(tok)
