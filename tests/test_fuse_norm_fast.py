"""passes/fuse_norm.py's two tile paths (ops/matmul.matmul_tile, Matmul.norm_in_loop): a tile that
sees all of K (decode, no split-K) sums its rows' statistics inside the K loop and normalises
acc at the end; a split-K tile (or a LayerNorm tile without spare A rows) sweeps K first. Both
against float64 eager and the reference VM, with random (never constant) inputs and norm
parameters."""

import os

import pytest
import torch
from mkcompiler.ops.registry import FAMILIES

import mkcompiler
from mkcompiler.tools.offline import compile_sm90, format_report
from mkcompiler.vm import run_megakernel
from tests.helpers import reference, rel_err

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
# VM (each op's torch reference, float64 inside) against the kernel: fp32 agrees to rounding;
# bf16 outputs may differ by one bf16 step where the two land on either side of a rounding edge.
VM_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


class NormLinear(torch.nn.Module):
    """h = norm(x); proj(h): the decode shape of a pre-norm projection."""

    def __init__(self, norm: str, dim: int, out: int, bias: bool = True, norm_bias: bool = True):
        super().__init__()
        if norm == "rms":
            self.norm = torch.nn.RMSNorm(dim, eps=1e-5)
        elif norm == "layer":
            self.norm = torch.nn.LayerNorm(dim, bias=norm_bias)
        else:  # LayerNorm without weight or bias
            self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.proj = torch.nn.Linear(dim, out, bias=bias)
        with torch.no_grad():
            if self.norm.weight is not None:
                self.norm.weight.uniform_(0.5, 1.5)
            if getattr(self.norm, "bias", None) is not None:
                self.norm.bias.normal_()
            if bias:
                self.proj.bias.normal_()

    def forward(self, x):
        return self.proj(self.norm(x))


def folded(mk):
    """The matmuls a norm was folded into, and whether each takes the one-pass path."""
    mms = [op for op in mk.graph.ops if op.kind == "matmul" and op.attrs.norm is not None]
    assert mms and all(op.kind == "matmul" for op in mms)
    assert "norm" not in [op.kind for op in mk.graph.ops]
    return [FAMILIES["matmul"].norm_in_loop(op) for op in mms]


def check(model, x, dtype, vm_tol=None, **options):
    """Compile with fuse_norm, run kernel and VM on poisoned intermediates, compare with float64
    eager and each other; returns the megakernel."""
    mk = mkcompiler.compile(model, (x,), fuse_norm=True, cache=False, **options)
    x = x + 0.5 * torch.randn_like(x)  # inputs other than the example ones
    want = reference(model, (x,))
    mk.poison()
    got = mk(x)
    assert rel_err(got, want) <= TOL[dtype], rel_err(got, want)
    mk.poison()
    vm, _ = run_megakernel(mk, x, seed=1)
    assert rel_err(vm, want) <= TOL[dtype], rel_err(vm, want)
    assert rel_err(vm, got) <= (vm_tol or VM_TOL[dtype]), rel_err(vm, got)  # the VM's references are the spec
    return mk


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("k", [64, 256, 200])  # 200: a K that is not a multiple of the K block
@pytest.mark.parametrize("bias", [False, True])
def test_rms_norm_in_loop(dtype, rows, k, bias):
    torch.manual_seed(k + rows)
    model = NormLinear("rms", k, 96, bias=bias).to(dtype)
    x = torch.randn(rows, 1, k, dtype=dtype)
    mk = check(model, x, dtype)
    assert folded(mk) == [True]
    assert ", True, 1, 1" in mk.source or ", True, 2, 1" in mk.source  # N_IN_LOOP, weight flags, no bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("norm,norm_bias", [("layer", True), ("layer", False), ("plain", False)])
