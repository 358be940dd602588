"""A decode matmul computes its A operand from the elementwise op producing it
(passes/fuse_matmul_a.py): in `down(silu(gate(x)) * up(x))` the down tiles compute their slice of
silu(gate) * up themselves, one dependent stage less. Fused matmuls run in the interpreter and in
the reference VM, on fresh random inputs with every intermediate poisoned, against eager."""

import copy
import sys
from pathlib import Path

import torch
from mkcompiler.ops.matmul import A_EXPR_MAX_INPUTS
from mkcompiler.passes.fuse_matmul_a import fuse_into_matmul_a

import mkcompiler
from mkcompiler.ir import BufferKind, Graph, OpNode, View
from mkcompiler.layout import NUM_ARGS, Field, ViewField
from tests.helpers import check_kernel_and_vm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is not an installed package
from examples.llama import random_llama  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


class GatedMLP(torch.nn.Module):
    def __init__(self, dim=64, hidden=128, residual=False, bias=False):
        super().__init__()
        self.gate = torch.nn.Linear(dim, hidden, bias=bias)
        self.up = torch.nn.Linear(dim, hidden, bias=bias)
        self.down = torch.nn.Linear(hidden, dim, bias=bias)
        self.residual = residual

    def forward(self, x):
        y = self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))
        return x + y if self.residual else y


def compile_fresh(model, args, **options):
    options.setdefault("fuse_matmul_a", True)  # off by default (not faster on the GPU)
    return mkcompiler.compile(model, args, cache=False, **options)


def kinds(mk):
    return [op.kind for op in mk.graph.ops]


def fused(mk):
    return [op for op in mk.graph.ops if op.kind == "matmul" and "a_expr" in op.attrs]


def check_runs(mk, model, args, dtype=torch.float32):
    check_kernel_and_vm(mk, model, args, TOL[dtype], 1e-5 if dtype == torch.float32 else 1e-2)


def fresh(*shape, dtype=torch.float32):
    return (torch.randn(*shape).to(dtype),)


def test_gated_mlp_down_computes_its_a():
    torch.manual_seed(0)
    model = GatedMLP()
    mk = compile_fresh(model, fresh(1, 64), split_k=1)
    assert kinds(mk) == ["matmul"] * 3  # nothing between gate/up and down
    (down,) = fused(mk)
    expr, a_dtype = down.attrs["a_expr"]
    assert expr[1] == "mul" and a_dtype == torch.float32 and len(down.inputs) == 5  # A slot, B, bias; gate, up
    assert down.inputs[0] == down.inputs[3]  # the first input holds A's slot
    check_runs(mk, copy.deepcopy(model), fresh(1, 64))


def test_gated_mlp_with_residual_and_bias():
    """Biases: gate/up add theirs before the product; down's K tail masked (hidden 96, BK 64)."""
    torch.manual_seed(0)
    model = GatedMLP(dim=48, hidden=96, residual=True, bias=True)
    mk = compile_fresh(model, fresh(1, 1, 48), split_k=1, matmul_tile=(16, 32, 64))
    assert kinds(mk) == ["matmul", "matmul", "matmul", "elementwise"], kinds(mk)  # the residual add last
    assert len(fused(mk)) == 1
    check_runs(mk, copy.deepcopy(model), fresh(1, 1, 48))


def test_split_k_reads_the_expression_by_k_chunks():
    """split_k=2 everywhere: A = silu(gate partials' sum) * (up partials' sum), four fp32 inputs;
    each down chunk computes A over its K range only and waits only for the gate/up tiles
    writing those columns."""
    torch.manual_seed(0)
    model = GatedMLP(residual=True)
    mk = compile_fresh(model, fresh(1, 64), split_k=2, matmul_tile=(16, 32, 32))
    assert kinds(mk) == ["matmul", "matmul", "matmul", "elementwise"], kinds(mk)
    (down,) = fused(mk)
    assert down.attrs["split"] == 2 and len(down.inputs) == 3 + 4
    # K = 128 in two chunks of 64: chunk s reads columns [64 s, 64 s + 64) of gate/up, whose
    # tiles are 32 wide (j = 2 s, 2 s + 1).
    index = mk.graph.ops.index(down)
    for t in mk.dag.nodes:
        node = mk.dag.nodes[t]
        if node["op"] != index:
            continue
        s = node["coords"][2]
        producers = [mk.dag.nodes[p] for p in mk.dag.predecessors(t)]
        assert producers and all(mk.graph.ops[p["op"]].kind == "matmul" for p in producers)
        assert {p["coords"][1] for p in producers} == {2 * s, 2 * s + 1}
    check_runs(mk, copy.deepcopy(model), fresh(1, 64))


def test_setting_off_keeps_the_elementwise_op():
    torch.manual_seed(0)
    model = GatedMLP()
    mk = compile_fresh(model, fresh(1, 64), split_k=1, fuse_matmul_a=False)
    assert kinds(mk) == ["matmul", "matmul", "elementwise", "matmul"]
    assert not fused(mk)
    check_runs(mk, copy.deepcopy(model), fresh(1, 64))


def test_unfused_opcode_keys_and_source_are_unchanged():
    """Without an A expression nothing changes: prefill rows (M = 64) are left alone."""
    torch.manual_seed(0)
    model = GatedMLP()
    on = compile_fresh(model, fresh(64, 64))
    off = compile_fresh(model, fresh(64, 64), fuse_matmul_a=False)
    assert "elementwise" in kinds(on) and not fused(on)
    assert on.source == off.source and on.queue.opcode_keys == off.queue.opcode_keys
    assert all(len(k) == 10 for k in on.queue.opcode_keys if k[0] == "matmul")
    check_runs(on, copy.deepcopy(model), fresh(64, 64))


