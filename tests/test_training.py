"""The training recipe end to end: vaswani train, resume after SIGKILL, bad input, several processes."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT
from safetensors.torch import load_file
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    Seq2SeqTrainingArguments,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from vaswani import perf
from vaswani.cli import main
from vaswani.demo.numbers import make_number_corpus, write_parallel_corpus
from vaswani.training.averaging import run_of
from vaswani.training.run import TrainSettings, recipe_arguments, train
from vaswani.training.schedule import get_noam_schedule, noam_lr, paper_adam
from vaswani.training.trainer import StopOnNonFiniteLoss, TimeBudget, last_complete_checkpoint

TINY = {
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("numbers")
    write_parallel_corpus(make_number_corpus(240, 16, 16, seed=1, max_value=9999), out)
    return out


TRAINING_ARGUMENTS = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}


def settings_for(corpus_dir: Path, output: Path, **overrides) -> TrainSettings:
    """A few updates of the tiny model; ``overrides`` are TrainSettings or Seq2SeqTrainingArguments fields."""
    values = dict(
        train_corpus={"source": corpus_dir / "train.en", "target": corpus_dir / "train.de"},
        preset="tiny",
        config_overrides=dict(TINY),
        vocab_size=300,
        max_tokens=400,
    )
    arguments = dict(max_steps=6, warmup_steps=10, save_steps=3, logging_steps=1, disable_tqdm=True, seed=3)
    for key, value in overrides.items():
        (arguments if key in TRAINING_ARGUMENTS else values)[key] = value
    return TrainSettings(args=recipe_arguments(output, **arguments), **values)


def test_train_produces_a_loadable_model_folder(corpus_dir, tmp_path):
    valid = {"source": corpus_dir / "validation.en", "target": corpus_dir / "validation.de"}
    settings = settings_for(
        corpus_dir, tmp_path / "run", valid_corpus=valid, generation_num_beams=1, eval_steps=3, average_last=2
    )
    result = train(settings)
    out = tmp_path / "run"
    assert result.steps == 6 and result.final_loss is not None
    assert len(result.averaged_checkpoints) == 2
    assert {"eval_loss", "eval_bleu", "eval_bleu_lowercase"} <= set(result.eval_metrics)
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "training_curves.png",
        "vaswani_run.json",
    ):
        assert (out / name).exists(), name
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.generation_config.num_beams == 4
    batch = tokenizer(["forty-two"], return_tensors="pt")
    assert model.generate(**batch, max_new_tokens=5).shape[0] == 1
    # the final model is the average of the last two checkpoints (§6.1)
    a, b = (load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (3, 6))
    final = load_file(out / "model.safetensors")
    key = "model.encoder.layers.0.feed_forward.fc1.weight"
    assert torch.allclose(final[key], (a[key] + b[key]) / 2, atol=1e-6)
    log = json.loads((out / "vaswani_run.json").read_text())
    assert log["result"]["steps"] == 6
    # every checkpoint records the run it belongs to, so averaging can refuse to mix runs
    assert run_of(out / "checkpoint-3") == run_of(out / "checkpoint-6") == log["run_id"]


def _run_on_a_fake_clock(monkeypatch, seconds_per_update, budget_minutes=1.0, cooldown=20, max_steps=10**6):
    """Drive a TimeBudget(fit_cooldown=True) and a cool-down schedule through updates that take
    ``seconds_per_update(step)`` each (after 5 s of start-up); the rates used and the step the run stopped at."""
    clock = [0.0]
    monkeypatch.setattr("vaswani.training.trainer.time.monotonic", lambda: clock[0])
    optimizer = paper_adam([torch.nn.Parameter(torch.zeros(2))])
    schedule = get_noam_schedule(optimizer, 64, 10, cooldown_steps=cooldown, total_steps=max_steps)
    budget = TimeBudget(budget_minutes, fit_cooldown=True)
    state, control = TrainerState(max_steps=max_steps), TrainerControl()
    budget.on_train_begin(None, state, control)
    clock[0] += 5.0
    rates = []
    while not control.should_training_stop:
        rates.append(schedule.get_last_lr()[0])  # the rate of this update
        optimizer.step()
        schedule.step()
        state.global_step += 1
        clock[0] += seconds_per_update(state.global_step)
        budget.on_step_end(None, state, control, lr_scheduler=schedule)
    return rates, state.global_step, clock[0]


def test_time_budget_counts_from_the_start_of_the_run(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("vaswani.training.trainer.time.monotonic", lambda: clock[0])
    from_run, from_training = TimeBudget(1.0, started=40.0), TimeBudget(1.0)  # the run began 60 s ago
    for budget in (from_run, from_training):
        budget.on_train_begin(None, TrainerState(), TrainerControl())
    clock[0] += 1.0
    stops = [budget.on_step_end(None, TrainerState(), TrainerControl()).should_training_stop
             for budget in (from_run, from_training)]
    assert stops == [True, False]  # preparation counted: 61 s since the run began, 1 s since training began


def test_time_budget_places_the_cooldown_at_the_end_of_the_budget(monkeypatch):
    rates, steps, seconds = _run_on_a_fake_clock(monkeypatch, lambda step: 0.5)
    assert 105 <= steps <= 111 and seconds <= 60  # (60 - 5) s / 0.5 s, less the first update's estimate
    factors = [rate / noam_lr(k, 64, 10) for k, rate in enumerate(rates, start=1)]
    assert factors[: steps - 20] == pytest.approx([1.0] * (steps - 20))  # the paper's rate until the cool-down
    assert factors[steps - 20 :] == pytest.approx([(20 - i) / 20 for i in range(20)])  # then a line to 1/20


def test_time_budget_cooldown_follows_a_machine_that_slows_down(monkeypatch):
    # twice as slow from update 40 on: about 40 + (60 - 5 - 20) / 1.0 = 75 updates fit, not 110
    rates, steps, seconds = _run_on_a_fake_clock(monkeypatch, lambda step: 0.5 if step < 40 else 1.0)
    assert seconds <= 61 and 60 <= steps <= 76
    factors = [rate / noam_lr(k, 64, 10) for k, rate in enumerate(rates, start=1)]
    assert factors[-1] < 0.25  # the last updates ran at a small fraction of the rate
    assert factors[:40] == pytest.approx([1.0] * 40)


def test_time_budget_cooldown_ends_with_a_shorter_step_total(monkeypatch):
    rates, steps, _ = _run_on_a_fake_clock(monkeypatch, lambda step: 0.5, max_steps=50)
    assert steps == 50
    assert rates[-1] == pytest.approx(noam_lr(50, 64, 10) / 20)


def test_cooldown_steps_end_the_run_at_a_small_learning_rate(corpus_dir, tmp_path):
    train(settings_for(corpus_dir, tmp_path / "run", cooldown_steps=3))
    state = json.loads((tmp_path / "run" / "checkpoint-6" / "trainer_state.json").read_text())
    logged = {entry["step"]: entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry}
    d_model = TINY["d_model"]
    # the Trainer logs the rate of the update it just made
    assert logged == pytest.approx({k: noam_lr(k, d_model, 10, cooldown_steps=3, total_steps=6) for k in range(1, 7)})
    assert logged[3] == pytest.approx(noam_lr(3, d_model, 10))  # before the cool-down
    assert logged[6] == pytest.approx(noam_lr(6, d_model, 10) / 3)  # the last update: a third of the rate


def test_bad_input_is_refused(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="Unknown preset 'gigantic'"):
        train(settings_for(corpus_dir, tmp_path / "a", preset="gigantic"))
    used = tmp_path / "used"
    used.mkdir()
    (used / "something.txt").write_text("x")
    with pytest.raises(FileExistsError, match="no checkpoint to resume from; pass --overwrite"):
        train(settings_for(corpus_dir, used))
    with pytest.raises(ValueError, match=f"no checkpoint yet in {used}; start again with --overwrite"):
        train(settings_for(corpus_dir, used, resume=True))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        train(settings_for(corpus_dir, tmp_path / "b", train_corpus={"source": empty, "target": empty}))


def test_overwrite_deletes_only_an_earlier_run(corpus_dir, tmp_path, monkeypatch, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="does not look like an earlier `vaswani train` run"):
        train(settings_for(corpus_dir, notes, overwrite=True))
    holding = tmp_path / "holding"  # looks like a run, but the corpus is inside it
    shutil.copytree(corpus_dir, holding)
    (holding / "vaswani_run.json").write_text("{}")
    corpus = {"source": holding / "train.en", "target": holding / "train.de"}
    with pytest.raises(ValueError, match="an input of this run"):
        train(settings_for(corpus_dir, holding, train_corpus=corpus, overwrite=True))
    monkeypatch.chdir(holding)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--source", str(corpus_dir / "train.en"), "--target", str(corpus_dir / "train.de"),
              "--output", ".", "--overwrite", "--preset", "tiny", "--report-to", "none", "--no-progress"])
    assert exit_info.value.code == 2
    assert "the current folder" in capsys.readouterr().err
    assert (notes / "thesis.txt").read_text() == "years of work"
    assert (holding / "train.en").read_bytes() == (corpus_dir / "train.en").read_bytes()
    run = tmp_path / "run"
    train(settings_for(corpus_dir, run, max_steps=3))
    (run / "checkpoint-3" / "stale").write_text("from the first run")
    assert train(settings_for(corpus_dir, run, max_steps=3, overwrite=True)).steps == 3
    assert not (run / "checkpoint-3" / "stale").exists()


def test_resume_never_trains_past_the_end(corpus_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(settings_for(corpus_dir, out))
    final = (out / "model.safetensors").read_bytes()
    assert train(settings_for(corpus_dir, out, resume=True)).steps == 6
    assert "finished run of 6 updates; nothing to resume" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == final
    # killed after checkpoint-6 but before the final save: the run file has no result, no final model
    (out / "model.safetensors").unlink()
    record = json.loads((out / "vaswani_run.json").read_text())
    del record["result"]
    (out / "vaswani_run.json").write_text(json.dumps(record))
    assert train(settings_for(corpus_dir, out, resume=True)).steps == 6
    assert "finishing the run without training" in capsys.readouterr().out
    last = load_file(out / "checkpoint-6" / "model.safetensors")
    finished = load_file(out / "model.safetensors")
    assert all(torch.equal(finished[key], last[key]) for key in last)
    assert json.loads((out / "vaswani_run.json").read_text())["result"]["steps"] == 6


def test_the_run_file_is_never_seen_half_written(corpus_dir, tmp_path):
    """At a resume the main process rewrites vaswani_run.json while the other processes read it: a reader never
    finds it empty or cut short (a truncate-then-write once stopped a 2-process DeepSpeed resume)."""
    import threading

    from vaswani.training.run import RUN_FILE, write_run_file

    settings = settings_for(corpus_dir, tmp_path / "run")
    settings.output_dir.mkdir()
    write_run_file(settings, "first")
    done, seen = threading.Event(), []

    def read_until_done() -> None:
        while not done.is_set():
            seen.append(json.loads((settings.output_dir / RUN_FILE).read_text())["run_id"])

    reader = threading.Thread(target=read_until_done)
    reader.start()
    try:
        for _ in range(300):
            write_run_file(settings, "again")
    finally:
        done.set()
        reader.join()
    assert seen and set(seen) <= {"first", "again"}
    assert [p.name for p in settings.output_dir.iterdir()] == [RUN_FILE]


def test_config_contradicting_tokenizer(corpus_dir, tmp_path):
    from vaswani import VaswaniConfig

    VaswaniConfig(vocab_size=50, **TINY).save_pretrained(tmp_path / "cfg")
    with pytest.raises(ValueError, match="vocab_size .50. is smaller than the tokenizer's vocabulary"):
        train(settings_for(corpus_dir, tmp_path / "c", config_file=tmp_path / "cfg"))
    VaswaniConfig(vocab_size=400, eos_token_id=5, **TINY).save_pretrained(tmp_path / "cfg2")
    with pytest.raises(ValueError, match="eos_token_id=5 but the tokenizer has 3"):
        train(settings_for(corpus_dir, tmp_path / "d", config_file=tmp_path / "cfg2"))


def test_config_mistakes_are_errors_naming_the_nearest_key(corpus_dir, tmp_path):
    from vaswani import VaswaniConfig
    from vaswani.configuration import check_config_dict

    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="there is no .*config.json"):  # not the 63M-parameter base model
        train(settings_for(corpus_dir, out, config_file=tmp_path / "empty"))
    with pytest.raises(ValueError, match="--set: unknown key 'dropuot'; did you mean 'dropout'"):
        train(settings_for(corpus_dir, out, config_overrides={**TINY, "dropuot": 0.3}))
    config = tmp_path / "cfg"
    VaswaniConfig(vocab_size=400, **TINY).save_pretrained(config)  # auto_map, dtype, transformers_version, ...
    saved = json.loads((config / "config.json").read_text())
    (config / "config.json").write_text(json.dumps({**saved, "encoder_layres": 4}))
    with pytest.raises(ValueError, match="unknown key 'encoder_layres'; did you mean 'encoder_layers'"):
        train(settings_for(corpus_dir, out, config_file=config))
    (config / "config.json").write_text(json.dumps(saved))
    (config / "generation_config.json").write_text(json.dumps({"num_beam": 2}))
    with pytest.raises(ValueError, match="unknown key 'num_beam'; did you mean 'num_beams'"):
        train(settings_for(corpus_dir, out, config_file=config))
    assert not out.exists()  # refused before anything was written
    (config / "generation_config.json").write_text(json.dumps({"num_beams": 2, "max_len_b": 9}))
    train(settings_for(corpus_dir, out, config_file=config, max_steps=1))
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert (model.config.d_model, model.generation_config.num_beams, model.generation_config.max_len_b) == (32, 2, 9)
    with pytest.warns(UserWarning, match="a 'marian' config.*static_position_embeddings are ignored"):
        check_config_dict({"model_type": "marian", "d_model": 32, "static_position_embeddings": True}, "config.json")


def test_bf16_training_on_a_cpu_that_emulates_it_warns(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(perf, "bf16_is_emulated", lambda: True)
    with pytest.warns(UserWarning, match="training in bfloat16 on a CPU without bf16 products.*use float32"):
        result = train(settings_for(corpus_dir, tmp_path / "run", bf16=True, max_steps=1, average_last=1))
    assert result.steps == 1  # a warning, not a refusal


def test_non_finite_loss_stops_without_saving():
    guard = StopOnNonFiniteLoss()
    control = TrainerControl(should_save=True)
    args = TrainingArguments(output_dir="/tmp/unused", report_to="none")
    guard.report(torch.tensor(2.0), 6)
    guard.on_step_end(args, TrainerState(), control)
    assert not control.should_training_stop and control.should_save
    guard.report(torch.tensor(float("nan")), 7)
    guard.on_step_end(args, TrainerState(), control)
    assert control.should_training_stop and not control.should_save and guard.bad_step == 7


def test_diverging_run_reports_nan_and_keeps_last_good_checkpoint(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="NaN/inf at step"):
        train(settings_for(corpus_dir, tmp_path / "nan", learning_rate=1e12, max_steps=40, warmup_steps=1))
    saved = last_complete_checkpoint(tmp_path / "nan")
    if saved is not None:  # whatever was saved holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(saved / "model.safetensors").values())


_RUN_SCRIPT = """
import os, signal, sys
from pathlib import Path
from transformers import TrainerCallback
sys.path.insert(0, {tests!r})
from test_training import settings_for

