"""Test setup: invariant checks on, interpreter on CPU-only machines, GPU tests skipped
(with the reason shown) where there is no GPU."""

import os
import tempfile

os.environ.setdefault("MKCOMPILER_DEBUG", "1")  # every pass runs its invariant check
# Compile cache (mkcompiler/tools/cache.py) and generated kernels in a directory of this test session:
# tests never read entries an earlier run (or other code) left behind.
os.environ.setdefault("MKCOMPILER_CACHE", tempfile.mkdtemp(prefix="mkcompiler-tests-"))

import pytest  # noqa: E402
import torch  # noqa: E402

import mkcompiler  # noqa: E402,F401  (chooses the Triton interpreter when there is no GPU)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu` on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where compiled models live: the GPU when kernels run natively, else the CPU (interpreter)."""
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def on_device(device):
    """Seeded, and every tensor made where kernels run (the CPU under the interpreter)."""
    torch.manual_seed(0)
    if device == "cpu":
        yield
        return
    torch.set_default_device(device)
    yield
    torch.set_default_device(None)
