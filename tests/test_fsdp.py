"""FSDP2: the model sharded by torch's ``fully_shard`` (one unit per encoder/decoder layer, as the shipped accelerate
config asks) over gloo trains to the same parameters as one process with the whole batch, and resumes from a
sharded checkpoint; and an FSDP config that accelerate would quietly run as DDP on CPUs is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT

from vaswani.demo.numbers import make_number_corpus, write_parallel_corpus

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


def _close(one: dict, two: dict) -> None:
    assert one.keys() == two.keys()
    for key in one:
        if key.endswith("k_proj.bias"):
            # softmax ignores a shift shared by all keys, so this gradient is exactly 0 in real arithmetic; Adam
            # divides its rounding noise by its own size and turns it into full-size random steps
            continue
        assert (one[key] - two[key]).abs().max() < 1e-5, key


def test_fsdp2_with_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    _close(_torchrun(1, tmp_path / "one"), _torchrun(2, tmp_path / "two"))


def test_fsdp2_resumes_from_a_sharded_checkpoint(tmp_path):
    straight = _torchrun(2, tmp_path / "run")
    assert (tmp_path / "run" / "sharded" / ".metadata").is_file()
    _close(straight, _torchrun(2, tmp_path / "run", load=True))


def test_an_fsdp_config_on_cpus_is_refused_not_run_as_ddp(tmp_path):
    corpus = tmp_path / "numbers"
    write_parallel_corpus(make_number_corpus(40, 4, 4, seed=1, max_value=99), corpus)
    config = tmp_path / "fsdp-on-cpu.yaml"
    config.write_text((REPO_ROOT / "configs" / "accelerate" / "fsdp2.yaml").read_text().replace(
        "num_processes: 8", "num_processes: 2\nuse_cpu: true").replace("mixed_precision: bf16", 'mixed_precision: "no"')
        .replace("main_process_port: 29500", "main_process_port: 29553"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "vaswani",
               "train", "--source", str(corpus / "train.en"), "--target", str(corpus / "train.de"), "--output",
               str(tmp_path / "run"), "--max-steps", "1", "--preset", "tiny"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode != 0
    assert "accelerate runs FSDP on GPUs" in result.stderr and "ddp-cpu.yaml" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["ddp-cpu.yaml", "fsdp2.yaml", "deepspeed-zero2.yaml"])
def test_shipped_launch_configs_are_accelerate_configs(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO_ROOT / "configs" / "accelerate" / name))
    assert config.num_machines == 1 and config.num_processes >= 2


@pytest.mark.parametrize(
    ("variable", "engine"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")]
)
def test_sharding_engines_accelerate_runs_only_on_accelerators_are_refused_on_cpus(monkeypatch, variable, engine):
    from accelerate import PartialState

    from vaswani.training.run import check_engine_is_honoured

    check_engine_is_honoured(PartialState(cpu=True))
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ValueError, match=f"accelerate runs {engine} on GPUs"):
        check_engine_is_honoured(PartialState(cpu=True))


def test_checkpoints_of_fsdp_and_deepspeed_runs_count_as_complete(tmp_path):
    """--resume finds the checkpoints the Trainer writes under FSDP (full or sharded state dicts) and DeepSpeed,
    and still skips one torn while a shard was being written."""
    import json

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
