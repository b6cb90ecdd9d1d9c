import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vaswani.cli import main
from vaswani.training.averaging import RunIdentity, average_checkpoints, collect_checkpoints, find_last_checkpoints


def _checkpoint(folder, value: float, dtype=torch.float32, **extra):
    folder.mkdir(parents=True)
    tensors = {
        "encoder.weight": torch.full((2, 3), value, dtype=dtype),
        "decoder.bias": torch.arange(4, dtype=dtype) * value,
        "step": torch.tensor([int(value)]),
        **extra,
    }
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"value": value}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "trainer_state.json").write_text("{}")
    (folder / "optimizer.pt").write_bytes(b"not copied")
    return folder


def _run(tmp_path, steps=(500, 1000, 1500, 2000, 10000)):
    run = tmp_path / "run"
    for i, step in enumerate(steps):
        _checkpoint(run / f"checkpoint-{step}", float(i + 1))
    (run / "checkpoint-notes").mkdir()
    return run


def test_find_last_checkpoints_sorts_numerically(tmp_path):
    run = _run(tmp_path)
    assert [p.name for p in find_last_checkpoints(run, 3)] == [
        "checkpoint-1500",
        "checkpoint-2000",
        "checkpoint-10000",
    ]
    with pytest.raises(ValueError, match="only 5"):
        find_last_checkpoints(run, 6)
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step> folders"):
        find_last_checkpoints(tmp_path, 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_last_checkpoints(tmp_path / "missing", 1)


def test_average_is_exact_and_copies_the_last_config(tmp_path):
    run = _run(tmp_path)
    out = average_checkpoints(find_last_checkpoints(run, 2), tmp_path / "avg")  # values 4.0 and 5.0
    averaged = load_file(out / "model.safetensors")
    torch.testing.assert_close(averaged["encoder.weight"], torch.full((2, 3), 4.5))
    torch.testing.assert_close(averaged["decoder.bias"], torch.arange(4.0) * 4.5)
    assert averaged["step"].tolist() == [5]  # integer tensors come from the last checkpoint
    assert json.loads((out / "config.json").read_text()) == {"value": 5.0}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"
        assert "checkpoint-10000" in f.metadata()["averaged_from"]


def test_average_in_fp32_and_keeps_dtype(tmp_path):
    folders = [
        _checkpoint(tmp_path / f"c{i}", v, dtype=torch.bfloat16) for i, v in enumerate((256.0, 1.0, 1.0))
    ]
    averaged = load_file(average_checkpoints(folders, tmp_path / "avg") / "model.safetensors")
    assert averaged["encoder.weight"].dtype == torch.bfloat16
    # fp32: (256 + 1 + 1) / 3 = 86, exact in bf16; a bf16 sum loses the ones (256 + 1 rounds to 256).
    assert torch.equal(averaged["encoder.weight"], torch.full((2, 3), 86.0, dtype=torch.bfloat16))
    bf16_sum = torch.tensor(256.0, dtype=torch.bfloat16) + 1 + 1
    assert bf16_sum / 3 != 86.0


def test_mismatched_checkpoints_are_named(tmp_path):
    a = _checkpoint(tmp_path / "a", 1.0)
    b = _checkpoint(tmp_path / "b", 2.0, extra=torch.zeros(1))
    with pytest.raises(ValueError, match=r"'extra' is only in .*b.model\.safetensors"):
        average_checkpoints([a, b], tmp_path / "avg")
    c = _checkpoint(tmp_path / "c", 2.0)
    save_file(
        {"encoder.weight": torch.zeros(3, 2), "decoder.bias": torch.zeros(4), "step": torch.tensor([1])},
        c / "model.safetensors",
    )
    with pytest.raises(ValueError, match=r"'encoder.weight' has shape \(3, 2\) in .*c.model\.safetensors"):
        average_checkpoints([a, c], tmp_path / "avg")


def test_missing_weights_and_bad_arguments(tmp_path):
    a = _checkpoint(tmp_path / "a", 1.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        average_checkpoints([a, empty], tmp_path / "avg")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        average_checkpoints([tmp_path / "nope"], tmp_path / "avg")
    with pytest.raises(ValueError, match="no checkpoints"):
        average_checkpoints([], tmp_path / "avg")
    with pytest.raises(ValueError, match="one of the checkpoints"):
        average_checkpoints([a], a)
    average_checkpoints([a], tmp_path / "avg")
    with pytest.raises(FileExistsError, match="overwrite"):
        average_checkpoints([a], tmp_path / "avg")
    average_checkpoints([a], tmp_path / "avg", overwrite=True)


def test_collect_checkpoints(tmp_path):
    run = _run(tmp_path)
    extra = _checkpoint(tmp_path / "extra", 9.0)
    assert [p.name for p in collect_checkpoints([run, extra], last=2)] == ["checkpoint-10000", "extra"]
    assert len(collect_checkpoints([run])) == 5
    with pytest.raises(ValueError, match="found only 1"):
        collect_checkpoints([extra], last=2)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        collect_checkpoints([tmp_path / "run" / "checkpoint-notes"])


def test_cli_average(tmp_path, capsys):
    run = _run(tmp_path)
    main(["average", str(run), "--last", "5", "--output", str(tmp_path / "avg")])
    assert "averaged 5 checkpoints" in capsys.readouterr().out
    torch.testing.assert_close(
        load_file(tmp_path / "avg" / "model.safetensors")["encoder.weight"], torch.full((2, 3), 3.0)
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["average", str(run), "--last", "9", "--output", str(tmp_path / "avg2")])
    assert exit_info.value.code == 2
    assert "lower --last" in capsys.readouterr().err


def _record_run(checkpoint, run_id: str) -> None:
    state = {"global_step": 1, "stateful_callbacks": {"RunIdentity": RunIdentity(run_id).state()}}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def test_a_finished_run_folder_stands_for_its_checkpoints(tmp_path, capsys):
    run = _run(tmp_path, steps=(100, 200, 300))
    save_file({"encoder.weight": torch.zeros(2, 3)}, run / "model.safetensors")  # the final model of `vaswani train`
    assert [p.name for p in collect_checkpoints([run], last=2)] == ["checkpoint-200", "checkpoint-300"]
    main(["average", str(run), "--output", str(tmp_path / "avg")])
    assert "averaged 3 checkpoints" in capsys.readouterr().out
    torch.testing.assert_close(
        load_file(tmp_path / "avg" / "model.safetensors")["encoder.weight"], torch.full((2, 3), 2.0)
    )


def test_checkpoints_of_different_runs_are_refused_unless_forced(tmp_path, capsys):
    a, b = _checkpoint(tmp_path / "a" / "checkpoint-10", 1.0), _checkpoint(tmp_path / "b" / "checkpoint-10", 3.0)
    with pytest.raises(ValueError, match="come from 2 different runs"):
        average_checkpoints([a, b], tmp_path / "avg")  # no run ids: told apart by their run folders
    _record_run(a, "run-1")
    _record_run(b, "run-2")
    with pytest.raises(SystemExit) as exit_info:
        main(["average", str(a), str(b), "--output", str(tmp_path / "avg")])
    assert exit_info.value.code == 2 and "--force" in capsys.readouterr().err
    main(["average", str(a), str(b), "--output", str(tmp_path / "avg"), "--force"])
    averaged = load_file(tmp_path / "avg" / "model.safetensors")
    torch.testing.assert_close(averaged["encoder.weight"], torch.full((2, 3), 2.0))
    _record_run(b, "run-1")  # the same run id: checkpoints of one run, wherever they were copied
    average_checkpoints([a, b], tmp_path / "avg2")
