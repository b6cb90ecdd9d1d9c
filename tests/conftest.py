import os

import pytest
import torch
from helpers import tiny_model  # the shared builders; tests import them from helpers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture
def model():
    return tiny_model()
