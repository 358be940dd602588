"""Fixtures of the CPU and GPU tests (the session setup is the repository's conftest.py)."""

import os

import pytest
import torch


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
