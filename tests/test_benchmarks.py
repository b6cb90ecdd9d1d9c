"""The benchmark scripts that hook into the decoding code by name still find what they hook: run on a tiny saved
model (the numbers themselves are not checked; timing belongs to benchmarks/, not tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FIXTURES
from translation_helpers import make_model_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("layers", ["fused", "layer by layer"])
def test_decode_profile_times_every_part(tmp_path, layers):
    folder = make_model_folder(tmp_path / "model")
    command = [sys.executable, str(ROOT / "benchmarks" / "decode_profile.py"), str(folder), "--source",
               str(FIXTURES / "pairs.en"), "--limit", "6", "--threads", "1", "--repeats", "1"]
    if layers == "layer by layer":
        command.append("--layer-by-layer")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    assert "| encoder |" in table and "| log-softmax and each row's best tokens |" in table
    assert "**sentences/s**" in table
    from vaswani.cpu_linears import can_prepack

    if layers == "fused" and can_prepack():
        assert "FusedDecoderLayer" in table and "| decoder layers: attention (Eq. 1) |" in table


def test_cuda_check_runs_every_check_on_the_cpu(tmp_path):
    """benchmarks/cuda_check.py, for a session with a GPU, tried where there is none (``--device cpu``)."""
    import gzip

    folder = make_model_folder(tmp_path / "model")
    data = tmp_path / "multi30k"
    data.mkdir()
    for split in ("val", "test_2016_flickr"):
        for lang in ("en", "de"):
            lines = (FIXTURES / f"pairs.{lang}").read_bytes()
            (data / f"{split}.{lang}.gz").write_bytes(gzip.compress(lines))
    command = [sys.executable, str(ROOT / "benchmarks" / "cuda_check.py"), str(folder), "--data", str(data),
               "--device", "cpu", "--limit", "4", "--test-limit", "6", "--batch", "2", "--preset", "tiny"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout
    for row in ("| cpu vs CPU, `translate`, beam 4 |", "| stock `generate` vs `translate`, beam 4 |",
                "| cached vs uncached, beam 4 |", "| eager vs sdpa, beam 4 |", "| bfloat16 vs float32, `translate`",
                "`pipeline(\"translation\")` vs `translate`", "| `translate`, 2,048 tokens a batch | float32 |",
                "| sdpa | bfloat16 | loss "):
        assert row in report, row
    # a greedy search never depends on the batch it runs in, nor on the cache
    assert "| a padded batch of 64 vs one sentence at a time, greedy | 14/14 lines identical |" in report
    assert "| cached vs uncached, greedy | 14/14 lines identical |" in report
