"""RoPE in many spellings (rotate-half, interleaved pairs, complex multiply) compiles to what the
canonical spelling (HF's apply_rotary_pos_emb, examples/llama.py) does: the same op kinds,
instruction count and dependent stages (passes/canon_rope.py, frontend/complex_values.py), and
each spelling's own eager values (fp32, fresh inputs, runtime positions)."""

import copy
import functools
from collections import Counter

import pytest
import torch

import mkcompiler
from mkcompiler.errors import UnsupportedOpError
from tests.helpers import op_structure as structure
from tests.helpers import rel_err

B, S, H, D = 1, 4, 2, 16  # batch 1: see test_batched_pairs_compile_and_match
P = D // 2


# Each spelling: (x [B, H, S, D], angles [S, D/2] = position * inverse frequency) -> rotated x.

# ---- rotate-half: x[i] pairs with x[i + D/2] ----


def canonical(x, f):
    """HF Llama's apply_rotary_pos_emb: tables over D by cat, rotate_half by slicing."""
    emb = torch.cat((f, f), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def half_chunk(x, f):
    emb = torch.cat([f] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos) + (torch.cat((x2.neg(), x1), dim=x.ndim - 1) * sin)


def half_split(x, f):
    emb = torch.cat((f, f), dim=-1)
    x1, x2 = torch.split(x, P, dim=-1)
    return torch.cat((-x2, x1), -1) * emb.sin() + x * emb.cos()


def half_unbind(x, f):
    emb = torch.cat((f, f), dim=-1)
    x1, x2 = x.reshape(*x.shape[:-1], 2, P).unbind(-2)
    return x * emb.cos() + torch.cat((-x2, x1), -1) * emb.sin()


def half_written_out(x, f):
    """Each half's formula, then one cat (no rotate_half, tables over D/2)."""
    cos, sin = f.cos(), f.sin()
    x1, x2 = x[..., :P], x[..., P:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---- interleaved: x[2i] pairs with x[2i + 1] ----


def rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def pairs_gptj(x, f):
    """GPT-J: tables repeated per pair, rotate_every_two."""
    cos, sin = f.cos().repeat_interleave(2, dim=-1), f.sin().repeat_interleave(2, dim=-1)
    return x * cos + rotate_every_two(x) * sin


def pairs_strided(x, f):
    cos, sin = f.cos(), f.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def pairs_unbind(x, f):
    cos, sin = f.cos(), f.sin()
    x0, x1 = x.reshape(*x.shape[:-1], P, 2).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), -1).flatten(-2)


def pairs_indexed(x, f):
    """Pairs by indexing the reshaped last dim; the stack reshaped back to x's shape."""
    cos, sin = f.cos()[..., None], f.sin()[..., None]
    xp = x.reshape(*x.shape[:-1], P, 2)
    rot = torch.stack((-xp[..., 1], xp[..., 0]), dim=-1)
    return (xp * cos + rot * sin).reshape(x.shape)


# ---- complex multiply: the pairs as complex numbers ----


def complex_llama2(x, f):
    """Llama-2's reference: freqs_cis by polar, view_as_complex of the float pairs, view_as_real,
    flatten(3), type_as."""
    freqs_cis = torch.polar(torch.ones_like(f), f)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis).flatten(3).type_as(x)


def complex_from_parts(x, f):
    freqs_cis = torch.complex(f.cos(), f.sin())
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], P, 2))
    return torch.view_as_real(freqs_cis * xc).reshape(x.shape)


