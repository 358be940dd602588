"""Attention written out, in many spellings, compiles to what F.scaled_dot_product_attention does
(passes/canon_attention.py): the same op kinds, instruction count and dependent stages, and
eager's values (fp32, fresh inputs); and views of rank 5 (repeat_kv, heads reshaped into
groups) compile."""

import functools
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from mkcompiler.passes import canon_attention

import mkcompiler
from tests.helpers import op_structure as structure
from tests.helpers import rel_err

B, H, HK, S, D = 2, 4, 2, 8, 16
G = H // HK
L = 12  # KV-cache length (decode)


def heads_out(o):
    """[B, H, S, D] -> [B, S, H * D], as the output projection reads it."""
    return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)


# ---- prefill: causal, grouped-query ----


def canonical_prefill(q, k, v):
    return heads_out(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def repeat_kv_masked_fill(q, k, v):
    """The issue's spelling: repeat_kv by expand + reshape (a rank-5 view), / sqrt(d), a tril
    mask through masked_fill, softmax in fp32."""
    b, hk, s, d = k.shape
    k = k[:, :, None].expand(b, hk, G, s, d).reshape(b, hk * G, s, d)
    v = v[:, :, None].expand(b, hk, G, s, d).reshape(b, hk * G, s, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    scores = scores.masked_fill(~causal, float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return heads_out(p @ v)


def repeat_interleave_einsum_where(q, k, v):
    """repeat_interleave, einsum, * scale, causal by comparing positions, torch.where."""
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    pos = torch.arange(q.shape[2])
    scores = torch.where(pos[:, None] >= pos[None, :], scores, float("-inf"))
    return heads_out(torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v))


def grouped_heads_additive(q, k, v):
    """Heads reshaped into [B, Hkv, G, S, D] against unrepeated K/V, an additive triu mask."""
    b, hk, s, d = k.shape
    qg = q.view(b, hk, G, s, d)
    scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) / math.sqrt(d)
    scores = scores + torch.full((s, s), float("-inf")).triu(1)
    out = torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32), v[:, :, None])
    return heads_out(out.reshape(b, hk * G, s, d))


def bmm_finfo_min(q, k, v):
    """Heads flattened into the batch, torch.bmm, a finfo.min fill where a 0/1 mask is 0."""
    b, h, s, d = q.shape
    k = k[:, :, None].expand(b, HK, G, s, d).reshape(b * h, s, d)
    v = v[:, :, None].expand(b, HK, G, s, d).reshape(b * h, s, d)
    scores = torch.bmm(q.reshape(b * h, s, d), k.transpose(1, 2)) * (1.0 / math.sqrt(d))
    keep = torch.ones(s, s).tril()
    scores = scores.masked_fill(keep == 0, torch.finfo(scores.dtype).min)
    return heads_out(torch.bmm(torch.softmax(scores, -1), v).view(b, h, s, d))


def module(fn) -> torch.nn.Module:
    """A module whose forward is fn."""
    return type(fn.__name__, (torch.nn.Module,), {"forward": lambda self, *args: fn(*args)})()


PREFILL = [repeat_kv_masked_fill, repeat_interleave_einsum_where, grouped_heads_additive, bmm_finfo_min]


def compile_tiny(fn, args):
    return mkcompiler.compile(module(fn), args, cache=False)


@functools.cache
def _prefill_reference():
    return structure(compile_tiny(canonical_prefill, prefill_args(0)))


def prefill_args(seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) for shape in ((B, H, S, D), (B, HK, S, D), (B, HK, S, D)))


@pytest.mark.parametrize("fn", PREFILL, ids=lambda f: f.__name__)
def test_prefill_spellings_compile_as_sdpa(fn):
    mk = compile_tiny(fn, prefill_args(0))
    kinds, rows, stages = structure(mk)
    assert kinds == Counter({"attention": 1})
    assert (kinds, rows, stages) == _prefill_reference()
    (attn,) = mk.graph.ops
    assert attn.attrs.causal and attn.attrs.group == G and attn.inputs[3] is None
    args = prefill_args(1)
    mk.poison()
    assert rel_err(mk(*args), fn(*args)) <= 1e-4
    assert rel_err(mk(*args), canonical_prefill(*args)) <= 1e-4


# ---- decode with a KV cache: a runtime mask from the positions ----


