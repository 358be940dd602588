"""A norm (LayerNorm / RMSNorm, ops/norm.py) absorbs the elementwise op producing its input
(passes/fuse.py): the residual add `h = x + attn` (a split-K sum fused in) is computed inside the
norm, one dependent stage less. Fused norms run in the interpreter and in the reference VM, on
fresh random inputs with every intermediate poisoned, and must equal eager fp32.

RMSNorm is decomposed (pow, mean, rsqrt, mul) when exported on the CPU; on CUDA it stays one
op. The `rms_norm_whole` fixture keeps aten.rms_norm whole here, as on a GPU."""

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mkcompiler.passes.fuse import MAX_INPUTS, NORM_MAX_INPUTS
from mkcompiler.passes.pipeline import run_pipeline

import mkcompiler
import mkcompiler.capture
from mkcompiler.capture import capture
from mkcompiler.settings import Settings
from mkcompiler.vm import run_megakernel
from tests.helpers import check_kernel_and_vm, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is not an installed package
from examples.llama import random_llama  # noqa: E402

TOL = 1e-4


@pytest.fixture
def rms_norm_whole(monkeypatch):
    plain = mkcompiler.capture._decompositions

    def keep_rms_norm():
        table = plain()
        table.pop(torch.ops.aten.rms_norm.default, None)
        return table

    monkeypatch.setattr(mkcompiler.capture, "_decompositions", keep_rms_norm)


def compile_fresh(model, args, **options):
    options.setdefault("fuse_into_norm", True)  # off by default (measured slower on the GPU)
    options.setdefault("fuse_norm", False)  # norms stay ops here (folded into matmuls by default)
    return mkcompiler.compile(model, args, cache=False, **options)  # the cache does not key the fixture


def norms(mk):
    return [op for op in mk.graph.ops if op.kind == "norm"]


def check_runs(mk, model, args):
    check_kernel_and_vm(mk, model, args, TOL)


def args_of(*shapes):
    return tuple(torch.randn(s) for s in shapes)


class ResidualRMSNorm(torch.nn.Module):
    def __init__(self, dim=48):
        super().__init__()
        self.norm = torch.nn.RMSNorm(dim, eps=1e-5)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x, y):
        return self.norm(x + y)


class ResidualLayerNorm(torch.nn.Module):
    """A residual add with a broadcast shift and a constant (the expression is not 0 on the
    masked lanes past the row: they must not count in the statistics)."""

    def __init__(self, dim=48):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.shift = torch.nn.Parameter(torch.randn(dim))
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_()

    def forward(self, x, y):
        return self.norm(x + y + self.shift + 0.5)


def test_residual_add_fuses_into_rms_norm(rms_norm_whole):
    """Rows of 48 (sweeps of 64 columns: masked lanes), 10 rows over 3 tiles of 4."""
    torch.manual_seed(0)
    model = ResidualRMSNorm()
    mk = compile_fresh(model, args_of((2, 5, 48), (2, 5, 48)))
    (norm,) = norms(mk)
    assert [op.kind for op in mk.graph.ops] == ["norm"]  # the add is inside the norm
    assert norm.attrs["rms"] and norm.attrs["expr"][1] == "add" and len(norm.inputs) == 4  # x, y, weight, no bias
    check_runs(mk, copy.deepcopy(model), args_of((2, 5, 48), (2, 5, 48)))


def test_residual_add_fuses_into_layer_norm():
    torch.manual_seed(0)
    model = ResidualLayerNorm()
    mk = compile_fresh(model, args_of((3, 7, 48), (3, 7, 48)))
    assert [op.kind for op in mk.graph.ops] == ["norm"]
    (norm,) = norms(mk)
    x_inputs = norm.inputs[:-2]
    assert len(x_inputs) == 3 and sum(0 in v.strides for v in x_inputs) == 1  # x, y, the shift (broadcast)
    assert norm.inputs[-2] is not None and norm.inputs[-1] is not None  # weight and bias
    check_runs(mk, copy.deepcopy(model), args_of((3, 7, 48), (3, 7, 48)))


