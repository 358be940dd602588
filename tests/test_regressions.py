"""Bugs the fuzzer (tests/test_fuzz.py) found, kept as explicit small models. Each runs in the
reference VM and in the interpreted kernel, poisoned, against a float64 eager run; the
docstring says what was wrong and where it was fixed.
"""

import pytest
import torch
from helpers import TOL, reference, rel_err

import mkcompiler
from mkcompiler.vm import run_megakernel

SMALL = dict(matmul_tile=(16, 16, 16), elementwise_block=16, row_block=1, row_chunk=16)


def check(model, inputs, tol=TOL[torch.float32], **options):
    """Compile; the VM and the kernel (each on poisoned buffers) both match eager in float64."""
    options = {**SMALL, **options}
    mk = mkcompiler.compile(model, inputs, **options)
    ref = reference(model, inputs)
    mk.poison()
    vm_out, _ = run_megakernel(mk, *inputs)
    assert rel_err(vm_out, ref) <= tol, "reference VM"
    mk.poison()
    assert rel_err(mk(*inputs), ref) <= tol, "kernel"


class AmaxNoKeepdim(torch.nn.Module):
    def forward(self, x):
        return torch.abs(torch.amax(x, -1))


class SumNoKeepdim(torch.nn.Module):
    def forward(self, x):
        return x.sum(-1) * 2.0


@pytest.mark.parametrize(
    "model, shape",
    [(AmaxNoKeepdim(), (2, 1)), (SumNoKeepdim(), (4, 8)), (SumNoKeepdim(), (2, 3, 5))],
    ids=["amax_2x1", "sum_4x8", "sum_2x3x5"],
)
def test_reduction_without_keepdim_waits_for_every_row(model, shape):
    """A reduction's output has one element per row, but its tiles declared writing
    `out.shape[-1]` elements per row (the whole output when keepdim=False): the consumer
    waited only for the first row tile and read unwritten (NaN) rows.
    Fixed in ops/reduce.py RowFamily.regions (an output holds numel / rows elements per row)."""
    check(model, (torch.randn(*shape),))


class AbsLinear(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.proj = torch.nn.Linear(n_in, n_out, bias=False)

    def forward(self, x):
        return self.proj(torch.abs(x))


@pytest.mark.parametrize(
    "n_in, n_out, rows", [(1, 1, 2), (1, 4, 3), (4, 1, 3)], ids=["column_in_and_out", "column_in", "column_out"]
)
def test_matmul_of_column_views(n_in, n_out, rows):
    """An [M, 1] operand or output has strides (1, 1): unit along its size-1 dim, so the kernel
    took the M stride (one element) as a multiple of 16 bytes (aligned_stride rounded it to 0)
    and every row read or wrote row 0. The VM was right; the kernel left rows unwritten.
    Fixed in ops/matmul.py Matmul.key (alignment flags check the stride the kernel relies on)."""
    torch.manual_seed(0)
    check(AbsLinear(n_in, n_out), (torch.randn(rows, n_in),))