class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

from vaswani.training.run import train
settings = settings_for(Path({corpus!r}), Path({out!r}), config_overrides=dict({overrides!r}), resume={resume})
train(settings, callbacks=[KillAt()] if {kill_at} else [])
"""


def _run(corpus_dir: Path, out: Path, kill_at: int = 0, resume: bool = False) -> int:
    from test_training import TINY as tiny

    script = _RUN_SCRIPT.format(
        tests=str(Path(__file__).parent),
        corpus=str(corpus_dir),
        out=str(out),
        kill_at=kill_at,
        resume=resume,
        overrides={**tiny, "dropout": 0.1},
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=600).returncode


def test_killed_run_resumes_to_the_same_parameters(corpus_dir, tmp_path):
    assert _run(corpus_dir, tmp_path / "straight") == 0
    assert _run(corpus_dir, tmp_path / "killed", kill_at=5) == -9  # SIGKILL after checkpoint-3
    killed = tmp_path / "killed"
    assert last_complete_checkpoint(killed).name == "checkpoint-3"
    # a checkpoint torn by a kill during writing is skipped, not loaded
    torn = killed / "checkpoint-4"
    shutil.copytree(killed / "checkpoint-3", torn)
    (torn / "trainer_state.json").write_text('{"global_step": 4, "log_hi')
    assert last_complete_checkpoint(killed).name == "checkpoint-3"
    shutil.rmtree(torn)
    assert _run(corpus_dir, killed, resume=True) == 0
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(killed / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key


_DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from accelerate import Accelerator
    from vaswani import VaswaniConfig, VaswaniForConditionalGeneration
    from vaswani.training.loss import label_smoothed_cross_entropy
    from vaswani.training.schedule import get_noam_schedule, paper_adam
    from vaswani.training.trainer import fsdp_on_cpu_processes

    fsdp_on_cpu_processes(cpu=True)  # under an FSDP config: shard over gloo instead of running DDP
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    config = VaswaniConfig(vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, dropout=0.0)
    model = VaswaniForConditionalGeneration(config)
    optimizer = paper_adam(model.parameters())
    schedule = get_noam_schedule(optimizer, config.d_model, warmup_steps=4)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        ids = torch.randint(4, 60, (8, 7), generator=generator)
        labels = torch.randint(4, 60, (8, 5), generator=generator)
        labels[::3, 3:] = -100  # uneven token counts per row
        total_tokens = (labels != -100).sum()
        rank, world = accelerator.process_index, accelerator.num_processes
        mine = slice(rank, None, world)  # this process's half of the batch
        logits = model(input_ids=ids[mine], labels=labels[mine], skip_logits=False).logits
        # normalise by the whole batch's tokens; DDP averages gradients, so scale by the world size
        loss = label_smoothed_cross_entropy(logits, labels[mine], 0.1, num_items_in_batch=total_tokens) * world
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    assert accelerator.num_processes == 1 or accelerator.distributed_type.value == sys.argv[2]
    params = accelerator.get_state_dict(model)  # gathered from the shards under FSDP
    if accelerator.is_main_process:
        torch.save(params, sys.argv[1])
""")


