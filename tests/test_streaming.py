"""`vaswani train --streaming`: token batches from a stream through a bounded sort buffer, shared across processes
without overlap, resumed mid-epoch after a kill, and the bad input a stream meets."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import KILLABLE_TRAIN, fixture_lines
from safetensors.torch import load_file

from vaswani.cli import main
from vaswani.tokenization import train_tokenizer
from vaswani.training.batching import TokenBatchSampler
from vaswani.training.streaming import (
    DEFAULT_BUFFER_PAIRS,
    STREAM_STATE,
    StreamPosition,
    TokenBatchStream,
    stream_corpus,
)
from vaswani.training.trainer import last_complete_checkpoint

QUICK = ["--preset", "tiny", "--set", "d_model=32", "encoder_layers=1", "decoder_layers=1", "encoder_ffn_dim=64",
         "decoder_ffn_dim=64", "--vocab-size", "300", "--max-tokens", "300", "--warmup-steps", "4", "--no-progress",
         "--eval-steps", "0", "--report-to", "none"]


@pytest.fixture(scope="module", autouse=True)
def _denormals_back():
    yield
    torch.set_flush_denormal(False)  # training here flushed denormals for the whole process (tune_cpu_training)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The 300 test pairs as gzipped line-aligned files."""
    folder = tmp_path_factory.mktemp("stream")
    for lang in ("en", "de"):
        with gzip.open(folder / f"train.{lang}.gz", "wt", encoding="utf-8") as handle:
            handle.write("\n".join(fixture_lines(lang)) + "\n")
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(fixture_lines("en") + fixture_lines("de"), vocab_size=400, show_progress=False)


def _files(folder: Path) -> dict[str, str]:
    return {"source": str(folder / "train.en.gz"), "target": str(folder / "train.de.gz")}


def _stream(corpus: Path, tokenizer, rank: int = 0, world_size: int = 1, **kwargs) -> TokenBatchStream:
    pairs = stream_corpus(_files(corpus), rank=rank, world_size=world_size)
    values = {"max_tokens": 200, "buffer_pairs": 64, "collate_fn": _with_rows, **kwargs}
    return TokenBatchStream(pairs, tokenizer, values.pop("max_tokens"), **values)


def _with_rows(rows: list[dict]) -> dict:
    """The tests' collate_fn: which pairs a batch holds (their source ids) and its token cost."""
    return {"rows": [tuple(row["input_ids"]) for row in rows], "cost": len(rows) * max(
        max(len(row["input_ids"]), len(row["labels"])) for row in rows)}


def _take(stream: TokenBatchStream, count: int) -> list[dict]:
    batches = iter(stream)
    return [next(batches) for _ in range(count)]


def _first_epoch(stream: TokenBatchStream) -> list[dict]:
    batches = []
    for batch in stream:
        if batch["stream_position"]["epoch"] > 0:
            return batches
        batches.append(batch)


def _sources(batches: list[dict]) -> list[tuple[int, ...]]:
    return sorted(row for batch in batches for row in batch["rows"])


def test_one_epoch_holds_every_pair_once_in_batches_within_the_budget(corpus, tokenizer):
    batches = _first_epoch(_stream(corpus, tokenizer))
    assert all(batch["cost"] <= 200 for batch in batches)
    assert _sources(batches) == sorted(tuple(ids) for ids in tokenizer(fixture_lines("en"))["input_ids"])


def test_two_processes_read_disjoint_shares_that_make_up_the_corpus(corpus, tokenizer):
    lines = [tuple(ids) for ids in tokenizer(fixture_lines("en"))["input_ids"]]
    for rank in (0, 1):  # every other line: no pair in both shares, none in neither
        share = _first_epoch(_stream(corpus, tokenizer, rank=rank, world_size=2))
        assert _sources(share) == sorted(lines[rank::2])


def test_sort_buffer_groups_lengths_like_the_in_memory_sampler(corpus, tokenizer):
    """With the whole corpus in one buffer the stream packs as tightly as TokenBatchSampler does."""
    batches = _first_epoch(_stream(corpus, tokenizer, buffer_pairs=10_000))
    encoded = tokenizer(fixture_lines("en"), text_target=fixture_lines("de"))
    sampler = TokenBatchSampler([len(x) for x in encoded["input_ids"]], [len(x) for x in encoded["labels"]], 200)
    assert len(batches) == len(sampler)


