"""FSDP2: the model sharded by torch's ``fully_shard`` (one unit per encoder/decoder layer, as the shipped accelerate
config asks) over gloo trains to the same parameters as one process with the whole batch, and resumes from a
sharded checkpoint; and an FSDP config that accelerate would quietly run as DDP on CPUs is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import KILLABLE_TRAIN, REPO_ROOT
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM

from vaswani.demo.numbers import make_number_corpus, write_parallel_corpus
from vaswani.training.trainer import last_complete_checkpoint

CONFIGS = REPO_ROOT / "configs" / "accelerate"

_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard
    from vaswani import VaswaniConfig, VaswaniForConditionalGeneration
    from vaswani.modeling import DecoderLayer, EncoderLayer
    from vaswani.training.loss import label_smoothed_cross_entropy
    from vaswani.training.schedule import paper_adam

    out, steps, save_at, load = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "load"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = VaswaniConfig(vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, dropout=0.0)
    model = VaswaniForConditionalGeneration(config)
    for module in model.modules():
        if isinstance(module, (EncoderLayer, DecoderLayer)):
            fully_shard(module)
    fully_shard(model)
    optimizer = paper_adam(model.parameters(), lr=1e-3)
    first = 0
    if load:  # a sharded checkpoint: each process reads its own shard
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=out + "/sharded")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        first = save_at
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        ids = torch.randint(4, 60, (8, 7), generator=generator)
        labels = torch.randint(4, 60, (8, 5), generator=generator)
        labels[::3, 3:] = -100  # uneven token counts per row
        if step < first:
            continue
        mine = slice(rank, None, world)  # this process's share of the batch
        logits = model(input_ids=ids[mine], labels=labels[mine], skip_logits=False).logits
        total = (labels != -100).sum()
        # normalised by the whole batch's tokens; FSDP averages gradients over processes, so scale by their number
        loss = label_smoothed_cross_entropy(logits, labels[mine], 0.1, num_items_in_batch=total) * world
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step + 1 == save_at and not load:
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=out + "/sharded")
    full = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))[0]
    if rank == 0:
        torch.save(full, out + "/params.pt")
    dist.barrier()  # no process tears gloo down while another still uses it (a rare abort at exit otherwise)
    dist.destroy_process_group()
""")


def _torchrun(processes: int, out: Path, steps: int = 4, save_at: int = 2, load: bool = False) -> dict:
    out.mkdir(exist_ok=True)
    script = out.parent / "fsdp_step.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
               "29551", str(script), str(out), str(steps), str(save_at), "load" if load else "save"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "params.pt", weights_only=True)


def _close(one: dict, two: dict, atol: float = 1e-5) -> None:
    assert one.keys() == two.keys()
    for key in one:
        if key.endswith("k_proj.bias"):
            # softmax ignores a shift shared by all keys, so this gradient is exactly 0 in real arithmetic; Adam
            # divides its rounding noise by its own size and turns it into full-size random steps
            continue
        assert (one[key] - two[key]).abs().max() < atol, key


def test_fsdp2_with_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    _close(_torchrun(1, tmp_path / "one"), _torchrun(2, tmp_path / "two"))


def test_fsdp2_resumes_from_a_sharded_checkpoint(tmp_path):
    straight = _torchrun(2, tmp_path / "run")
    assert (tmp_path / "run" / "sharded" / ".metadata").is_file()
    _close(straight, _torchrun(2, tmp_path / "run", load=True))


# ---- vaswani train under accelerate's FSDP on CPU processes ----

_TRAIN = ["train", "--preset", "tiny", "--set", "d_model=32", "encoder_layers=2", "decoder_layers=2",
          "encoder_ffn_dim=64", "decoder_ffn_dim=64", "dropout=0.1", "--vocab-size", "300", "--max-tokens", "200",
          "--warmup-steps", "4", "--max-steps", "6", "--save-steps", "2", "--no-progress", "--report-to", "none"]