def test_layer_norm_in_loop(dtype, rows, norm, norm_bias):
    torch.manual_seed(rows)
    model = NormLinear(norm, 192, 80, bias=True, norm_bias=norm_bias).to(dtype)
    x = (torch.randn(rows, 1, 192) + 0.3).to(dtype)  # a mean away from 0: the mean term matters
    assert folded(check(model, x, dtype)) == [True]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_split_k_sweeps_first(dtype, norm):
    """A split-K tile sees one K chunk: it keeps the statistics sweep."""
    torch.manual_seed(1)
    model = NormLinear(norm, 256, 64, bias=True).to(dtype)
    x = torch.randn(2, 256, dtype=dtype)
    mk = check(model, x, dtype, split_k=2, matmul_tile=(16, 32, 64))
    assert folded(mk) == [False]
    assert any(FAMILIES[op.kind].splits(op) == 2 for op in mk.graph.ops if op.kind == "matmul")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_without_spare_rows_sweeps_first(dtype):
    """16 rows fill the 16-row A block: no row left for g W, so LayerNorm sweeps first; RMSNorm
    (no g W needed) still takes the one-pass path."""
    torch.manual_seed(2)
    x = torch.randn(16, 128, dtype=dtype)
    assert folded(check(NormLinear("layer", 128, 48).to(dtype), x, dtype)) == [False]
    assert folded(check(NormLinear("rms", 128, 48).to(dtype), x, dtype)) == [True]


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_with_a_large_mean(dtype):
    """The one-pass LayerNorm rounds x * g before centring and takes E[x^2] - mean^2: it works on
    x shifted by each row's first element so that a mean of 64 standard deviations costs nothing
    (unshifted: 7.5e-2 relative error in bf16)."""
    torch.manual_seed(3)
    model = NormLinear("layer", 256, 64).to(dtype)
    x = (torch.randn(2, 256) + torch.tensor([[64.0], [-16.0]])).to(dtype)
    mk = mkcompiler.compile(model, (x,), fuse_norm=True, cache=False)
    assert folded(mk) == [True]
    mk.poison()
    assert rel_err(mk(x), reference(model, (x,))) <= TOL[dtype] / 2


class StridedNormLinear(torch.nn.Module):
    """A norm whose weight and bias are strided views of parameters (FLAT 0: strides from the
    view table, loaded once per tile)."""

    def __init__(self, rms: bool, dim: int = 96):
        super().__init__()
        self.rms, self.dim = rms, dim
        self.w = torch.nn.Parameter(torch.rand(2 * dim) + 0.5)
        self.b = torch.nn.Parameter(torch.randn(3 * dim))
        self.proj = torch.nn.Linear(dim, 40)

    def forward(self, x):
        if self.rms:
            return self.proj(torch.nn.functional.rms_norm(x, (self.dim,), self.w[::2], eps=1e-5))
        return self.proj(torch.nn.functional.layer_norm(x, (self.dim,), self.w[1::2], self.b[::3]))


@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("split_k", [None, 2])
def test_strided_norm_weight_and_bias(rms, split_k):
    torch.manual_seed(5)
    tile = (16, 32, 32) if split_k else None
    mk = check(StridedNormLinear(rms), torch.randn(1, 96), torch.float32, split_k=split_k, matmul_tile=tile)
    assert folded(mk) == [split_k is None]
    (op,) = [op for op in mk.graph.ops if op.kind == "matmul" and op.attrs.norm is not None]
    assert FAMILIES["matmul"].norm_key(op)[-2:] == ((0, 1) if rms else (0, 0))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU-only check")
def test_both_paths_compile_for_sm90_without_spills():
    """bf16 dots as a GPU runs them: one-pass RMSNorm and LayerNorm tiles and a split-K sweep
    tile in one kernel."""

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = NormLinear("rms", 256, 128, bias=False)
            self.b = NormLinear("layer", 256, 128)
            self.c = NormLinear("rms", 1024, 64)  # few tiles, K >= 2 * 512: split-K

        def forward(self, x, y):
            return self.a(x) + self.b(x), self.c(y)

    model = Both().to(torch.bfloat16)
    x, y = torch.randn(1, 256, dtype=torch.bfloat16), torch.randn(1, 1024, dtype=torch.bfloat16)
    mk = mkcompiler.compile(model, (x, y), fuse_norm=True, cache=False, num_workers=132, interpret=False)
    paths = {
        (op.attrs.norm.rms, FAMILIES["matmul"].splits(op)): FAMILIES["matmul"].norm_in_loop(op)
        for op in mk.graph.ops
        if op.kind == "matmul" and op.attrs.norm is not None
    }
    assert paths == {(True, 1): True, (False, 1): True, (True, 2): False}, paths
    r = compile_sm90(mk.source)
    print("\n" + format_report(r))
    assert r["spilled_bytes"] == 0 and r["local"] == 0, format_report(r)