def test_reading_is_lazy_and_bounded_by_the_buffer(corpus, tokenizer):
    read = []

    class Counted:
        def __init__(self, pairs):
            self.pairs = pairs

        def __iter__(self):
            for row in self.pairs:
                read.append(row["line"])
                yield row

        def __getattr__(self, name):
            return getattr(self.pairs, name)

    stream = TokenBatchStream(Counted(stream_corpus(_files(corpus))), tokenizer, 200, buffer_pairs=40,
                              collate_fn=_with_rows)
    next(iter(stream))
    assert len(read) == 40  # one buffer read for the first batch, not the 300-pair corpus


def test_resumed_stream_continues_with_the_same_batches_across_epochs(corpus, tokenizer):
    straight = _take(_stream(corpus, tokenizer, rank=1, world_size=2), 40)  # 150 pairs a share: ~3 epochs
    assert straight[-1]["stream_position"]["epoch"] >= 1
    for cut in (1, 5, 13, 27):
        position = StreamPosition.from_dict(json.loads(json.dumps(straight[cut - 1]["stream_position"])))
        resumed = _take(_stream(corpus, tokenizer, rank=1, world_size=2, start=position), 40 - cut)
        assert [b["rows"] for b in resumed] == [b["rows"] for b in straight[cut:]], cut


def test_epochs_and_seeds_change_the_order(corpus, tokenizer):
    first = _first_epoch(_stream(corpus, tokenizer))
    second = _take(_stream(corpus, tokenizer), 2 * len(first))[len(first) :]
    assert {b["stream_position"]["epoch"] for b in second} == {1}
    assert _sources(second) == _sources(first) and [b["rows"] for b in second] != [b["rows"] for b in first]
    other_seed = _first_epoch(_stream(corpus, tokenizer, seed=1))
    assert [b["rows"] for b in other_seed] != [b["rows"] for b in first]


def test_empty_pairs_are_dropped_or_refused_with_their_line(tmp_path, tokenizer):
    (tmp_path / "train.en").write_text("one\n\nthree\n", encoding="utf-8")
    (tmp_path / "train.de").write_text("eins\nzwei\ndrei\n", encoding="utf-8")
    files = {"source": str(tmp_path / "train.en"), "target": str(tmp_path / "train.de")}
    stream = TokenBatchStream(stream_corpus(files), tokenizer, 200, collate_fn=_with_rows)
    assert len(next(iter(stream))["rows"]) == 2 and stream.dropped["empty"] == 1
    refusing = TokenBatchStream(stream_corpus(files), tokenizer, 200, collate_fn=_with_rows, empty_lines="error")
    with pytest.raises(ValueError, match="line 2 has an empty source or target"):
        next(iter(refusing))


