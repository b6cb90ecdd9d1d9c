import atexit
import os
import shutil
import tempfile

import pytest
import torch
from helpers import tiny_model  # the shared builders; tests import them from helpers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Models leave glibc's allocator and denormals as they are here, whatever a test trains first (test_perf checks
# that they tune them where this is unset).
os.environ["VASWANI_TUNE_CPU"] = "0"
torch.set_num_threads(2)
# vaswani.kernels compiles into a cache of this session's own (the compiler runs in every test session).
os.environ["VASWANI_CACHE"] = tempfile.mkdtemp(prefix="vaswani-tests-")
atexit.register(shutil.rmtree, os.environ["VASWANI_CACHE"], True)


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def set_products_backend(monkeypatch):
    """A function that sets ``VASWANI_CPU_PRODUCTS`` (a backend of vaswani.cpu_linears, or a bad value) for this
    test and has the backend chosen again from it; after the test, it is chosen again from the restored one."""
    from vaswani.cpu_linears import product_backend

    def set_backend(name: str) -> None:
        monkeypatch.setenv("VASWANI_CPU_PRODUCTS", name)
        product_backend.cache_clear()

    yield set_backend
    product_backend.cache_clear()


@pytest.fixture(params=["onednn", "mkl"])
def products_backend(request, set_products_backend):
    """Each test using it runs once with each backend of the float32 CPU products (vaswani.cpu_linears)."""
    if request.param == "mkl" and not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL")
    set_products_backend(request.param)
    return request.param
