"""The elementwise fusion pass: what fuses (counted in the op graph) and that fused graphs still
compute what eager does."""

import torch
from mkcompiler.passes.fuse import fuse_elementwise
from mkcompiler.passes.split_k import split_k

import mkcompiler
from mkcompiler.frontend.capture import capture
from mkcompiler.ir.settings import Settings
from tests.helpers import rel_err


class GatedMLP(torch.nn.Module):
    """bf16 weights, fp32 silu: x -> (gate.float() * sigmoid(gate.float())).to(bf16) * up."""

    def __init__(self, dim=64, hidden=128):
        super().__init__()
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        g = self.gate(x).float()
        h = (g * torch.sigmoid(g)).to(x.dtype) * self.up(x)
        return x + self.down(h)


def fused_ops(model, x, **options):
    settings = Settings().replace(**options).for_target()
    g = split_k(capture(model, (x,)), settings, num_workers=8)
    return fuse_elementwise(g).ops


def kinds_after_fusion(model, x, **options):
    return [op.kind for op in fused_ops(model, x, **options)]


def test_a_value_read_twice_by_one_consumer_fuses():
    """g is read by sigmoid and by the multiply: once sigmoid is inside the multiply, g's cast
    fuses too (fixed point), leaving one elementwise op between the matmuls and the residual."""
    torch.manual_seed(0)
    model = GatedMLP().to(torch.bfloat16)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    kinds = kinds_after_fusion(model, x, split_k=1)
    assert kinds.count("matmul") == 3
    assert kinds.count("elementwise") == 2, kinds  # silu*up, and the residual add


def test_split_k_sum_fuses_into_the_residual_add():
    """The split-K sum's output [1, N] is read as [1, 1, N] by the residual add: strides of size-1
    dims differ but address the same elements, so the sum fuses into the add."""
    torch.manual_seed(0)
    model = GatedMLP().to(torch.bfloat16)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    ops = fused_ops(model, x, split_k=2)
    assert all(op.outputs[0].rank == 3 for op in ops if op.kind == "matmul")  # [splits, M, N] partials
    kinds = [op.kind for op in ops]
    assert kinds.count("elementwise") == 2, kinds  # gate/up sums + silu*mul; down sum + residual


def test_fused_graph_matches_eager():
    torch.manual_seed(0)
    model = GatedMLP()
    x = torch.randn(1, 1, 64)
    mk = mkcompiler.compile(model, (x,), split_k=2)
    x = torch.randn(1, 1, 64)
    mk.poison()
    assert rel_err(mk(x), model(x)) <= 1e-5


class CacheAppend(torch.nn.Module):
    """k = (x @ W) * scale + shift, appended to a cache at runtime positions (index_copy_)."""

    def __init__(self, dim=16, slots=8, also_return_k=False):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        self.shift = torch.nn.Parameter(torch.randn(dim))
        self.register_buffer("cache", torch.zeros(2, slots, dim))
        self.also_return_k = also_return_k

    def forward(self, x, pos):
        k = self.proj(x) * 0.5 + self.shift
        self.cache.index_copy_(1, pos, k)
        out = self.cache.sum(-1)  # reads every slot: the cache after the write
        return (out, k * 2) if self.also_return_k else out


def test_elementwise_values_fuse_into_the_cache_write():
    torch.manual_seed(0)
    model, ref = CacheAppend(), CacheAppend()
    ref.load_state_dict(model.state_dict())
    x, pos = torch.randn(2, 3, 16), torch.tensor([1, 4, 6])
    mk = mkcompiler.compile(model, (x, pos))
    (scatter,) = [op for op in mk.graph.ops if op.kind == "scatter"]
    assert scatter.attrs.expr is not None  # the elementwise op producing k is gone into the scatter
    assert "elementwise" not in [op.kind for op in mk.graph.ops]
    for p in ([0, 2, 3], [7, 5, 1]):
        x, pos = torch.randn(2, 3, 16), torch.tensor(p)
        assert rel_err(mk(x, pos), ref(x, pos)) <= 1e-5
        assert torch.allclose(model.cache, ref.cache, atol=1e-6)


def test_values_read_elsewhere_are_not_fused_into_the_scatter():
    torch.manual_seed(0)
    model = CacheAppend(also_return_k=True)
    x, pos = torch.randn(2, 3, 16), torch.tensor([1, 4, 6])
    mk = mkcompiler.compile(model, (x, pos))
    (scatter,) = [op for op in mk.graph.ops if op.kind == "scatter"]
    assert scatter.attrs.expr is None


