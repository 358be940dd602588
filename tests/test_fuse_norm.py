"""passes/fuse_norm.py (fuse_norm=True; off by default: slower on an H100, RESULTS.md): a
LayerNorm/RMSNorm read only by few-row matmuls is folded into them. The folded tiles compute the
norm themselves; outputs must equal the unfolded graph's."""

import pytest
import torch
from mkcompiler.passes.pipeline import run_pipeline

import mkcompiler
from mkcompiler.api import _device_of
from mkcompiler.backends.triton.codegen import generate
from mkcompiler.frontend.capture import capture
from mkcompiler.ir.settings import Settings
from mkcompiler.runtime.megakernel import Megakernel
from tests.helpers import rel_err


class NormThenProjections(torch.nn.Module):
    """h = LayerNorm(x); q(h) + k(h): the norm's output feeds two matmuls (like Q/K/V)."""

    def __init__(self, dim=64, hidden=96, bias=True):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim, bias=bias)
        self.q = torch.nn.Linear(dim, hidden, bias=False)
        self.k = torch.nn.Linear(dim, hidden, bias=True)
        with torch.no_grad():
            self.norm.weight.copy_(torch.randn(dim))
            if bias:
                self.norm.bias.copy_(torch.randn(dim))

    def forward(self, x):
        h = self.norm(x)
        return self.q(h) + self.k(h)


class NormAlsoAdded(NormThenProjections):
    def forward(self, x):
        h = self.norm(x)
        return self.q(h) + h.sum(-1, keepdim=True)  # h has a reader that is not a matmul


def kinds(mk):
    return [op.kind for op in mk.graph.ops]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_layer_norm_equals_the_unfolded_graph(dtype, bias):
    torch.manual_seed(0)
    model = NormThenProjections(bias=bias).to(dtype)
    x = torch.randn(3, 1, 64, dtype=dtype)
    folded = mkcompiler.compile(model, (x,), split_k=2, fuse_norm=True)
    plain = mkcompiler.compile(model, (x,), split_k=2, fuse_norm=False)
    assert "norm" not in kinds(folded) and "norm" in kinds(plain)
    assert all(op.attrs.norm is not None for op in folded.graph.ops if op.kind == "matmul")
    x = torch.randn(3, 1, 64, dtype=dtype)
    folded.poison()
    plain.poison()
    out = folded(x)
    assert torch.equal(out, plain(x))  # the tile rounds h exactly as the norm op stores it
    assert rel_err(out, model(x)) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_folded_rms_norm_matches_torch():
    """RMSNorm is decomposed on the CPU, so the norm op is made an RMS one by hand here."""
    torch.manual_seed(0)
    model = NormThenProjections(bias=False)
    x = torch.randn(2, 1, 64)
    graph = capture(model, (x,))
    (norm,) = [op for op in graph.ops if op.kind == "norm"]
    norm.attrs.rms = True
    settings = Settings().replace(fuse_norm=True).for_target()
    comp = run_pipeline(graph, settings, 4)
    assert "norm" not in [op.kind for op in comp.graph.ops]
    mk = Megakernel(comp, generate(comp.queue), _device_of(model, (x,)))
    x = torch.randn(2, 1, 64)
    mk.poison()
    h = torch.nn.functional.rms_norm(x, (64,), model.norm.weight, eps=model.norm.eps)
    assert rel_err(mk(x), model.q(h) + model.k(h)) <= 1e-5


def test_not_folded_for_many_rows_or_other_readers():
    torch.manual_seed(0)
    model = NormThenProjections()
    x = torch.randn(32, 64)  # prefill-like: every column tile would redo the statistics
    assert "norm" in kinds(mkcompiler.compile(model, (x,), fuse_norm=True))
    model = NormAlsoAdded()
    x = torch.randn(2, 64)
    mk = mkcompiler.compile(model, (x,), fuse_norm=True)
    assert "norm" in kinds(mk)
    x = torch.randn(2, 64)
    assert rel_err(mk(x), model(x)) <= 1e-5