def test_truncated_gzip_mid_stream_names_the_file_and_line(tmp_path, tokenizer):
    lines = [f"sentence number {i} with some words" for i in range(20000)]
    for lang in ("en", "de"):
        data = gzip.compress(("\n".join(lines) + "\n").encode())
        (tmp_path / f"train.{lang}.gz").write_bytes(data if lang == "de" else data[: len(data) // 2])
    stream = TokenBatchStream(stream_corpus(_files(tmp_path)), tokenizer, 4000, collate_fn=_with_rows,
                              buffer_pairs=1000)
    with pytest.raises(ValueError, match=r"train\.en\.gz is truncated or damaged after line [\d,]+"):
        for _ in stream:
            pass


def test_source_and_target_of_different_lengths_stop_the_stream(tmp_path, tokenizer):
    (tmp_path / "train.en").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "train.de").write_text("a\nb\n", encoding="utf-8")
    files = {"source": str(tmp_path / "train.en"), "target": str(tmp_path / "train.de")}
    stream = TokenBatchStream(stream_corpus(files), tokenizer, 200, collate_fn=_with_rows)
    with pytest.raises(ValueError, match="has 3 lines but .* has 2"):
        next(iter(stream))


def test_the_cli_default_buffer_is_the_librarys():
    from vaswani.cli.training import TrainOptions

    assert TrainOptions().buffer_pairs == DEFAULT_BUFFER_PAIRS


# ---- vaswani train --streaming end to end ----

def _train(corpus: Path, out: Path, *extra: str, kill_at: int = 0) -> subprocess.CompletedProcess:
    args = ["--source", str(corpus / "train.en.gz"), "--target", str(corpus / "train.de.gz"), "--output", str(out),
            "--streaming", "--buffer-pairs", "40", "--max-steps", "14", "--save-steps", "4", "--set", "dropout=0.1",
            *QUICK, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KILL_AT": str(kill_at), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", KILLABLE_TRAIN, "train", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def test_killed_streaming_run_resumes_to_the_same_parameters(corpus, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _train(corpus, straight).returncode == 0
    assert _train(corpus, killed, kill_at=10).returncode == -9  # after checkpoint-8, mid-epoch
    assert last_complete_checkpoint(killed).name == "checkpoint-8"
    state = json.loads((killed / "checkpoint-8" / STREAM_STATE).read_text())
    assert state["world_size"] == 1 and state["positions"][0]["epoch"] == 0
    resumed = _train(corpus, killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one, two = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-6), key


def test_resume_on_a_changed_corpus_is_refused_unless_the_data_is_reset(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-steps", "4").returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    for lang in ("en", "de"):
        (other / f"train.{lang}.gz").write_bytes((corpus / f"train.{lang}.gz").read_bytes()[:-8] + b"\0" * 8)
    args = ["train", "--source", str(other / "train.en.gz"), "--target", str(other / "train.de.gz"), "--output",
            str(out), "--streaming", "--max-steps", "6", "--save-steps", "2", "--resume", *QUICK]
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "the training corpus is not the one" in err and "--reset-dataloader" in err
    assert "Traceback" not in err
    assert last_complete_checkpoint(out).name == "checkpoint-4"  # nothing written


def test_streaming_needs_max_steps(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--source", str(corpus / "train.en.gz"), "--target", str(corpus / "train.de.gz"),
              "--output", str(tmp_path / "run"), "--streaming", *QUICK])
    assert info.value.code == 2 and "give --max-steps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_streaming_from_a_dataset_in_the_hubs_translation_layout(tmp_path):
    folder = tmp_path / "wmt_like"
    folder.mkdir()
    pairs = list(zip(fixture_lines("en"), fixture_lines("de")))
    for split, rows in (("train", pairs), ("validation", pairs[:6])):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for en, de in rows:
                handle.write(json.dumps({"translation": {"de": de, "en": en}}) + "\n")
    out = tmp_path / "run"
    main(["train", "--dataset", str(folder), "--source-lang", "en", "--target-lang", "de", "--streaming",
          "--valid-split", "validation", "--eval-max-sentences", "4", "--eval-beams", "1", "--output", str(out),
          "--max-steps", "3", "--save-steps", "3", *QUICK[:-4]])
    run = json.loads((out / "vaswani_run.json").read_text())
    assert run["result"]["steps"] == 3 and run["result"]["train_pairs"] is None
    assert "eval_bleu" in run["result"]["eval_metrics"]
    assert (out / "checkpoint-3" / STREAM_STATE).is_file()


def test_a_dataset_without_the_language_names_the_ones_it_has(tmp_path, capsys):
    folder = tmp_path / "wmt_like"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"translation": {"de": "Hallo", "en": "Hello"}}) + "\n")
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", str(folder), "--source-lang", "en", "--target-lang", "fr", "--streaming",
              "--output", str(tmp_path / "run"), "--max-steps", "2", *QUICK])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "'fr' is not in the translation column" in err and "'de', 'en'" in err


def test_lengths_of_buffered_rows_are_compact(corpus, tokenizer):
    stream = _stream(corpus, tokenizer)
    rows = stream._fill(iter(stream_corpus(_files(corpus))))
    assert len(rows) == 64 and all(row["input_ids"].dtype == np.int32 for row in rows)


# ---- several processes and machines ----

