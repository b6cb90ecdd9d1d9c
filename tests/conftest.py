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


@pytest.fixture(params=["onednn", "mkl"])
def products_backend(request, monkeypatch):
    """Each test using it runs once with each backend of the float32 CPU products (vaswani.cpu_linears)."""
    from vaswani.cpu_linears import product_backend

    if request.param == "mkl" and not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL")
    monkeypatch.setenv("VASWANI_CPU_PRODUCTS", request.param)
    product_backend.cache_clear()
    yield request.param
    product_backend.cache_clear()  # the next call measures (or reads the environment) again