def test_matmul_output_plus_residual_fuses_into_layer_norm():
    """h = x + x @ W + bias (split-K: the sum of the partials too) into the norm."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64, bias=True)
            self.norm = torch.nn.LayerNorm(64)

        def forward(self, x):
            return self.norm(x + self.proj(x))

    torch.manual_seed(0)
    model = M()
    mk = compile_fresh(model, args_of((1, 1, 64)), split_k=2)
    assert [op.kind for op in mk.graph.ops] == ["matmul", "norm"]
    (norm,) = norms(mk)
    assert len(norm.inputs) - 2 == 4  # x, two partials, the bias
    check_runs(mk, copy.deepcopy(model), args_of((1, 1, 64)))


class SharedProducer(torch.nn.Module):
    """h = x + y read by a norm and by an elementwise op: small, so recomputed in both."""

    def __init__(self, dim=32):
        super().__init__()
        self.norm = torch.nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x, y, z):
        h = x + y
        return self.norm(h), h * z


def test_a_producer_read_by_a_norm_and_an_elementwise_op_is_recomputed_in_both(rms_norm_whole):
    torch.manual_seed(0)
    model = SharedProducer()
    shapes = ((3, 32), (3, 32), (3, 32))
    mk = compile_fresh(model, args_of(*shapes))
    assert "add" in [op.name for op in capture(model, args_of(*shapes)).ops]
    assert sorted(op.kind for op in mk.graph.ops) == ["elementwise", "norm"], [op.name for op in mk.graph.ops]
    (norm,) = norms(mk)
    (mul,) = [op for op in mk.graph.ops if op.kind == "elementwise"]
    assert norm.attrs["expr"][1] == "add" and len(mul.inputs) == 3  # x + y inside both
    check_runs(mk, copy.deepcopy(model), args_of(*shapes))


class ResidualStream(torch.nn.Module):
    """x_{i+1} = x_i + y_i, and norm(x_{i+1}) returned at every step: each x_i is read by its
    norm and by the next add, so recomputing x_i in both grows a chain that the instruction's
    inputs must stop."""

    def __init__(self, steps=14, dim=32):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(steps))
        with torch.no_grad():
            for n in self.norms:
                n.weight.uniform_(0.5, 1.5)
                n.bias.normal_()

    def forward(self, x, ys):
        outs = []
        for i, n in enumerate(self.norms):
            x = x + ys[i]
            outs.append(n(x))
        return torch.stack(outs)


def test_a_recomputed_chain_stops_at_the_instruction_inputs():
    torch.manual_seed(0)
    model = ResidualStream()
    shapes = ((2, 32), (14, 2, 32))
    mk = compile_fresh(model, args_of(*shapes))
    ops = mk.graph.ops
    assert all(len(op.inputs) <= MAX_INPUTS for op in ops if op.kind == "elementwise")
    assert all(len(op.inputs) - 2 <= NORM_MAX_INPUTS for op in norms(mk))
    assert max(len(op.inputs) - 2 for op in norms(mk)) == NORM_MAX_INPUTS  # the chain reached the limit
    assert all("expr" in op.attrs for op in norms(mk))  # yet every norm computes its own x
    adds = [op for op in ops if op.kind == "elementwise" and op.attrs["expr"][1] == "add"]
    assert 1 <= len(adds) < 4, [op.name for op in ops]  # the stream is materialised where the chain stops
    check_runs(mk, copy.deepcopy(model), args_of(*shapes))


def randomize_caches(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        for c in (layer.attn.k_cache, layer.attn.v_cache):
            c.copy_(torch.randn(c.shape, generator=g))


def residual_norms(graph) -> list:
    """The norms reading what a matmul writes as (part of) their x: the residual add after
    attention or MLP is computed inside them, not in an op they wait for."""
    writers = {o.buffer: op for op in graph.ops for o in op.outputs}
    return [
        op
        for op in graph.ops
        if op.kind == "norm"
        and "expr" in op.attrs
        and any(writers.get(v.buffer) is not None and writers[v.buffer].kind == "matmul" for v in op.inputs[:-2])
    ]


@pytest.mark.parametrize("split_k", [None, 2])
def test_llama_decode_norms_absorb_the_residual_add(rms_norm_whole, split_k):
    """Two layers: every norm but the first (it reads the embedding) computes the residual sum
    it normalises (partials of o_proj or down included), and the logits equal eager."""
    torch.manual_seed(0)
    model = random_llama("tiny")
    randomize_caches(model)
    ref = copy.deepcopy(model)
    pos = 11
    token = torch.randint(0, model.c.vocab_size, (1, 1))
    mk = compile_fresh(model, (token, torch.tensor([pos])), split_k=split_k)
    ns = norms(mk)
    assert len(ns) == 2 * 2 + 1
    assert "expr" not in ns[0].attrs and residual_norms(mk.graph) == ns[1:]
    for step in range(2):
        token = torch.randint(0, model.c.vocab_size, (1, 1))
        args = (token, torch.tensor([pos + step]))
        mk.poison()
        got = mk(*args)
        assert rel_err(got, ref(*args)) <= TOL
        mk.poison()
        vm, _ = run_megakernel(mk, *args, seed=step)  # rewrites the same cache slot with the same values
        assert rel_err(vm, got) <= 1e-5


def test_deep_llama_decode_compiles_fast_and_fits_instructions(rms_norm_whole):
    """Eight layers, a GPU's worker count (split-K sums in every residual add): fusion stays
    fast, every fused op fits its instruction, and every norm but the first absorbs its add."""
    model = random_llama("tiny", n_layers=8)
    graph = capture(model, (torch.zeros(1, 1, dtype=torch.long), torch.tensor([5])))
    for split_k in (None, 4, 6):
        comp = run_pipeline(
            copy.deepcopy(graph),
            Settings().replace(debug=1, split_k=split_k, fuse_into_norm=True, fuse_norm=False),
            132,
        )
        assert comp.timings["fuse_elementwise"] < 1.0
        ns = [op for op in comp.graph.ops if op.kind == "norm"]
        assert len(ns) == 2 * 8 + 1 and residual_norms(comp.graph) == ns[1:]
        assert all(len(op.inputs) <= MAX_INPUTS for op in comp.graph.ops if op.kind == "elementwise")
        assert all(len(op.inputs) - 2 <= NORM_MAX_INPUTS for op in ns)  # (encode checks every row too)


def test_fused_norm_routine_is_generated_and_plain_norm_unchanged(rms_norm_whole):
    """A fused norm gets a generated routine; an unfused one still calls norm_rows."""
    torch.manual_seed(0)
    model = SharedProducer()
    mk = compile_fresh(model, args_of((3, 32), (3, 32), (3, 32)))
    assert "def op" in mk.source and "_norm(row_ptr, addrs_ptr, views_ptr):" in mk.source
    plain = compile_fresh(torch.nn.RMSNorm(32), args_of((3, 32)))
    assert "norm_rows(pre, addrs_ptr, views_ptr" in plain.source


def test_norm_weight_produced_by_an_elementwise_op_is_not_absorbed():
    """A producer read as the norm's weight cannot go into x's expression."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(32))

        def forward(self, x):
            return F.layer_norm(x + 1.0, (32,), self.w * 2.0, None)

    torch.manual_seed(0)
    model = M()
    mk = compile_fresh(model, args_of((4, 32)))
    (norm,) = norms(mk)
    assert "expr" in norm.attrs and len(norm.inputs) == 3  # x + 1 inside; the weight still read
    check_runs(mk, copy.deepcopy(model), args_of((4, 32)))