def _accelerate(num_processes: int, args: list[str], tmp_path: Path, config: str = "ddp-cpu.yaml"
                ) -> subprocess.CompletedProcess:
    """``accelerate launch`` of CPU processes with a shipped config from configs/accelerate/."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO_ROOT / "configs" / "accelerate" / config), "--num_processes", str(num_processes),
                "--main_process_port", "29517"]
    return subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.mark.parametrize(("config", "engine"), [("ddp-cpu.yaml", "MULTI_CPU"), ("fsdp2-cpu.yaml", "FSDP")])
def test_two_processes_with_half_batches_equal_one_process(tmp_path, config, engine):
    script = tmp_path / "ddp_step.py"
    script.write_text(_DDP_SCRIPT)
    for n in (1, 2):
        result = _accelerate(n, [str(script), str(tmp_path / f"params{n}.pt"), engine], tmp_path, config)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"params{n}.pt", weights_only=True) for n in (1, 2))
    for key in one:
        if key.endswith("k_proj.bias"):
            # softmax ignores a shift shared by all keys, so this gradient is exactly 0 in real arithmetic;
            # Adam divides its rounding noise by its own size and turns it into full-size random steps
            continue
        assert (one[key] - two[key]).abs().max() < 1e-5, key


def test_vaswani_train_under_accelerate_launch_two_processes(corpus_dir, tmp_path):
    args = [
        "-m",
        "vaswani",
        "train",
        "--source",
        str(corpus_dir / "train.en"),
        "--target",
        str(corpus_dir / "train.de"),
        "--output",
        str(tmp_path / "ddp"),
        "--preset",
        "tiny",
        "--set",
        "d_model=32",
        "encoder_layers=1",
        "decoder_layers=1",
        "encoder_ffn_dim=64",
        "decoder_ffn_dim=64",
        "--vocab-size",
        "300",
        "--max-tokens",
        "300",
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--eval-steps",
        "4",
        "--valid-source",
        str(corpus_dir / "validation.en"),
        "--valid-target",
        str(corpus_dir / "validation.de"),
        "--eval-max-sentences",
        "8",
        "--eval-beams",
        "1",
        "--average-last",
        "2",
        "--report-to",
        "none",
        "--no-progress",
    ]
    result = _accelerate(2, args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "ddp" / "vaswani_run.json").read_text())
    assert run["result"]["world_size"] == 2
    # the final validation of the averaged model ran on both processes (it gathers their predictions)
    assert len(run["result"]["averaged_checkpoints"]) == 2 and "eval_bleu" in run["result"]["eval_metrics"]
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ddp").config.d_model == 32


def test_bad_input_under_two_processes_is_one_line_from_each(corpus_dir, tmp_path):
    """The main process refuses the vocabulary; the other, waiting for its tokenizer, says the group stopped."""
    args = ["-m", "vaswani", "train", "--source", str(corpus_dir / "train.en"), "--target",
            str(corpus_dir / "train.de"), "--output", str(tmp_path / "run"), "--vocab-size", "200", "--max-steps", "2"]
    result = _accelerate(2, args, tmp_path)
    assert result.returncode != 0
    assert "vocab_size 200 is smaller than the alphabet" in result.stderr
    assert "a process of the training group stopped" in result.stderr
    # no process's traceback (the launcher's own report of the failed processes stays)
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr


def test_bf16_mixed_precision_on_cpu(corpus_dir, tmp_path):
    result = train(settings_for(corpus_dir, tmp_path / "bf16", bf16=True, max_steps=2, save_steps=2))
    assert result.steps == 2 and result.final_loss is not None and result.final_loss == result.final_loss


def test_demo_runs_end_to_end(tmp_path, capsys):
    from vaswani.demo.run import print_demo, run_demo

    result = run_demo(
        tmp_path / "demo", minutes=2, max_steps=3, train_pairs=200, validation_pairs=8, test_pairs=10, progress=False
    )
    assert result.steps == 3 and result.test_sentences == 10 and 0.0 <= result.exact_match <= 1.0
    assert (result.model_dir / "training_curves.png").exists() and (tmp_path / "demo" / "data" / "test.de").exists()
    assert set(result.validation_exact_match) == {1, 4, 8} and result.num_beams in (1, 4, 8)
    assert result.validation_exact_match[result.num_beams] == max(result.validation_exact_match.values())
    assert set(result.test_by_digits) == {3, 4, 5, 6} and 0.0 <= result.typed_exact_match <= 1.0
    assert [source for source, _, _ in result.examples[:2]] == ["forty-two", "three hundred forty-two"]
    print_demo(result)
    out = capsys.readouterr().out
    assert "exact match on 10 held-out numbers" in out and "beam size chosen on the validation numbers" in out


def test_choose_num_beams_takes_the_best_and_the_smaller_on_ties(monkeypatch):
    from vaswani.demo import run as demo

    pairs = [("one", "eins"), ("two", "zwei")]
    outputs = {1: ["eins", "x"], 4: ["eins", "zwei"], 8: ["eins", "zwei"]}
    monkeypatch.setattr(demo, "translate_lines", lambda model_dir, sources, num_beams: outputs[num_beams])
    assert demo.choose_num_beams(Path("unused"), pairs) == (4, {1: 0.5, 4: 1.0, 8: 1.0})
    outputs[8] = ["x", "x"]
    outputs[4] = ["x", "zwei"]
    assert demo.choose_num_beams(Path("unused"), pairs) == (1, {1: 0.5, 4: 0.5, 8: 0.0})
