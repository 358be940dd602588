"""Attention: the flash-style tile, GQA, masks, causal, and split-KV (flash-decoding) with its
combine step, in the interpreter kernel and the VM, against float64 eager."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

import mkcompiler
from mkcompiler.vm import run_megakernel

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


class Decode(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def reference(model, *inputs):
    return model(*(x.double() if x.is_floating_point() else x for x in inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_kv", [None, 3])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_decode_attention_with_gqa_and_split_kv(dtype, split_kv, mask_kind):
    q = torch.randn(2, 4, 1, 16, dtype=dtype)
    k, v = torch.randn(2, 2, 300, 16, dtype=dtype), torch.randn(2, 2, 300, 16, dtype=dtype)
    keep = torch.arange(300)[None, :] <= 217
    mask = keep if mask_kind == "bool" else torch.where(keep, torch.randn(1, 300), float("-inf")).to(dtype)
    mk = mkcompiler.compile(Decode(), (q, k, v, mask), split_kv=split_kv)
    kinds = [op.kind for op in mk.graph.ops]
    assert kinds == (["attention"] if split_kv is None else ["attention", "attention_combine"])
    q = torch.randn_like(q)  # fresh inputs, not the example ones
    ref = reference(Decode(), q, k, v, mask)
    mk.poison()
    assert rel_err(mk(q, k, v, mask), ref) <= TOL[dtype]
    mk.poison()
    out, _ = run_megakernel(mk, q, k, v, mask, seed=1)
    assert rel_err(out, ref) <= TOL[dtype]


def test_split_kv_is_chosen_for_long_contexts_with_few_tiles():
    q = torch.randn(1, 4, 1, 16)
    k, v = torch.randn(1, 4, 1024, 16), torch.randn(1, 4, 1024, 16)
    mask = torch.ones(1, 1024, dtype=torch.bool)
    mk = mkcompiler.compile(Decode(), (q, k, v, mask), num_workers=16)
    attn = next(op for op in mk.graph.ops if op.kind == "attention")
    assert attn.attrs.split == 4  # 4 (b, h) tiles x 4 chunks = 16 workers busy; 256 keys each
    assert rel_err(mk(q, k, v, mask), reference(Decode(), q, k, v, mask)) <= 1e-4


@pytest.mark.parametrize("split_kv", [None, 2])
def test_causal_prefill_attention(split_kv):
    q, k, v = (torch.randn(1, 2, 37, 16) for _ in range(3))
    mk = mkcompiler.compile(Causal(), (q, k, v), split_kv=split_kv)
    mk.poison()
    ref = reference(Causal(), q, k, v)
    assert rel_err(mk(q, k, v), ref) <= 1e-4
    out, _ = run_megakernel(mk, q, k, v, seed=3)
    assert rel_err(out, ref) <= 1e-4


# ---- GQA packing: a tile is a block of the packed rows (query head, position) of one kv head ----


class GQA(torch.nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, enable_gqa=True)


def make_mask(kind, b, sq, skv, dtype=torch.float32):
    """Per (batch, row) masks keeping key 0 at least (no all-masked rows: torch gives NaN there)."""
    keep = torch.rand(b, 1, sq, skv) < 0.7
    keep[..., 0] = True
    if kind == "bool":
        return keep
    return torch.where(keep, torch.randn(b, 1, sq, skv), float("-inf")).to(dtype)


def expand(intervals):
    return {i for lo, hi in intervals for i in range(lo, hi)}


def check_exact_writes(mk):
    """Every attention tile writes rows of its own: the tiles' write regions are disjoint and
    together exactly cover each output."""
    from mkcompiler.ops.base import whole
    from mkcompiler.ops.registry import FAMILIES

    for op in mk.graph.ops:
        if op.kind != "attention":
            continue
        fam = FAMILIES[op.kind]
        for i, out in enumerate(op.outputs):
            seen = set()
            for coords in fam.tiles(op):
                written = expand(fam.regions(op, coords)[1][i].intervals)
                assert written and not written & seen, coords
                seen |= written
            assert seen == expand(whole(out).intervals)


def run_and_check(model, inputs, tol=1e-4, **options):
    """Compile, then on fresh random inputs (same shapes; masks kept): the interpreter kernel and
    the VM, outputs poisoned first, against fp32 eager SDPA."""
    mk = mkcompiler.compile(model, tuple(inputs), **options)
    check_exact_writes(mk)
    fresh = [torch.randn_like(x) if x.is_floating_point() and i < 3 else x for i, x in enumerate(inputs)]
    ref = model(*fresh)
    mk.poison()
    assert rel_err(mk(*fresh), ref) <= tol
    mk.poison()
    out, _ = run_megakernel(mk, *fresh, seed=2)
    assert rel_err(out, ref) <= tol
    return mk


def attention_op(mk):
    return next(op for op in mk.graph.ops if op.kind == "attention")


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("split_kv", [None, 3])
def test_gqa_decode_packs_the_group_into_one_tile(group, mask_kind, split_kv):
    b, hkv, skv = 2, 2, 300  # 300 keys: not a multiple of BN = 128
    q = torch.randn(b, hkv * group, 1, 16)
    k, v = torch.randn(b, hkv, skv, 16), torch.randn(b, hkv, skv, 16)
    inputs = [q, k, v] + ([make_mask(mask_kind, b, 1, skv)] if mask_kind else [])
    mk = run_and_check(GQA(), inputs, split_kv=split_kv)
    op = attention_op(mk)
    assert op.attrs.tile == (16, 128) and op.attrs.group == group
    tiles = [t for t in mk.queue.descs if t.startswith(op.name + "[")]
    assert len(tiles) == b * hkv * (split_kv or 1)  # one tile per (batch, kv head, chunk)


@pytest.mark.parametrize(
    "group, sq, skv, split_kv",
    [
        (2, 37, 37, None),  # 74 packed rows: block 0 = head 0 and 27 rows of head 1
        (4, 5, 40, None),  # 20 packed rows in one block over 4 heads; more keys than queries
        (2, 5, 40, None),  # 10 packed rows: a decode-shaped tile (BM 16) over 2 heads
        (2, 37, 300, 3),  # split-KV: later chunks are past every row (top-left causal)
        (1, 70, 70, None),  # no grouping, two row blocks
    ],
)
def test_gqa_causal_prefill_with_blocks_straddling_heads(group, sq, skv, split_kv):
    b, hkv = 2, 2
    q = torch.randn(b, hkv * group, sq, 16)
    k, v = torch.randn(b, hkv, skv, 16), torch.randn(b, hkv, skv, 16)
    mk = run_and_check(GQA(causal=True), [q, k, v], split_kv=split_kv)
    op = attention_op(mk)
    bm = op.attrs.tile[0]
    assert op.attrs.group == group
    assert bm == (16 if group * sq <= 16 else 64)
    assert len([t for t in mk.queue.descs if t.startswith(op.name + "[")]) == b * hkv * -(-group * sq // bm) * (
        split_kv or 1
    )


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_gqa_prefill_with_masks(mask_kind):
    b, hkv, group, sq, skv = 2, 2, 4, 23, 90  # 92 packed rows: 2 blocks of 64, straddling heads
    q = torch.randn(b, hkv * group, sq, 16)
    k, v = torch.randn(b, hkv, skv, 16), torch.randn(b, hkv, skv, 16)
    run_and_check(GQA(), [q, k, v, make_mask(mask_kind, b, sq, skv)])


def test_automatic_split_kv_has_no_empty_chunk():
    """Llama-3.2-1B's decode attention shape, scaled down: 8 kv heads x GROUP 4, 520 keys, 132
    workers: 8 tiles, 5 chunks of 128, 128, 128, 128 and 8 keys."""
    from mkcompiler.ops.registry import FAMILIES

    q = torch.randn(1, 32, 1, 16)
    k, v = torch.randn(1, 8, 520, 16), torch.randn(1, 8, 520, 16)
    mk = run_and_check(GQA(), [q, k, v], num_workers=132)
    op = attention_op(mk)
    assert op.attrs.split == 5
    fam = FAMILIES["attention"]
    assert [fam.kv_range(op, p) for p in range(5)] == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 520)]


def test_choose_kv_splits_never_leaves_an_empty_chunk():
    from mkcompiler.ops.attention import kv_chunk
    from mkcompiler.passes.split_kv import MAX_SPLITS, choose_kv_splits

    from mkcompiler.ir.settings import Settings

    settings = Settings()
    assert choose_kv_splits(8, 520, 128, settings, 132) == 5
    assert choose_kv_splits(4, 1024, 128, settings, 16) == 4
    assert choose_kv_splits(132, 4096, 128, settings, 132) == 1  # enough tiles already
    assert choose_kv_splits(8, 520, 128, settings.replace(split_kv=7), 132) == 7  # forced: as given
    for keys in [1, 64, 127, 128, 129, 200, 255, 256, 300, 520, 1000, 1025, 4097, 32768]:
        for bn in (64, 128):
            for tiles in (1, 2, 3, 8, 33):
                for workers in (4, 16, 132):
                    p = choose_kv_splits(tiles, keys, bn, settings, workers)
                    chunk = kv_chunk(keys, p, bn)  # what Attention.kv_range and the kernel use
                    assert 1 <= p <= MAX_SPLITS and chunk % bn == 0
                    assert (p - 1) * chunk < keys <= p * chunk, (keys, bn, tiles, workers, p, chunk)