class WideSums(torch.nn.Module):
    """RMSNorm(x + y0 + .. + y8) and LayerNorm(x + z0 + .. + z9): norms of 9 and 10 inputs."""

    def __init__(self, dim=2048):
        super().__init__()
        self.rms = torch.nn.RMSNorm(dim, eps=1e-5)
        self.ln = torch.nn.LayerNorm(dim)

    def forward(self, x, ys, zs):
        a, b = x, x
        for i in range(ys.shape[0]):
            a = a + ys[i]
        for i in range(zs.shape[0]):
            b = b + zs[i]
        return self.rms(a), self.ln(b)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU-only check (offline compile)")
def test_fused_norms_compile_for_sm90_without_spills(rms_norm_whole):
    """Decode-shaped (one row of 2048, bf16) fused norms at the input limit, as a GPU compiles
    them (registers are the max over opcodes: a wide fused norm must not spill)."""
    from mkcompiler.offline import compile_sm90, format_report

    torch.manual_seed(0)
    model = WideSums().to(torch.bfloat16)
    args = tuple(torch.randn(*s, dtype=torch.bfloat16) for s in ((1, 2048), (8, 1, 2048), (9, 1, 2048)))
    mk = compile_fresh(model, args, num_workers=132)
    assert sorted(len(op.inputs) - 2 for op in norms(mk)) == [9, NORM_MAX_INPUTS]
    assert [op.kind for op in mk.graph.ops] == ["norm", "norm"]
    r = compile_sm90(mk.source)
    print("\n" + format_report(r))
    assert r["regs"] > 0 and r["spilled_bytes"] == 0 and r["local"] == 0, format_report(r)
