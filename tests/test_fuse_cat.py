"""passes/fuse.fold_cats: a cat whose pieces are elementwise ops folds into its readers (elementwise
ops and KV-cache scatters), which select the piece landing at each element by its index along
the cat's dim (ops/elementwise.py, positional leaves). RoPE's rotate-half, cat((-x2, x1)), is
then no dependent stage of its own. Stages are counted as dependent op levels in the tile DAG
(mk.dag): the longest chain of ops, each waiting on the one before. Random inputs (never zeros),
kernel in the interpreter and reference VM against eager."""

import copy
import functools

import networkx as nx
import torch
import torch.nn.functional as F
from mkcompiler.passes import fuse

import mkcompiler
from examples.llama import random_llama
from tests.helpers import check_kernel_and_vm, rel_err


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class RopeCacheAttention(torch.nn.Module):
    """q, k = projections of x; rotate-half RoPE on both; k appended to a KV cache in place
    (index_put); attention of q over the cache: the decode layer's chain from the Q/K/V matvecs
    to attention, in miniature."""

    def __init__(self, dim=32, heads=2, head_dim=16, slots=8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.wq = torch.nn.Linear(dim, heads * head_dim, bias=False)
        self.wk = torch.nn.Linear(dim, heads * head_dim, bias=False)
        self.register_buffer("cache", torch.randn(1, heads, slots, head_dim))

    def forward(self, x, cos, sin, pos):
        q = self.wq(x).view(1, 1, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(1, 1, self.heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        self.cache[:, :, pos] = k
        return F.scaled_dot_product_attention(q, self.cache, self.cache)


def rope_args(seed, pos=3, dim=32, head_dim=16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, dim, generator=gen)
    cos = torch.rand(1, head_dim, generator=gen) + 0.5  # never zero
    sin = torch.rand(1, head_dim, generator=gen) + 0.5
    return x, cos, sin, torch.tensor([pos])


def op_levels(mk) -> dict[int, int]:
    """Per op, its dependent level in the tile DAG: 0 for an op waiting on nothing, else one more
    than the deepest op it waits on."""
    dag = mk.dag
    preds: dict[int, set[int]] = {}
    for a, b in dag.edges:
        oa, ob = dag.tasks[a].op, dag.tasks[b].op
        if oa != ob:
            preds.setdefault(ob, set()).add(oa)

    @functools.cache
    def level(o):
        return 1 + max((level(p) for p in preds.get(o, ())), default=-1)

    return {o: level(o) for o in range(len(mk.graph.ops))}


def stages_between(mk, src="matmul", dst="attention") -> int:
    """Dependent stages between the first `dst` op and the nearest `src` ops it depends on: ops
    on the longest chain strictly between them (0: dst waits on src directly)."""
    dag, ops = mk.dag, mk.graph.ops
    opg = nx.DiGraph()
    for a, b in dag.edges:
        if dag.tasks[a].op != dag.tasks[b].op:
            opg.add_edge(dag.tasks[a].op, dag.tasks[b].op)
    target = next(i for i, op in enumerate(ops) if op.kind == dst)

    @functools.cache
    def after_src(o):  # ops on the longest chain from a src op to o, o included; None: no src above
        if ops[o].kind == src:
            return 0
        found = [after_src(p) for p in opg.predecessors(o)]
        found = [f for f in found if f is not None]
        return 1 + max(found) if found else None

    return after_src(target) - 1


def compile_both(model, args, monkeypatch):
    """The megakernel of `model` with fold_cats, and one of a copy without (the pass replaced by
    the identity)."""
    mk = mkcompiler.compile(model, args, cache=False)
    with monkeypatch.context() as m:
        m.setattr(fuse, "fold_cats", lambda graph: graph)
        unfolded = mkcompiler.compile(copy.deepcopy(model), args, cache=False)
    return mk, unfolded


def test_rotate_half_folds_into_rope_and_the_cache_write(monkeypatch):
    torch.manual_seed(0)
    model = RopeCacheAttention()
    args = rope_args(0)
    mk, unfolded = compile_both(model, args, monkeypatch)
    kinds, before = [op.kind for op in mk.graph.ops], [op.kind for op in unfolded.graph.ops]
    # The four cat pieces (-q2, q1, -k2, k1) are gone: q's RoPE and the cache scatter compute them.
    assert before.count("elementwise") - kinds.count("elementwise") == 4, (before, kinds)
    (scatter,) = [op for op in mk.graph.ops if op.kind == "scatter"]
    assert fuse.has_positional(scatter.attrs.expr)
    # Matmul -> RoPE (and the cache write) -> attention: one stage between them, was two.
    assert stages_between(unfolded) == 2 and stages_between(mk) == 1
    depth, depth_before = max(op_levels(mk).values()), max(op_levels(unfolded).values())
    assert depth == depth_before - 1, (depth, depth_before)
    # Kernel (interpreter) and VM against eager, on other inputs and another slot.
    for seed, pos in ((1, 5), (2, 0)):
        args = rope_args(seed, pos)
        ref = copy.deepcopy(model)
        check_kernel_and_vm(mk, ref, args, 1e-4)
        mk.poison()
        mk(*args)
        assert rel_err(mk.graph.params[scatter.outputs[0].buffer], ref.cache) <= 1e-4


class CatReaders(torch.nn.Module):
    """A three-piece cat along a middle dim, one piece from two slices of one producer, read by an
    elementwise op (with broadcasting: b is [1, 1, n]) and by a strided window of it."""

    def forward(self, a, b, c):
        s = a * 1.5 + c  # [4, 6, 8]
        t = torch.cat([torch.sigmoid(s[:, 3:5]), b.expand(4, 1, 8) * 2.0, -s[:, :3] + s[:, 1:4]], dim=1)
        return t * c, t[:, 1:5].transpose(1, 2) + 1.0


def test_a_cat_of_slices_folds_into_each_reader():
    torch.manual_seed(0)
    model = CatReaders()
    args = (torch.randn(4, 6, 8), torch.randn(1, 1, 8), torch.randn(4, 6, 8))
    mk = mkcompiler.compile(model, args, cache=False)
    assert len(mk.graph.ops) == 2, [op.name for op in mk.graph.ops]  # the two readers: no piece, no s
    assert all(fuse.has_positional(op.attrs.expr) for op in mk.graph.ops)
    args = (torch.rand(4, 6, 8) + 0.5, torch.rand(1, 1, 8) + 0.5, torch.rand(4, 6, 8) + 0.5)
    check_kernel_and_vm(mk, model, args, 1e-5)


class CatOverwritten(torch.nn.Module):
    """The cat's pieces read state that a scatter overwrites in place before the cat's reader
    runs: the reader must see the cat of the old values, so the pieces stay (written_between)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("state", torch.randn(4, 8))

    def forward(self, x, pos):
        t = torch.cat([self.state[:2, 4:] * 2.0, -self.state[:2, :4]], dim=-1)
        self.state.index_copy_(0, pos, x)
        return t + self.state[:2]


def test_a_cat_whose_inputs_are_overwritten_stays():
    torch.manual_seed(0)
    model, ref = CatOverwritten(), CatOverwritten()
    ref.load_state_dict(model.state_dict())
    args = (torch.randn(1, 8), torch.tensor([1]))
    mk = mkcompiler.compile(model, args, cache=False)
    assert [op.kind for op in mk.graph.ops].count("elementwise") == 3  # two pieces and the reader
    assert not any(fuse.has_positional(op.attrs.expr) for op in mk.graph.ops if op.attrs.expr is not None)
    for row in (0, 1):
        args = (torch.rand(1, 8) + 0.5, torch.tensor([row]))
        mk.poison()
        assert rel_err(mk(*args), ref(*args)) <= 1e-6
        assert torch.equal(model.state, ref.state)


def test_tiny_llama_decode_has_one_stage_between_qkv_and_attention(monkeypatch):
    model = random_llama("tiny", n_layers=2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers:
            for cache in (layer.attn.k_cache, layer.attn.v_cache):
                cache.copy_(torch.randn(cache.shape, generator=gen) * 0.5)
    tokens, pos = torch.tensor([[7]]), torch.tensor([9])
    mk, unfolded = compile_both(model, (tokens, pos), monkeypatch)
    assert stages_between(unfolded) == 2 and stages_between(mk) == 1
    attention = [i for i, op in enumerate(mk.graph.ops) if op.kind == "attention"]
    levels = op_levels(mk)
    for i in attention:  # every layer: attention one level after RoPE, two after the matmuls
        qkv = [p for p in range(i) if mk.graph.ops[p].kind == "matmul"][-3:]
        assert levels[i] == max(levels[p] for p in qkv) + 2
    # Logits against eager, kernel and VM on poisoned intermediates; both KV caches after.
    for tok, p in (([[11]], 9), ([[200]], 10)):
        args = (torch.tensor(tok), torch.tensor([p]))
        ref = copy.deepcopy(model)  # the caches as the megakernel finds them
        check_kernel_and_vm(mk, ref, args, 1e-4)
        for layer, ref_layer in zip(model.layers, ref.layers):
            assert rel_err(layer.attn.k_cache, ref_layer.attn.k_cache) <= 1e-5
            assert rel_err(layer.attn.v_cache, ref_layer.attn.v_cache) <= 1e-5
