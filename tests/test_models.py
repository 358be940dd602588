"""Whole models through the compiler, in the interpreter and in the reference VM, against eager.

Models are small but every op has several tiles (OPTS), so the dependency DAG, the
counters and the schedule all matter: a missing edge or a wrong wait shows up as a poisoned
(NaN) or stale tile in the outputs.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, compile_and_check, reference, rel_err
from torch import nn

import mkcompiler
from mkcompiler.vm import run_megakernel

OPTS = dict(matmul_tile=(16, 16, 16), elementwise_block=128, row_block=4)
DTYPES = [torch.float32, torch.bfloat16]
B, S, D, HIDDEN = 2, 5, 40, 56  # B*S = 10 rows, D and HIDDEN not multiples of 16


class ResidualMLP(nn.Module):
    """x + act(W x + b), three times, then a projection."""

    def __init__(self, dim=D, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.head = nn.Linear(dim, 24)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            h = layer(x)
            x = x + (F.gelu(h) if i % 2 else torch.relu(h))
        return self.head(x)


class GatedMLPBlock(nn.Module):
    """Pre-norm transformer MLP: x + down(silu(gate(norm(x))) * up(norm(x)))."""

    def __init__(self, dim=D, hidden=HIDDEN):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        with torch.no_grad():
            self.norm.weight.copy_(torch.randn(dim))  # not all ones, so the weight is checked

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def transformer_mlp(layers=2):
    return nn.Sequential(*(GatedMLPBlock() for _ in range(layers)))


MODELS = {"residual_mlp": (ResidualMLP, (B * S, D)), "transformer_mlp": (transformer_mlp, (B, S, D))}


@pytest.fixture(autouse=True)
def _on_device(on_device):
    """Seeded, tensors made where kernels run (conftest.on_device)."""


def make(name, dtype):
    torch.manual_seed(0)
    ctor, shape = MODELS[name]
    return ctor().to(dtype).eval(), shape


def assert_close(out, ref, dtype):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MODELS)
def test_model_matches_eager(name, dtype):
    model, shape = make(name, dtype)
    mk, _ = compile_and_check(model, [torch.randn(shape, dtype=dtype)], dtype, **OPTS)
    assert len(mk.queue) > 20  # many tiles: the schedule is exercised, not one tile per op


@pytest.mark.parametrize("name", MODELS)
def test_repeated_calls_with_fresh_inputs(name):
    """Counters and the dynamic queue head keep growing between launches (targets are
    count x launch number): every call must still recompute every tile."""
    dtype = torch.float32
    model, shape = make(name, dtype)
    mk = mkcompiler.compile(model, (torch.randn(shape, dtype=dtype),), **OPTS)
    sizes = mk.dag.counter_sizes
    for call in (1, 2):
        x = torch.randn(shape, dtype=dtype)
        mk.poison()
        assert_close(mk(x), reference(model, [x]), dtype)
        assert mk.generation == call
        # Never reset: after n launches each counter holds n x (its group size).
        assert mk.counters.tolist()[: len(sizes)] == [call * s for s in sizes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MODELS)
def test_vm_matches_kernel(name, dtype):
    """The reference VM runs the same queue under random worker interleavings, fetching from
    the shared head (dynamic) or from per-worker lists (static): same answers as the kernel."""
    model, shape = make(name, dtype)
    x = torch.randn(shape, dtype=dtype)
    ref = reference(model, [x])
    # Dynamic fetch in the kernel: the interpreter runs programs one after another, so static
    # lists (which wait on other programs' work) can only run in the VM. The schedule makes
    # both the queue order and the per-worker lists.
    mk = mkcompiler.compile(model, (x,), num_workers=3, **OPTS)
    mk.poison()
    kernel_out = mk(x)
    assert_close(kernel_out, ref, dtype)
    orders = set()
    for dynamic in (True, False):
        for seed in range(3):
            mk.poison()
            out, run = run_megakernel(mk, x, seed=seed, dynamic=dynamic)
            assert sorted(run.executed) == list(range(len(mk.queue)))
            orders.add(tuple(run.executed))
            assert_close(out, ref, dtype)
            assert rel_err(out, kernel_out) <= TOL[dtype]
    assert len(orders) > 1  # the seeds really explored different interleavings