class Decode(torch.nn.Module):
    """One new token per sequence written into the cache, then attention over the whole cache,
    keys past the position masked (the mask is a runtime value: the position is an input)."""

    def __init__(self, attend):
        super().__init__()
        self.attend = attend
        self.register_buffer("k_cache", torch.zeros(B, HK, L, D))
        self.register_buffer("v_cache", torch.zeros(B, HK, L, D))

    def forward(self, q, k, v, pos):
        self.k_cache[:, :, pos] = k
        self.v_cache[:, :, pos] = v
        return self.attend(q, self.k_cache, self.v_cache, pos)


def canonical_decode(q, kc, vc, pos):
    keep = pos[:, None] >= torch.arange(L)[None, :]
    return heads_out(F.scaled_dot_product_attention(q, kc, vc, attn_mask=keep, enable_gqa=True))


def decode_masked_fill_not(q, kc, vc, pos):
    keep = pos[:, None] >= torch.arange(L)[None, :]
    kc, vc = kc.repeat_interleave(G, 1), vc.repeat_interleave(G, 1)
    scores = (q @ kc.transpose(2, 3)) / math.sqrt(D)
    return heads_out(torch.softmax(scores.masked_fill(~keep, float("-inf")).float(), -1) @ vc)


def decode_where_keep(q, kc, vc, pos):
    keep = pos[:, None] >= torch.arange(L)[None, :]
    kc = kc[:, :, None].expand(B, HK, G, L, D).reshape(B, H, L, D)
    vc = vc[:, :, None].expand(B, HK, G, L, D).reshape(B, H, L, D)
    scores = torch.matmul(q, kc.transpose(-1, -2)) * (1 / math.sqrt(D))
    return heads_out(torch.matmul(torch.where(keep, scores, float("-inf")).softmax(-1), vc))


def decode_position_comparison(q, kc, vc, pos):
    future = torch.arange(L)[None, :] > pos[:, None]
    qg = q.reshape(B, HK, G, 1, D)
    scores = torch.einsum("bkgqd,bkld->bkgql", qg, kc) / D**0.5
    p = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return heads_out(torch.einsum("bkgql,bkld->bkgqd", p, vc).reshape(B, H, 1, D))


def decode_grouped_bmm(q, kc, vc, pos):
    keep = pos[:, None] >= torch.arange(L)[None, :]
    kc, vc = kc.repeat_interleave(G, 1), vc.repeat_interleave(G, 1)
    scores = torch.bmm(q.reshape(B * H, 1, D), kc.reshape(B * H, L, D).transpose(1, 2)).view(B, H, 1, L)
    scores = scores.div(math.sqrt(D)).masked_fill(keep.logical_not(), float("-inf"))
    return heads_out(torch.bmm(scores.softmax(-1).view(B * H, 1, L), vc.reshape(B * H, L, D)).view(B, H, 1, D))


DECODE = [decode_masked_fill_not, decode_where_keep, decode_position_comparison, decode_grouped_bmm]


def decode_args(seed, pos):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, 1, D), (B, HK, 1, D), (B, HK, 1, D))
    return (*(torch.randn(s, generator=g) for s in shapes), torch.tensor([pos]))


def _decode_cache(model):
    g = torch.Generator().manual_seed(7)
    model.k_cache.copy_(torch.randn(model.k_cache.shape, generator=g))
    model.v_cache.copy_(torch.randn(model.v_cache.shape, generator=g))


@functools.cache
def _decode_reference():
    model = Decode(canonical_decode)
    return structure(mkcompiler.compile(model, decode_args(0, 3), cache=False))


@pytest.mark.parametrize("attend", DECODE, ids=lambda f: f.__name__)
def test_decode_spellings_compile_as_sdpa(attend):
    model = Decode(attend)
    mk = mkcompiler.compile(model, decode_args(0, 3), cache=False)
    kinds, rows, stages = structure(mk)
    assert kinds["attention"] == 1 and kinds["matmul"] == 0 and kinds["softmax"] == 0
    assert (kinds, rows, stages) == _decode_reference()
    (attn,) = [op for op in mk.graph.ops if op.kind == "attention"]
    # G query heads per kv head: grouped (group G), or packed as G query rows of one head (einsum
    # folds the group into the rows when K does not depend on it): the same tiles either way.
    assert attn.inputs[1].shape[1] == HK and attn.attrs.group * attn.inputs[0].shape[2] == G
    assert not attn.attrs.causal
    eager = Decode(attend)
    for pos in (5, 9):
        _decode_cache(model)
        _decode_cache(eager)
        args = decode_args(pos, pos)
        mk.poison()
        assert rel_err(mk(*args), eager(*args)) <= 1e-4
        assert torch.equal(model.k_cache, eager.k_cache)


