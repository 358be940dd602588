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
