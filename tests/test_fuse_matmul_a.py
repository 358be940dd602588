"""passes/fuse_matmul_a.py: decode matmuls compute their A from its elementwise producer's inputs
(a residual add of split-K partials, a SwiGLU gate), so that producer is no stage of the chain.
The kernel (interpreter) must give the same values as the graph compiled without the fusion, and
both must match eager; the producer leaves the path from the previous matmul to the next."""

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from mkcompiler.ops.matmul import MAX_A_INPUTS

import mkcompiler
from examples.factories import _fill_caches
from examples.llama import LlamaConfig, random_llama
from mkcompiler.backends.gluon import codegen, tiles
from mkcompiler.ir.settings import default_max_spin
from mkcompiler.runtime.gluon import GluonFallbackWarning, GluonMegakernel
from mkcompiler.tools.offline import compile_sm90, format_report
from mkcompiler.vm import run_megakernel
from tests.helpers import rel_err
from tests.test_fuse_cat import op_levels

needs_gluon = pytest.mark.skipif(not tiles.HAVE_GLUON, reason="triton.experimental.gluon not importable")


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
    fused = mkcompiler.compile(model, args, cache=False, fuse_matmul_a=True, **options)
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
    return max(op_levels(mk).values()) + 1


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
    fused = mkcompiler.compile(model, (torch.randn(rows, 64),), cache=False, fuse_matmul_a=True)
    assert all(e is None for e in matmul_exprs(fused))


def test_too_many_inputs_keep_the_producer():
    """A residual sum of more split-K partials than an instruction has args for stays an op."""
    torch.manual_seed(0)
    model = GatedMLP()
    h = torch.randn(1, 64)
    fused = mkcompiler.compile(model, (h,), cache=False, split_k=MAX_A_INPUTS, fuse_matmul_a=True)
    adds = [e for e in matmul_exprs(fused) if e is not None and e[1] == "add"]
    assert not adds
    fused.poison()
    assert rel_err(fused(h), model(h)) < 1e-4


def _small_llama(device="cpu"):
    """Our Llama, bf16, 2 layers, head dim 64, a 600-key cache: split-K sums, SwiGLU gates and
    split-KV combines for the tiles to compute; (model, (token, position))."""
    cfg = LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden=1024, max_seq_len=1024)
    with torch.device(device):
        model = random_llama(cfg, dtype=torch.bfloat16, device=device)
    _fill_caches(model)
    return model, (torch.tensor([[3]], device=device), torch.tensor([600], device=device))


def fused_kinds(mk) -> tuple[int, int]:
    """(matmuls computing an A expression, matmuls combining attention chunks)."""
    ops = [op for op in mk.graph.ops if op.kind == "matmul"]
    return sum(op.attrs.a_expr is not None for op in ops), sum(op.attrs.a_combine is not None for op in ops)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU-only check (offline compile)")
def test_triton_kernel_compiles_for_sm90_without_spills():
    model, args = _small_llama()
    mk = mkcompiler.compile(model, args, interpret=False, num_workers=132, cache=False, fuse_matmul_a=True)
    assert fused_kinds(mk) == (10, 2)
    r = compile_sm90(mk.source)
    assert r["regs"] > 0 and r["spilled_bytes"] == 0 and r["local"] == 0, format_report(r)


@needs_gluon
def test_gluon_kernel_compiles_for_sm90():
    """Registers and spills are printed (12 B spilled in the 1B step's kernel: RESULTS.md). No
    combine on this backend (passes/fuse_matmul_a.py)."""
    model, args = _small_llama()
    mk = mkcompiler.compile(
        model, args, backend="gluon", interpret=False, num_workers=132, cache=False, fuse_matmul_a=True
    )
    assert isinstance(mk, GluonMegakernel) and fused_kinds(mk) == (10, 2)
    r = codegen.compile_offline(mk.kernel, default_max_spin(interpret=False))
    print(r["regs"], r["spilled_bytes"], r["shared"])
    assert r["regs"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "gluon"])
def test_gpu_decode_matches_the_unfused_kernel_and_eager(backend):
    model, args = _small_llama("cuda")
    ref_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GluonFallbackWarning)  # the Gluon case must run on Gluon
        fused, plain = compile_both(model, args, backend=backend)
    assert fused_kinds(fused) == (10, 2)
    for step in range(3):  # fresh tokens and positions, repeated calls
        tok = torch.tensor([[5 + step]], device="cuda")
        pos = torch.tensor([600 + step], device="cuda")
        got = fused(tok, pos)
        assert rel_err(got, plain(tok, pos)) <= 1e-2
        assert rel_err(got, ref_model(tok, pos)) <= 3e-2


class DecodeAttention(torch.nn.Module):
    """One decode step's attention over a cache (split-KV) and its output projection."""

    def __init__(self, heads=4, dim=16, keys=256):
        super().__init__()
        self.o = torch.nn.Linear(heads * dim, heads * dim, bias=False)
        self.register_buffer("k", torch.randn(1, heads, keys, dim))
        self.register_buffer("v", torch.randn(1, heads, keys, dim))

    def forward(self, q):
        att = F.scaled_dot_product_attention(q, self.k, self.v)  # [1, H, 1, D]
        return self.o(att.transpose(1, 2).reshape(1, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_output_projection_combines_the_attention_chunks(dtype):
    torch.manual_seed(0)
    model = DecodeAttention().to(dtype)
    q = torch.randn(1, 4, 1, 16, dtype=dtype)
    fused, plain = compile_both(model, (q,), split_kv=4)
    kinds = [op.kind for op in fused.graph.ops]
    assert "attention_combine" in [op.kind for op in plain.graph.ops] and "attention_combine" not in kinds
    assert [op.attrs.a_combine.splits for op in fused.graph.ops if op.kind == "matmul"] == [4]
    for _ in range(2):
        q = torch.randn(1, 4, 1, 16, dtype=dtype)
        fused.poison()
        got = fused(q)
        assert rel_err(got, plain(q)) < (1e-6 if dtype == torch.float32 else 1e-2)
        assert rel_err(got, model(q)) < (1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_reference_vm_runs_the_fused_queue_under_interleavings(seed):
    """The VM executes the fused queue with each op's reference (Matmul.a_value: the expression,
    or the combine, in fp64) in seeded interleavings of the workers: the waits the fused regions
    give are enough for eager's answer."""
    torch.manual_seed(0)
    model = GatedMLP()
    h = torch.randn(1, 64)
    fused = mkcompiler.compile(model, (h,), cache=False, fuse_matmul_a=True, split_k=2, num_workers=5)
    fused.poison()
    out, _ = run_megakernel(fused, h, seed=seed, dynamic=True)
    assert rel_err(out, model(h)) < 1e-4
    attention = DecodeAttention()
    q = torch.randn(1, 4, 1, 16)
    combined = mkcompiler.compile(attention, (q,), cache=False, fuse_matmul_a=True, split_kv=4, num_workers=5)
    assert fused_kinds(combined) == (0, 1)
    combined.poison()
    out, _ = run_megakernel(combined, q, seed=seed, dynamic=True)
    assert rel_err(out, attention(q)) < 1e-4