def _two_processes(port: int) -> list[str]:
    """``accelerate launch`` of 2 CPU processes (gloo) meeting at ``port``."""
    return ["-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "2", "--multi_gpu",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def _launch(launcher: list[str], corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["-m", "vaswani", "train", "--source", str(corpus / "train.en.gz"), "--target", str(corpus / "train.de.gz"),
            "--output", str(out), "--streaming", "--buffer-pairs", "40", "--max-steps", "4", "--save-steps", "2",
            *QUICK, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    return subprocess.run([sys.executable, *launcher, *args], env=env, capture_output=True, text=True, timeout=600,
                          cwd=out.parent)


def test_two_processes_stream_their_own_shares_and_refuse_to_resume_with_one(corpus, tmp_path, capsys):
    out = tmp_path / "ddp"
    launcher = _two_processes(29541)
    result = _launch(launcher, corpus, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "vaswani_run.json").read_text())["result"]["world_size"] == 2
    state = json.loads((out / "checkpoint-4" / STREAM_STATE).read_text())
    assert state["world_size"] == 2 and all(position["batches"] >= 1 for position in state["positions"])
    with pytest.raises(SystemExit) as info:
        main(["train", "--source", str(corpus / "train.en.gz"), "--target", str(corpus / "train.de.gz"), "--output",
              str(out), "--streaming", "--max-steps", "6", "--resume", *QUICK])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "saved by 2 processes" in err and "this run has 1" in err


def test_torchrun_two_nodes_on_one_host(corpus, tmp_path):
    """Two "machines" (torchrun agents) meeting through c10d rendezvous on localhost, one process each."""
    out = tmp_path / "nodes"
    launcher = ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "localhost:29543", "--rdzv-id", "vaswani-test"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["-m", "vaswani", "train", "--source", str(corpus / "train.en.gz"), "--target", str(corpus / "train.de.gz"),
            "--output", str(out), "--streaming", "--buffer-pairs", "40", "--max-steps", "3", "--save-steps", "3",
            *QUICK]
    nodes = [subprocess.Popen([sys.executable, *launcher, *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert json.loads((out / "vaswani_run.json").read_text())["result"]["world_size"] == 2
    assert json.loads((out / "checkpoint-3" / STREAM_STATE).read_text())["world_size"] == 2


def test_a_lost_process_stops_the_group_with_a_clear_error_and_the_checkpoint_intact(corpus, tmp_path):
    out = tmp_path / "lost"
    script = tmp_path / "kill_rank.py"
    script.write_text(KILLABLE_TRAIN)
    launcher = _two_processes(29545)
    args = ["train", "--source", str(corpus / "train.en.gz"), "--target", str(corpus / "train.de.gz"), "--output",
            str(out), "--streaming", "--buffer-pairs", "40", "--max-steps", "8", "--save-steps", "2", *QUICK]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "KILL_AT": "3",
           "KILL_RANK": "1"}
    result = subprocess.run([sys.executable, *launcher, str(script), *args], env=env, capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("vaswani train: ")]
    assert ours and "the last complete checkpoint is" in ours[0] and "checkpoint-2" in ours[0], result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr  # the launcher's own report of the lost process stays
    assert last_complete_checkpoint(out).name == "checkpoint-2"
    resumed = _launch(_two_processes(29547), corpus, out, "--max-steps", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "vaswani_run.json").read_text())["result"]["steps"] == 4


@pytest.mark.parametrize("suffix", [".tsv", ".tsv.gz"])
def test_a_tsv_file_is_a_dataset_in_memory_and_streamed(tmp_path, suffix):
    from vaswani.training.data import load_parallel_corpus

    rows = [('He said "hi".', 'Er sagte "hallo".'), ("Two dogs.", "Zwei Hunde.")]
    text = "en\tde\n" + "".join(f"{en}\t{de}\n" for en, de in rows)
    path = tmp_path / f"pairs{suffix}"
    path.write_bytes(gzip.compress(text.encode()) if suffix.endswith(".gz") else text.encode())
    corpus = {"dataset": str(path), "source_column": "en", "target_column": "de"}
    in_memory, _ = load_parallel_corpus(**corpus)
    streamed = list(stream_corpus(corpus))
    assert [(r["source"], r["target"]) for r in in_memory] == rows  # quotes are part of the text
    assert [(r["source"], r["target"]) for r in streamed] == rows
