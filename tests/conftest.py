"""Shared pytest fixtures and markers."""
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread: small linear-algebra calls (eigh, Cholesky) slow
    down by 100x+ when two OpenMP threads compete on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# --------------------------------------------------------------------------- CUDA kernels
# Tests of the compiled CUDA kernels carry the `cuda` marker (``pytestmark = requires_cuda`` or
# ``@requires_cuda``); they are skipped, with the reason, when there is no CUDA device or the
# extension ostquant._C is not loaded (pure-Python install, CPU-only CI).

def cuda_kernels_unavailable():
    """Why the CUDA kernel tests cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    import ostquant.ops as ops
    if not ops.extension_loaded():
        return f"ostquant._C not loaded ({ops.extension_error()})"
    return None


requires_cuda = pytest.mark.cuda


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA device and the compiled ostquant._C extension")


def pytest_collection_modifyitems(config, items):
    if not any(item.get_closest_marker("cuda") for item in items):
        return
    why = cuda_kernels_unavailable()
    if why is None:
        return
    skip = pytest.mark.skip(reason=f"CUDA kernel test: {why}")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
