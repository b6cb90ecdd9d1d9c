import os

import pytest
import torch
from helpers import tiny_model  # the shared builders; tests import them from helpers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Models leave glibc's allocator and denormals as they are here, whatever a test trains first (test_perf checks
# that they tune them where this is unset).
os.environ["VASWANI_TUNE_CPU"] = "0"
torch.set_num_threads(2)


@pytest.fixture
def model():
    return tiny_model()