class ProductReturned(torch.nn.Module):
    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.mlp = GatedMLP(dim, hidden)

    def forward(self, x):
        h = torch.nn.functional.silu(self.mlp.gate(x)) * self.mlp.up(x)
        return self.mlp.down(h), h


class ProductReadTwice(torch.nn.Module):
    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.mlp = GatedMLP(dim, hidden)
        self.other = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = torch.nn.functional.silu(self.mlp.gate(x)) * self.mlp.up(x)
        return self.mlp.down(h) + self.other(h), (h * 2.0).sum(-1)


def test_product_returned_or_read_elsewhere_stays():
    for cls in (ProductReturned, ProductReadTwice):
        torch.manual_seed(0)
        model = cls()
        mk = compile_fresh(model, fresh(1, 32), split_k=1)
        assert not fused(mk), cls.__name__
        muls = [op for op in mk.graph.ops if op.kind == "elementwise" and op.attrs["expr"][1] == "mul"]
        assert muls, kinds(mk)  # silu(gate) * up still computed once, by its own op
        check_runs(mk, copy.deepcopy(model), fresh(1, 32))


def test_bf16_gated_mlp():
    """bf16 weights, fp32 silu cast back: A's inputs are the bf16 gate and up outputs."""

    class M(GatedMLP):
        def forward(self, x):
            g = self.gate(x).float()
            return x + self.down((g * torch.sigmoid(g)).to(x.dtype) * self.up(x))

    torch.manual_seed(0)
    model = M().to(torch.bfloat16)
    mk = compile_fresh(model, fresh(1, 1, 64, dtype=torch.bfloat16), split_k=1)
    (down,) = fused(mk)
    assert down.attrs["a_expr"][1] == torch.bfloat16 and all(v.dtype == torch.bfloat16 for v in down.inputs[3:])
    check_runs(mk, copy.deepcopy(model), fresh(1, 1, 64, dtype=torch.bfloat16), torch.bfloat16)


def test_bf16_split_partials_do_not_fuse():
    """A bf16 A computed from fp32 split-K partials would turn the down dot into an fp32 one (its
    operand dtype comes from A's slot): left alone."""
    torch.manual_seed(0)
    model = GatedMLP().to(torch.bfloat16)
    mk = compile_fresh(model, fresh(1, 64, dtype=torch.bfloat16), split_k=2)
    assert not fused(mk) and "elementwise" in kinds(mk)


def test_instruction_args_fit():
    """The tail holds the inputs after the first: every row's args stay within NUM_ARGS."""
    torch.manual_seed(0)
    model = GatedMLP(residual=True)
    mk = compile_fresh(model, fresh(1, 64), split_k=2, matmul_tile=(16, 32, 32))
    (down,) = fused(mk)
    assert A_EXPR_MAX_INPUTS == NUM_ARGS - 6
    index = mk.graph.ops.index(down)
    rows = [i for i in range(len(mk.queue.rows)) if mk.dag.nodes[int(mk.queue.rows[i, Field.TASK])]["op"] == index]
    assert rows
    for i in rows:
        args = mk.queue.rows[i, Field.ARG0 : Field.ARG0 + NUM_ARGS]
        buffers = [int(mk.queue.views[a][ViewField.BUFFER]) for a in (args[0], *args[7:10])]
        assert buffers == [v.buffer for v in down.inputs[3:]]  # input 0 in A's slot, 1..3 after (i, j, s)
        assert list(args[10:]) == [-1] * (NUM_ARGS - 10)


def test_tiny_llama_decode_downs_compute_their_a():
    torch.manual_seed(0)
    model = random_llama("tiny", n_layers=2)
    args = (torch.randint(0, model.c.vocab_size, (1, 1)), torch.tensor([5]))
    mk = compile_fresh(model, args)
    assert len(fused(mk)) == 2
    check_runs(mk, copy.deepcopy(model), args)


def _graph_with_write_between():
    """p = x * 2 (x is state), then x is overwritten, then mm reads p: p must stay before the
    write (computing it in mm would read the new x)."""
    g = Graph()
    x = View.full(g.add_buffer("x", 16, torch.float32, BufferKind.STATE), (1, 16))
    w = View.full(g.add_buffer("w", 16 * 8, torch.float32, BufferKind.PARAM), (16, 8))
    y = View.full(g.add_buffer("y", 16, torch.float32, BufferKind.PARAM), (1, 16))
    p_out = g.new_tensor("p", (1, 16), torch.float32)
    c = g.new_tensor("c", (1, 8), torch.float32)
    mul = ("op", "mul", torch.float32, ("in", 0), ("const", 2.0))
    p = OpNode("elementwise", (x,), (p_out,), {"expr": mul}, name="p")
    write = OpNode("elementwise", (y,), (x,), {"expr": ("op", "copy", torch.float32, ("in", 0))}, name="write")
    mm = OpNode("matmul", (p_out, w, None), (c,), {}, name="mm")
    g.outputs = [c]
    return g, p, write, mm


def test_no_fusion_across_a_write_of_the_inputs():
    g, p, write, mm = _graph_with_write_between()
    g.ops = [p, write, mm]
    assert [op.name for op in fuse_into_matmul_a(g).ops] == ["p", "write", "mm"]
    g, p, write, mm = _graph_with_write_between()
    g.ops = [p, mm, write]
    assert [op.name for op in fuse_into_matmul_a(g).ops] == ["mm", "write"]
    assert mm.attrs["a_expr"][0] == ("op", "mul", torch.float32, ("in", 0), ("const", 2.0))