def _launch(config: Path, corpus: Path, out: Path, port: int, *extra: str,
            kill_at: int = 0, kill_when: str = "step_end") -> subprocess.CompletedProcess:
    """``vaswani train`` launched with an accelerate config file; with ``kill_at``, process 1 is SIGKILLed at the
    end of that update (``kill_when="save"``: once its checkpoint is saved)."""
    script = out.parent / "killable_train.py"
    script.write_text(KILLABLE_TRAIN)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(port), str(script), *_TRAIN, "--source", str(corpus / "train.en"),
               "--target", str(corpus / "train.de"), "--output", str(out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "KILL_AT": str(kill_at), "KILL_RANK": "1",
           "KILL_WHEN": kill_when}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=out.parent)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, dict]:
    """The number corpus and the parameters 2 DDP processes train on it (the shipped ddp-cpu.yaml)."""
    folder = tmp_path_factory.mktemp("fsdp")
    corpus = folder / "numbers"
    write_parallel_corpus(make_number_corpus(200, 4, 4, seed=1, max_value=999), corpus)
    result = _launch(CONFIGS / "ddp-cpu.yaml", corpus, folder / "ddp", 29555)
    assert result.returncode == 0, result.stderr[-3000:]
    return corpus, load_file(folder / "ddp" / "model.safetensors")


