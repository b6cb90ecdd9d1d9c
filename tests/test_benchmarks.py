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
