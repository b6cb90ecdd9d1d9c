"""Checkpoint averaging (Vaswani et al. 2017, §6.1: the last 5 checkpoints for base, the last 20 for big).

Works on Hugging Face model folders such as the Trainer's ``checkpoint-<step>`` folders. Weights are read
and written with ``safetensors.torch`` only (nothing is unpickled). Averaging only means something along one
run's trajectory: ``vaswani train`` records its run id in every checkpoint (:class:`RunIdentity`), and
checkpoints of different runs are refused unless forced.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

WEIGHTS_NAME = "model.safetensors"
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
# Files of a checkpoint folder that are not copied to the averaged model: weights and Trainer state.
_SKIP_PATTERNS = (
    "model*.safetensors*",
    "pytorch_model*.bin*",
    "optimizer.*",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    "training_args.bin",
)


class RunIdentity(TrainerCallback, ExportableState):
    """Writes the run's id into each checkpoint's ``trainer_state.json`` (its ``stateful_callbacks``)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def state(self) -> dict:  # noqa: D102
        return {"args": {"run_id": self.run_id}, "attributes": {}}


def run_of(checkpoint: Path) -> str:
    """The run a checkpoint belongs to: the id :class:`RunIdentity` recorded, else the folder holding it."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        run_id = state["stateful_callbacks"][RunIdentity.__name__]["args"]["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return str(checkpoint.resolve().parent)
    return str(run_id)


def numbered_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` folders of ``run_dir``, sorted by step (numerically)."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist or is not a directory")
    found = []
    for path in run_dir.iterdir():
        match = _CHECKPOINT_RE.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_last_checkpoints(run_dir: Path, n: int) -> list[Path]:
    """The last ``n`` ``checkpoint-<step>`` folders of a Trainer run, oldest first (sorted by step)."""
    if n < 1:
        raise ValueError(f"the number of checkpoints to average must be >= 1, got {n}")
    run_dir = Path(run_dir)
    checkpoints = numbered_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(
            f"no checkpoint-<step> folders in {run_dir}; point at a Trainer output_dir that saved checkpoints"
        )
    if len(checkpoints) < n:
        raise ValueError(
            f"asked for the last {n} checkpoints but {run_dir} has only {len(checkpoints)} "
            f"({', '.join(p.name for p in checkpoints)}); lower --last or keep more checkpoints "
            "(TrainingArguments.save_total_limit)"
        )
    return checkpoints[-n:]


def collect_checkpoints(paths: Sequence[Path | str], last: int | None = None) -> list[Path]:
    """Checkpoint folders named by ``paths``, then only the last ``last`` of them (all when ``None``).

    Each path is either a run directory, which stands for its ``checkpoint-<step>`` folders in step order
    (a finished ``vaswani train`` folder also holds the final ``model.safetensors``: the checkpoints are
    meant), or a checkpoint (a folder with ``model.safetensors``). Order is kept, so the newest comes last.
    """
    checkpoints: list[Path] = []
    for path in map(Path, paths):
        numbered = numbered_checkpoints(path) if path.is_dir() else []
        if not numbered and not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{path} is neither a checkpoint (no {WEIGHTS_NAME}) nor a run directory (no checkpoint-<step> folders)"
            )
        checkpoints.extend(numbered or [path])
    if last is None:
        return checkpoints
    if last < 1:
        raise ValueError(f"--last must be >= 1, got {last}")
    if len(checkpoints) < last:
        raise ValueError(f"asked for the last {last} checkpoints but found only {len(checkpoints)}; lower --last")
    return checkpoints[-last:]


def _weights_file(checkpoint: Path) -> Path:
    weights = checkpoint / WEIGHTS_NAME
    if weights.is_file():
        return weights
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist")
    if (checkpoint / f"{WEIGHTS_NAME}.index.json").is_file():
        raise FileNotFoundError(
            f"{checkpoint} holds sharded weights; averaging needs a single {WEIGHTS_NAME} "
            "(save with a larger max_shard_size)"
        )
    raise FileNotFoundError(f"{checkpoint} has no {WEIGHTS_NAME}; is it a model folder saved by save_pretrained?")


def _check_same_layout(reference: dict[str, torch.Tensor], ref_file: Path, tensors: dict, file: Path) -> None:
    missing, extra = sorted(reference.keys() - tensors.keys()), sorted(tensors.keys() - reference.keys())
    if missing or extra:
        key, where = (missing[0], f"missing from {file}") if missing else (extra[0], f"only in {file}")
        raise ValueError(
            f"checkpoints do not hold the same tensors: {key!r} is {where} but compared with {ref_file} "
            f"({len(missing)} missing, {len(extra)} extra); average checkpoints of one model only"
        )
    for key, tensor in tensors.items():
        if tensor.shape != reference[key].shape:
            raise ValueError(
                f"tensor {key!r} has shape {tuple(tensor.shape)} in {file} but {tuple(reference[key].shape)} "
                f"in {ref_file}; average checkpoints of one model only"
            )


def _check_one_run(checkpoints: list[Path]) -> None:
    first_of_run: dict[str, Path] = {}
    for checkpoint in checkpoints:
        first_of_run.setdefault(run_of(checkpoint), checkpoint)
    if len(first_of_run) > 1:
        examples = ", ".join(str(p) for p in list(first_of_run.values())[:3])
        raise ValueError(
            f"the checkpoints come from {len(first_of_run)} different runs (e.g. {examples}); averaging mixes "
            "unrelated weights. Average the checkpoints of one run, or pass --force (force=True) if you mean it."
        )


def average_checkpoints(
    paths: Sequence[Path | str], output: Path | str, overwrite: bool = False, force: bool = False
) -> Path:
    """Average the ``model.safetensors`` weights of checkpoint folders into the model folder ``output``.

    The checkpoints must come from one run (:func:`run_of`) unless ``force``.

    Floating-point tensors are averaged in fp32 and cast back to their dtype in the last checkpoint;
    other tensors (integer buffers) are taken from the last checkpoint. Every other file of the last
    checkpoint (config, generation config, tokenizer, remote code) is copied; Trainer state is not.
    Returns ``output``.
    """
    checkpoints = [Path(p) for p in paths]
    if not checkpoints:
        raise ValueError("no checkpoints to average; pass checkpoint folders or a run directory")
    files = [_weights_file(p) for p in checkpoints]
    output = Path(output)
    if output.resolve() in {p.resolve() for p in checkpoints}:
        raise ValueError(f"output {output} is one of the checkpoints being averaged; choose a new folder")
    if (output / WEIGHTS_NAME).exists() and not overwrite:
        raise FileExistsError(f"{output / WEIGHTS_NAME} already exists; pass overwrite=True (--overwrite)")
    if not force:
        _check_one_run(checkpoints)

    reference: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    for file in files:
        tensors = load_file(file)
        if reference:
            _check_same_layout(reference, files[0], tensors, file)
        else:
            reference = tensors
        for key, tensor in tensors.items():
            if tensor.is_floating_point():
                if key in sums:
                    sums[key] += tensor.float()
                else:
                    sums[key] = tensor.float().clone()
    last = tensors  # the last checkpoint gives the dtypes and the non-floating-point tensors
    averaged = {
        key: (sums[key] / len(files)).to(tensor.dtype) if key in sums else tensor.contiguous()
        for key, tensor in last.items()
    }

    output.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "averaged_from": json.dumps([str(p) for p in checkpoints])}
    save_file(averaged, output / WEIGHTS_NAME, metadata=metadata)
    for item in checkpoints[-1].iterdir():
        if item.is_file() and not any(fnmatch.fnmatch(item.name, pattern) for pattern in _SKIP_PATTERNS):
            shutil.copy2(item, output / item.name)
    return output