def complex_broadcast(x, f):
    """freqs_cis reshaped for broadcasting (reshape_for_broadcast) and multiplied as [S, D/2]."""
    b, h, s, d = x.shape
    freqs_cis = torch.polar(torch.ones_like(f), f).view(1, 1, s, d // 2)
    xc = torch.view_as_complex(x.view(b, h, s, d // 2, 2).contiguous())
    return torch.view_as_real(xc * freqs_cis).view(b, h, s, d)


def complex_unsqueezed(x, f):
    """Complex pairs built per component, freqs_cis unsqueezed; the result read as real pairs."""
    freqs_cis = torch.polar(torch.ones_like(f), f).unsqueeze(0).unsqueeze(0)
    xc = torch.view_as_complex(x.float().unflatten(-1, (P, 2)))
    out = xc * freqs_cis
    return torch.view_as_real(out).flatten(-2)


class RotaryProjection(torch.nn.Module):
    """q = rope(W x) per head, then an output projection: RoPE between two matmuls, the angles
    from runtime positions."""

    def __init__(self, rope, batch=B):
        super().__init__()
        self.rope, self.batch = rope, batch
        self.wq = torch.nn.Linear(H * D, H * D, bias=False)
        self.wo = torch.nn.Linear(H * D, H * D, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D), persistent=False)

    def forward(self, x, pos):
        q = self.wq(x).view(self.batch, S, H, D).transpose(1, 2)
        q = self.rope(q, pos.float()[:, None] * self.inv_freq[None, :])
        return self.wo(q.transpose(1, 2).reshape(self.batch, S, H * D))


def example(seed: int, batch=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, S, H * D, generator=g), torch.arange(seed, seed + S)


def compiled(rope, batch=B):
    torch.manual_seed(0)
    model = RotaryProjection(rope, batch)
    return model, mkcompiler.compile(model, example(3, batch), cache=False)


@functools.cache
def reference():
    return structure(compiled(canonical)[1])


HALF = [half_chunk, half_split, half_unbind, half_written_out]
PAIRS = [pairs_gptj, pairs_strided, pairs_unbind, pairs_indexed]
COMPLEX = [complex_llama2, complex_from_parts, complex_broadcast, complex_unsqueezed]


@pytest.mark.parametrize("rope", [canonical, *HALF, *PAIRS, *COMPLEX], ids=lambda f: f.__name__)
def test_every_spelling_compiles_like_the_canonical_one(rope):
    model, mk = compiled(rope)
    kinds, rows, stages = structure(mk)
    assert kinds == Counter({"matmul": 2, "elementwise": 1})  # RoPE fused into one op between the matmuls
    assert (kinds, rows, stages) == reference()
    for seed in (7, 30):  # new inputs and positions, same megakernel
        args = example(seed)
        mk.poison()
        assert rel_err(mk(*args), model(*args)) <= 1e-4


@pytest.mark.parametrize("rope", [pairs_strided, complex_llama2], ids=lambda f: f.__name__)
def test_batched_pairs_compile_and_match(rope):
    """Batch, positions and heads all > 1: an interleaved table read in the output projection's
    [B, S, H, D/2, 2] order needs 5 dims, more than an instruction row has, so the pairs stay
    unfused there (passes/canon_rope._fits); they still compile and match."""
    model, mk = compiled(rope, batch=2)
    args = example(11, batch=2)
    mk.poison()
    assert rel_err(mk(*args), model(*args)) <= 1e-4


def test_the_forms_differ():
    """Rotate-half and interleaved pairs rotate different pairs, so the test above tells them
    apart; the complex product is the interleaved form."""
    g = torch.Generator().manual_seed(0)
    x, f = torch.randn(B, H, S, D, generator=g), torch.randn(S, P, generator=g)
    assert rel_err(canonical(x, f), pairs_strided(x, f)) > 0.1
    assert rel_err(complex_llama2(x, f), pairs_strided(x, f)) <= 1e-6


class Llama2Rope(torch.nn.Module):
    """Llama-2's reference as written: a complex freqs_cis attribute (not a parameter) sliced at
    a Python start position, q and k rotated in [B, S, H, D] before the transpose."""

    def __init__(self, start=5):
        super().__init__()
        self.start = start
        t = torch.arange(32).float()
        freqs = torch.outer(t, 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D))
        self.freqs_cis = torch.polar(torch.ones_like(freqs), freqs)  # complex64
        self.wq = torch.nn.Linear(H * D, H * D, bias=False)

    def forward(self, x):
        xq = self.wq(x).view(B, S, H, D)
        freqs_cis = self.freqs_cis[self.start : self.start + S].view(1, S, 1, P)
        xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
        return torch.view_as_real(xq_ * freqs_cis).flatten(3).type_as(xq).transpose(1, 2)


def test_complex_constant_table_compiles_and_matches():
    torch.manual_seed(0)
    model = Llama2Rope()
    x = torch.randn(B, S, H * D)
    mk = mkcompiler.compile(model, (x,), cache=False)
    assert {op.kind for op in mk.graph.ops} == {"matmul", "elementwise"}
    x = torch.randn(B, S, H * D)
    mk.poison()
    assert rel_err(mk(x), model(x)) <= 1e-4


class ComplexOut(torch.nn.Module):
    def forward(self, x):
        return torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * 2.0


def test_a_complex_output_is_refused_clearly():
    with pytest.raises(UnsupportedOpError, match="complex model output"):
        mkcompiler.compile(ComplexOut(), (torch.randn(2, 8),), cache=False)


# ---- q and k rotated, k stored in a KV cache, attention reading q (decode and prefill) ----

HK, L = 1, 12  # kv heads (H query heads share them), cache length


class RotaryCachedAttention(torch.nn.Module):
    """One attention layer: q and k rotated in [B, H, S, D], k appended to the KV cache (a scatter
    reading the rotated k), attention reading the rotated q and the caches, keys past each
    position masked; the angles from runtime positions."""

    def __init__(self, rope, batch):
        super().__init__()
        self.rope = rope
        self.wq = torch.nn.Linear(H * D, H * D, bias=False)
        self.wk = torch.nn.Linear(H * D, HK * D, bias=False)
        self.wv = torch.nn.Linear(H * D, HK * D, bias=False)
        self.wo = torch.nn.Linear(H * D, H * D, bias=False)
        self.register_buffer("k_cache", torch.zeros(batch, HK, L, D))
        self.register_buffer("v_cache", torch.zeros(batch, HK, L, D))
        self.register_buffer("inv_freq", 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D), persistent=False)

    def forward(self, x, pos):
        b, s, _ = x.shape
        f = pos.float()[:, None] * self.inv_freq[None, :]
        q = self.rope(self.wq(x).view(b, s, H, D).transpose(1, 2), f)
        k = self.rope(self.wk(x).view(b, s, HK, D).transpose(1, 2), f)
        self.k_cache[:, :, pos] = k
        self.v_cache[:, :, pos] = self.wv(x).view(b, s, HK, D).transpose(1, 2)
        keep = pos[:, None] >= torch.arange(L)[None, :]
        o = torch.nn.functional.scaled_dot_product_attention(
            q, self.k_cache, self.v_cache, attn_mask=keep, enable_gqa=True
        )
        return self.wo(o.transpose(1, 2).reshape(b, s, H * D))


