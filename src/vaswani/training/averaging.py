"""Checkpoint averaging (Vaswani et al. 2017, §6.1: the last 5 checkpoints for base, the last 20 for big).

Works on Hugging Face model folders such as the Trainer's ``checkpoint-<step>`` folders. Weights are read
and written with ``safetensors.torch`` only (nothing is unpickled).
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


def _numbered_checkpoints(run_dir: Path) -> list[Path]:
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
    checkpoints = _numbered_checkpoints(run_dir)
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

    Each path is either a checkpoint (a folder with ``model.safetensors``) or a run directory, which stands
    for its ``checkpoint-<step>`` folders in step order. Order is kept, so the newest checkpoint comes last.
    """
    checkpoints: list[Path] = []
    for path in map(Path, paths):
        if (path / WEIGHTS_NAME).is_file():
            checkpoints.append(path)
            continue
        numbered = _numbered_checkpoints(path)
        if not numbered:
            raise FileNotFoundError(
                f"{path} is neither a checkpoint (no {WEIGHTS_NAME}) nor a run directory (no checkpoint-<step> folders)"
            )
        checkpoints.extend(numbered)
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


def average_checkpoints(paths: Sequence[Path | str], output: Path | str, overwrite: bool = False) -> Path:
    """Average the ``model.safetensors`` weights of checkpoint folders into the model folder ``output``.

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