class HalvesOfASum(torch.nn.Module):
    """s = a + b read by three ops through different windows (as RoPE reads a split-K sum):
    s * c, and the two halves of s, negated and swapped (rotate_half)."""

    def forward(self, a, b, c):
        s = a + b
        h = s.shape[-1] // 2
        return s * c + torch.cat([-s[..., h:], s[..., :h]], dim=-1)


def test_a_small_producer_is_recomputed_in_each_window_reader():
    torch.manual_seed(0)
    model = HalvesOfASum()
    args = [torch.randn(3, 4, 16) for _ in range(3)]
    mk = mkcompiler.compile(model, args)
    assert "add" in [op.name for op in capture(model, tuple(args)).ops]  # s = a + b
    assert "add" not in [op.name for op in mk.graph.ops]  # inlined into its readers
    assert len(mk.graph.ops) == 1, [op.name for op in mk.graph.ops]  # s * c + cat, the cat's pieces folded in
    args = [torch.randn(3, 4, 16) for _ in range(3)]
    mk.poison()
    assert rel_err(mk(*args), model(*args)) <= 1e-6


def test_transfer_maps_windows_and_refuses_carries():
    from mkcompiler.passes.fuse import transfer

    from mkcompiler.ir.graph import View

    out_shape = (4, 8)
    x = View(7, torch.float32, (4, 8), (1, 4), 0)  # a transposed input: x[i, j] at i + 4 j
    half = View(3, torch.float32, (4, 4), (8, 1), 4)  # out[:, 4:]
    t = transfer(half, out_shape, x)
    assert (t.buffer, t.shape, t.strides, t.offset) == (7, (4, 4), (1, 4), 16)
    carry = View(3, torch.float32, (2, 6), (8, 1), 4)  # 6 columns from column 4: runs past a row
    assert transfer(carry, out_shape, x) is None


class TwoReadersOfACat(torch.nn.Module):
    """t = cat([cos(f), sin(f)]) of shape [1, 2n], read by two ops: its first piece alone looks
    like a contiguous producer at offset 0 ([1, n] inside [1, 2n]), but it writes half of t."""

    def forward(self, f, a, b):
        t = torch.cat([f.cos(), f.sin()], dim=-1)
        return a * t, b + t


def test_a_cat_piece_is_not_taken_for_the_whole_cat():
    torch.manual_seed(0)
    model = TwoReadersOfACat()
    args = (torch.randn(1, 8), torch.randn(3, 16), torch.randn(3, 16))
    mk = mkcompiler.compile(model, args)
    args = (torch.randn(1, 8), torch.randn(3, 16), torch.randn(3, 16))
    mk.poison()
    for got, want in zip(mk(*args), model(*args)):
        assert rel_err(got, want) <= 1e-6


class SharedRotary(torch.nn.Module):
    """cos and sin of per-position angles, read by two rotations through a broadcast over heads
    (RoPE's tables read by every layer), and a cheap shared scale read by both too."""

    def forward(self, q, k, pos, inv_freq):
        ang = pos[:, None].float() * inv_freq[None, :]  # [S, D]
        cos, sin = ang.cos(), ang.sin()
        s = pos[:, None].float() * 0.5 + 1.0  # cheap: recomputed in each reader
        return q * cos * s + q * q * sin, k * cos * s - k * sin


def test_library_calls_are_computed_once_not_in_each_reader():
    """sin / cos (ops/elementwise.LIBRARY_OPS) read by several ops stay ops of their own, each
    element computed once; the cheap shared producer is still inlined; values as eager's."""
    torch.manual_seed(0)
    model = SharedRotary()
    args = (torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8), torch.tensor([5, 9, 30]), torch.rand(8))
    mk = mkcompiler.compile(model, args)
    exprs = {op.name: str(op.attrs.expr) for op in mk.graph.ops if op.kind == "elementwise"}
    own = [n for n, e in exprs.items() if e.startswith("('op', 'cos'") or e.startswith("('op', 'sin'")]
    assert len(own) == 2, exprs  # cos and sin, each its own op
    readers = [n for n in exprs if n not in own]
    assert readers and not any("'cos'" in exprs[n] or "'sin'" in exprs[n] for n in readers), exprs
    assert all("'mul'" in exprs[n] for n in readers)  # the cheap scale went into the readers
    assert len(mk.graph.ops) == 4, list(exprs)  # cos, sin, two rotations (the angles and s inlined)
    for p in ([1, 2, 3], [40, 0, 7]):
        args = (torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8), torch.tensor(p), torch.rand(8))
        mk.poison()
        for got, want in zip(mk(*args), model(*args)):
            assert rel_err(got, want) <= 1e-5