def cached_example(step: str, batch: int, seed: int):
    """(x, positions): a prefill of S tokens from position 0, or one decode token later on."""
    g = torch.Generator().manual_seed(seed)
    s, start = (S, 0) if step == "prefill" else (1, S + seed % (L - S))
    return torch.randn(batch, s, H * D, generator=g), torch.arange(start, start + s)


def cached_model(rope, batch: int):
    torch.manual_seed(0)
    model = RotaryCachedAttention(rope, batch)
    g = torch.Generator().manual_seed(1)
    for cache in (model.k_cache, model.v_cache):
        cache.copy_(torch.randn(cache.shape, generator=g))
    return model


@functools.cache
def cached_reference(step: str, batch: int):
    model = cached_model(canonical, batch)
    return structure(mkcompiler.compile(model, cached_example(step, batch, 0), cache=False))


CACHED = [(pairs_strided, "decode", 1), (pairs_strided, "prefill", 1), (complex_llama2, "decode", 2)]
CACHED += [(complex_llama2, "prefill", 1)]


@pytest.mark.parametrize(
    "rope, step, batch", CACHED, ids=lambda a: a.__name__ if callable(a) else f"batch{a}" if isinstance(a, int) else a
)
def test_rotated_k_in_the_cache_and_q_in_attention_compile_like_rotate_half(rope, step, batch):
    """The interleaved pairs of k go into the KV-cache scatter (passes/canon_rope.split_scatter,
    then fuse.fold_cats; with batch > 1, batch and kv heads walked as one dim of the scatter),
    those of q into one op that attention reads (fuse.fold_cats merges interleaved pieces no
    reader can take): rotate-half's op kinds, instructions and stages, and eager's values."""
    model = cached_model(rope, batch)
    eager = copy.deepcopy(model)
    mk = mkcompiler.compile(model, cached_example(step, batch, 0), cache=False)
    kinds, rows, stages = structure(mk)
    assert kinds == Counter({"matmul": 4, "elementwise": 2, "scatter": 2, "attention": 1})
    assert (kinds, rows, stages) == cached_reference(step, batch)
    (scatter_k, _) = [op for op in mk.graph.ops if op.kind == "scatter"]
    assert scatter_k.attrs.expr is not None  # k rotated where it is stored
    for seed in (5, 9):
        args = cached_example(step, batch, seed)
        mk.poison()
        assert rel_err(mk(*args), eager(*args)) <= 1e-4
        assert rel_err(model.k_cache, eager.k_cache) <= 1e-5
        assert rel_err(model.v_cache, eager.v_cache) <= 1e-5