@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_fsdp_on_cpus_trains_like_ddp_and_a_killed_run_resumes(ddp_run, tmp_path, state_dict_type):
    """The shipped fsdp2-cpu.yaml (and its FULL_STATE_DICT variant) through the Trainer: a run whose process 1 is
    killed after checkpoint-2 resumes, and ends at DDP's parameters (the same batches and dropout draws)."""
    corpus, ddp = ddp_run
    config = tmp_path / "fsdp.yaml"
    config.write_text((CONFIGS / "fsdp2-cpu.yaml").read_text().replace("SHARDED_STATE_DICT", state_dict_type))
    out = tmp_path / "run"
    killed = _launch(config, corpus, out, 29557, kill_at=3)
    assert killed.returncode != 0
    ours = [line for line in killed.stderr.splitlines() if line.startswith("vaswani train: ")]
    assert ours and "checkpoint-2" in ours[0], killed.stderr[-3000:]
    checkpoint = out / "checkpoint-2"
    assert last_complete_checkpoint(out) == checkpoint
    assert (checkpoint / "config.json").is_file()  # --resume compares the model config with it
    if state_dict_type == "SHARDED_STATE_DICT":  # each process's shard, no whole model
        assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file()
        assert not (checkpoint / "model.safetensors").exists()
    else:
        assert (checkpoint / "model.safetensors").is_file()

    resumed = _launch(config, corpus, out, 29557, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "returned a view tensor" not in resumed.stderr  # FSDP2's warning about outputs it cannot hook
    assert json.loads((out / "vaswani_run.json").read_text())["result"]["steps"] == 6
    # the same names (the tied embeddings once, as without FSDP) and values: Adam divides each gradient by its
    # running size, so where a gradient is near 0 the rounding of FSDP's reduce-scatter against DDP's all-reduce
    # becomes a visible step; a wrong batch, scale or update would move parameters by about the learning rate (1e-2)
    _close(ddp, load_file(out / "model.safetensors"), atol=1e-4)
    # a normal model folder: its own code and class, not torch's FSDP wrapper
    saved = json.loads((out / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling.VaswaniForConditionalGeneration"
    assert saved["architectures"] == ["VaswaniForConditionalGeneration"]
    assert not list(out.glob("_fsdp*.py"))
    assert AutoModelForSeq2SeqLM.from_pretrained(out).config.encoder_layers == 2


def test_deepspeed_zero2_on_cpus_trains_like_ddp_and_a_killed_run_resumes(ddp_run, tmp_path):
    """The shipped deepspeed-zero2-cpu.yaml (DeepSpeed's CPU accelerator over gloo): process 1 killed after
    checkpoint-2, resumed, ends at DDP's parameters (ZeRO-2 sums the same gradients and runs the same Adam)."""
    pytest.importorskip("deepspeed")
    corpus, ddp = ddp_run
    out = tmp_path / "run"
    killed = _launch(CONFIGS / "deepspeed-zero2-cpu.yaml", corpus, out, 29561, kill_at=3)
    assert killed.returncode != 0 and last_complete_checkpoint(out).name == "checkpoint-2", killed.stderr[-3000:]
    assert (out / "checkpoint-2" / "latest").is_file()  # DeepSpeed's own checkpoint, optimizer state sharded
    assert len(list((out / "checkpoint-2").glob("global_step2/zero_pp_rank_*_optim_states.pt"))) == 2
    resumed = _launch(CONFIGS / "deepspeed-zero2-cpu.yaml", corpus, out, 29561, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _close(ddp, load_file(out / "model.safetensors"))


def test_a_sharded_run_killed_after_its_last_checkpoint_gathers_its_model_on_resume(ddp_run, tmp_path):
    """The last checkpoint holds only shards: --resume takes no further update and gathers the model from them."""
    corpus, ddp = ddp_run
    out = tmp_path / "run"
    killed = _launch(CONFIGS / "fsdp2-cpu.yaml", corpus, out, 29559, "--max-steps", "4", kill_at=4,
                     kill_when="save")
    assert killed.returncode != 0 and last_complete_checkpoint(out).name == "checkpoint-4"
    assert not (out / "model.safetensors").exists()
    resumed = _launch(CONFIGS / "fsdp2-cpu.yaml", corpus, out, 29559, "--max-steps", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_file(out / "model.safetensors").keys() == ddp.keys()


@pytest.mark.parametrize(
    "name", ["ddp-cpu.yaml", "fsdp2-cpu.yaml", "fsdp2.yaml", "deepspeed-zero2-cpu.yaml", "deepspeed-zero2.yaml"]
)
def test_shipped_launch_configs_are_accelerate_configs(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert config.num_machines == 1 and config.num_processes >= 2


def test_deepspeed_told_it_runs_on_cpus_is_refused(monkeypatch):
    """accelerate would quietly run a DeepSpeed config with use_cpu as DDP; without use_cpu, and for FSDP, the
    engine runs."""
    from vaswani.training.run import check_engine_is_honoured

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    check_engine_is_honoured()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="accelerate then trains with DDP.*deepspeed-zero2-cpu.yaml"):
        check_engine_is_honoured()
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    check_engine_is_honoured()


@pytest.mark.parametrize(
    ("variable", "engine"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")]
)
def test_checkpoint_averaging_is_refused_under_sharding_engines(monkeypatch, tmp_path, variable, engine):
    from vaswani.training.run import TrainSettings, check_sharded_run, recipe_arguments

    settings = TrainSettings(args=recipe_arguments(tmp_path), train_corpus={"source": "a", "target": "b"},
                             average_last=2)
    check_sharded_run(settings)
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ValueError, match=f"not supported under {engine}"):
        check_sharded_run(settings)


def test_checkpoints_of_fsdp_and_deepspeed_runs_count_as_complete(tmp_path):
    """--resume finds the checkpoints the Trainer writes under FSDP (full or sharded state dicts) and DeepSpeed,
    and still skips one torn while a shard was being written."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from vaswani.training.trainer import is_complete_checkpoint

    def checkpoint(name: str, files: dict[str, bytes], sharded: tuple[str, ...] = ()) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        torch.save({}, folder / "scheduler.pt")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
        for file, data in files.items():
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            (folder / file).write_bytes(data)
        for shard in sharded:  # a torch.distributed.checkpoint folder, as accelerate's save_fsdp_* write
            dcp.save({"weight": torch.ones(3)}, checkpoint_id=str(folder / shard))
        return folder

    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2)}, weights)
    full = checkpoint("full", {"model.safetensors": weights.read_bytes(), "optimizer.bin": b"state"})
    sharded = checkpoint("sharded", {}, ("pytorch_model_fsdp_0", "optimizer_0"))
    deepspeed = checkpoint("deepspeed", {"model.safetensors": weights.read_bytes(), "latest": b"global_step2"})
    assert all(is_complete_checkpoint(folder) for folder in (full, sharded, deepspeed))
    (sharded / "optimizer_0" / ".metadata").unlink()  # killed before every shard was written
    assert not is_complete_checkpoint(sharded)
