"""The interpreter speed-up patch (mkcompiler/backends/triton/interp_patches.py): same results, language restored."""

import os

import pytest
import torch
import triton
import triton.language as tl

from mkcompiler.backends.triton import interp_patches

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")


@triton.jit
def _scale(x, s):
    return x * s


@triton.jit
def _nested(x, s):
    return _scale(x, s) + 1.0


@triton.jit
def _kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + o, _nested(tl.load(x_ptr + o), 3.0))


def test_installed_on_36_and_results_unchanged():
    assert interp_patches.install() == triton.__version__.startswith("3.6")
    load_before, core_load_before = tl.load, tl.core.load
    x = torch.randn(64)
    y = torch.full_like(x, float("nan"))
    _kernel[(4,)](x, y, BLOCK=16)
    assert torch.allclose(y, x * 3 + 1)
    # The launch patched triton.language and put every attribute back afterwards.
    assert tl.load is load_before and tl.core.load is core_load_before
