"""passes/fuse_matmul_a.py: decode matmuls compute their A from its elementwise producer's inputs
(a residual add of split-K partials, a SwiGLU gate), so that producer is no stage of the chain.
The kernel (interpreter) must give the same values as the graph compiled without the fusion, and
both must match eager; the producer leaves the path from the previous matmul to the next."""

import copy

import pytest
import torch
import torch.nn.functional as F
from mkcompiler.ops.matmul import MAX_A_INPUTS

import mkcompiler
from tests.helpers import rel_err


class GatedMLP(torch.nn.Module):
    """Residual SwiGLU blocks: h + down(silu(gate(norm(h))) * up(norm(h))), twice."""

    def __init__(self, dim=64, hidden=128, layers=2):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(dim, eps=1e-5) for _ in range(layers))
        self.gates = torch.nn.ModuleList(torch.nn.Linear(dim, hidden, bias=False) for _ in range(layers))
        self.ups = torch.nn.ModuleList(torch.nn.Linear(dim, hidden, bias=False) for _ in range(layers))
        self.downs = torch.nn.ModuleList(torch.nn.Linear(hidden, dim, bias=False) for _ in range(layers))
        with torch.no_grad():
            for n in self.norms:
                n.weight.copy_(1 + 0.1 * torch.randn(dim))

    def forward(self, h):
        for norm, gate, up, down in zip(self.norms, self.gates, self.ups, self.downs):
            x = norm(h)
            h = h + down(F.silu(gate(x)) * up(x))
        return h


class GeluProjection(torch.nn.Module):
    """A matmul of a GELU (erf: library code, not computed by the tile) and of a tanh-free chain."""

    def __init__(self, dim=32):
        super().__init__()
        self.a = torch.nn.Linear(dim, dim, bias=False)
        self.b = torch.nn.Linear(dim, dim, bias=True)

    def forward(self, x, y):
        return self.a(F.gelu(x)) + self.b(x * torch.sigmoid(y) - y)


def compile_both(model, args, **options):
    fused = mkcompiler.compile(model, args, cache=False, **options)
    plain = mkcompiler.compile(copy.deepcopy(model), args, cache=False, fuse_matmul_a=False, **options)
    return fused, plain


def matmul_exprs(mk):
    return [op.attrs.a_expr for op in mk.graph.ops if op.kind == "matmul"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_mlp_matches_the_unfused_graph_and_eager(dtype):
    torch.manual_seed(0)
    model = GatedMLP().to(dtype)
    h = torch.randn(1, 64, dtype=dtype)
    fused, plain = compile_both(model, (h,), split_k=2)
    exprs = matmul_exprs(fused)
    assert any(e is not None and e[1] == "mul" for e in exprs)  # the down projections compute silu(g) * u
    assert any(e is not None and e[1] == "add" for e in exprs)  # layer 2's gate/up compute the residual sum
    assert all(e is None for e in matmul_exprs(plain))
    assert len(fused.graph.ops) < len(plain.graph.ops)  # the gates are gone
    for _ in range(2):
        h = torch.randn(1, 64, dtype=dtype)
        fused.poison()
        plain.poison()
        got, ref = fused(h), plain(h)
        assert torch.equal(got, ref)  # the same roundings in the same order
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert rel_err(got, model(h)) < tol


def test_the_gate_and_the_residual_sum_leave_the_chain():
    torch.manual_seed(0)
    model = GatedMLP()
    fused, plain = compile_both(model, (torch.randn(1, 64),), split_k=2)
    # per layer: gate/up, silu * up, down, residual sum -> gate/up, down (the last sum stays)
    assert (_longest_chain(plain), _longest_chain(fused)) == (8, 5)


def _longest_chain(mk) -> int:
    """Ops on the longest dependency chain of the op graph."""
    import functools

    dag = mk.dag
    preds: dict[int, set[int]] = {}
    for a, b in dag.edges:
        oa, ob = dag.tasks[a].op, dag.tasks[b].op
        if oa != ob:
            preds.setdefault(ob, set()).add(oa)

    @functools.cache
    def level(o):
        return 1 + max((level(p) for p in preds.get(o, ())), default=0)

    return max(level(o) for o in range(len(mk.graph.ops)))


def test_library_calls_are_read_not_recomputed():
    torch.manual_seed(0)
    model = GeluProjection()
    x, y = torch.randn(1, 32), torch.randn(1, 32)
    fused, plain = compile_both(model, (x, y))
    exprs = matmul_exprs(fused)
    assert exprs.count(None) == 1  # gelu (erf) stays an op; x * sigmoid(y) - y is computed by its matmul
    fused.poison()
    x, y = torch.randn(1, 32), torch.randn(1, 32)
    assert torch.equal(fused(x, y), plain(x, y))
    assert rel_err(fused(x, y), model(x, y)) < 1e-5


@pytest.mark.parametrize("rows", [2, 48])
def test_several_rows_read_their_a(rows):
    torch.manual_seed(0)
    model = GatedMLP()
    fused = mkcompiler.compile(model, (torch.randn(rows, 64),), cache=False)
    assert all(e is None for e in matmul_exprs(fused))


def test_too_many_inputs_keep_the_producer():
    """A residual sum of more split-K partials than an instruction has args for stays an op."""
    torch.manual_seed(0)
    model = GatedMLP()
    h = torch.randn(1, 64)
    fused = mkcompiler.compile(model, (h,), cache=False, split_k=MAX_A_INPUTS)
    adds = [e for e in matmul_exprs(fused) if e is not None and e[1] == "add"]
    assert not adds
    fused.poison()
    assert rel_err(fused(h), model(h)) < 1e-4