class SharedDropMask(torch.nn.Module):
    """Two decode layers (each appending to its own caches) reading one drop mask built once,
    `future = arange > pos`, through masked_fill (written) or its negation as SDPA's keep mask
    (canonical); the second layer's queries are the first layer's output."""

    def __init__(self, written: bool):
        super().__init__()
        self.written = written
        for name in ("k0", "v0", "k1", "v1"):
            self.register_buffer(name, torch.zeros(B, HK, L, D))

    def layer(self, q, k, v, kc, vc, pos, mask):
        kc[:, :, pos] = k
        vc[:, :, pos] = v
        if not self.written:
            return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
        kc, vc = kc.repeat_interleave(G, 1), vc.repeat_interleave(G, 1)
        scores = (q @ kc.transpose(-1, -2) / math.sqrt(D)).masked_fill(mask, float("-inf"))
        return torch.softmax(scores, -1) @ vc

    def forward(self, q, k, v, pos):
        future = torch.arange(L)[None, :] > pos[:, None]
        mask = future if self.written else ~future  # SDPA's keep mask: negated once, before the layers
        o = self.layer(q, k, v, self.k0, self.v0, pos, mask)
        return heads_out(self.layer(o, k * 2.0, v, self.k1, self.v1, pos, mask))


def test_a_drop_mask_shared_by_layers_is_negated_once():
    """canon_attention negates a drop mask once per mask, not once per layer: the comparison and
    its negation are then one op, as SDPA's keep mask is (the same structure), and eager's values."""
    structures = []
    for written in (False, True):
        model = SharedDropMask(written)
        _decode_cache_of(model)
        mk = mkcompiler.compile(model, decode_args(0, 3), cache=False)
        structures.append(structure(mk))
    kinds, _, _ = structures[1]
    assert (
        kinds["attention"] == 2 and kinds["softmax"] == 0 and kinds["elementwise"] == 1
    )  # the mask (k * 2 goes into its scatter)
    assert structures[1] == structures[0]
    eager = SharedDropMask(True)
    for pos in (4, 10):
        _decode_cache_of(model)
        _decode_cache_of(eager)
        args = decode_args(pos, pos)
        mk.poison()
        assert rel_err(mk(*args), eager(*args)) <= 1e-4
        assert rel_err(model.k1, eager.k1) <= 1e-6


def _decode_cache_of(model):
    g = torch.Generator().manual_seed(7)
    for cache in model.buffers():
        cache.copy_(torch.randn(cache.shape, generator=g))


# ---- views of rank 5 that no attention consumes ----


class RepeatKV(torch.nn.Module):
    """repeat_kv of V straight from its projection (a transposed view): the copy reads a rank-5
    view that no 4 dims express; it is returned and used, so nothing removes it."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(HK * D, HK * D, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        v = self.proj(x).view(b, s, HK, D).transpose(1, 2)
        rep = v[:, :, None].expand(b, HK, G, s, D).reshape(b, HK * G, s, D)
        return rep * 2.0, (rep[:, :, None] * v[:, None]).sum(-1)


def test_rank5_views_compile_and_match():
    torch.manual_seed(0)
    model = RepeatKV()
    mk = mkcompiler.compile(model, (torch.randn(2, S, HK * D),), cache=False)
    x = torch.randn(2, S, HK * D)
    mk.poison()
    for got, want in zip(mk(x), model(x)):
        assert rel_err(got, want) <= 1e-5


def test_collapse_splits_only_what_four_dims_cannot_express():
    from mkcompiler.ops.elementwise import ElementwiseAttrs

    from mkcompiler.ir.graph import Graph

    graph = Graph()
    src = graph.new_tensor("v", (2, 8, 2, 16), torch.float32).permute((0, 2, 1, 3))  # [b, hk, s, d] transposed
    out = graph.new_tensor("rep", (2, 2, 2, 8, 16), torch.float32)
    copy = ("op", "copy", torch.float32, ("in", 0))
    from mkcompiler.ir.graph import OpNode

    graph.ops = [OpNode("elementwise", (src.unsqueeze(2).expand(out.shape),), (out,), ElementwiseAttrs(copy))]
    pieces = canon_attention.collapse_high_rank(graph).ops
    assert len(pieces) == 2  # the group dim (size 2) is split off
    assert all(v.coalesced().rank <= 4 for op in pieces for v in (*op.inputs, *op.outputs))
    covered = sorted(int(o) for op in pieces for o in op.outputs[0].offsets())
    assert covered == list(range(out.numel))
