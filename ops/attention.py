"""Scaled dot-product attention (aten.scaled_dot_product_attention, kept whole at capture).

q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] with Hq = G x Hkv (grouped-query: head h reads kv head
h // G), an optional mask (bool: keep where true; float: added to the scores) broadcast to
[B, Hq, Sq, Skv], causal (top-left aligned, as torch) or not.

A tile (b, hk, m, p) is a flash-style sweep over BN-key blocks (of key chunk p, split-KV) with an
online softmax in fp32, for block m of BM rows in the *packed* rows of (batch b, kv head hk):
packed row r in [0, G x Sq) is query position r % Sq of query head hk x G + r // Sq. All G query
heads sharing a kv head share its K/V loads (at decode, Sq = 1, one tile covers them all); in
prefill a block stays in one head when BM divides Sq, else it straddles heads (still correct).
Rows whose every key is masked produce 0 (torch gives NaN there).

Paged attention (PagedAttention, the custom op mkcompiler::paged_attention; see its section
below) is the same sweep with keys and values read through page tables (mkcompiler/serve).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from mkcompiler.ops.base import (
    Access,
    OpFamily,
    Work,
    aligned,
    box_access,
    cdiv,
    merge_intervals,
    next_pow2,
    tl_dtype,
    whole,
)
from mkcompiler.ops.common import aligned_stride, arg, view_base, view_base_aligned, view_size, view_stride
from mkcompiler.ops.registry import family, lowers

from mkcompiler.ir.graph import View

aten = torch.ops.aten


@triton.jit
def head_rows(addrs_ptr, views_ptr, v, b, h, qi, DT: tl.constexpr, AL: tl.constexpr):
    """(base pointer, element offset of each row) for rows (b, h[r], qi[r]) of a [B, H, S, D]
    view. AL: the view is 16-byte aligned (Attention.key) and the strides are written so that
    Triton sees it. The base is returned apart from the offsets: folded into one scalar add,
    view_base_aligned's hint would be lost (Triton merges consecutive pointer adds)."""
    if AL:
        base = view_base_aligned(addrs_ptr, views_ptr, v, DT)
        rows = (
            b * aligned_stride(view_stride(views_ptr, v, 0), 128 // DT.primitive_bitwidth)
            + h * aligned_stride(view_stride(views_ptr, v, 1), 128 // DT.primitive_bitwidth)
            + qi * aligned_stride(view_stride(views_ptr, v, 2), 128 // DT.primitive_bitwidth)
        )
    else:
        base = view_base(addrs_ptr, views_ptr, v, DT)
        rows = b * view_stride(views_ptr, v, 0) + h * view_stride(views_ptr, v, 1) + qi * view_stride(views_ptr, v, 2)
    return base, rows


@triton.jit
def head_block(addrs_ptr, views_ptr, v, b, h, DT: tl.constexpr, AL: tl.constexpr):
    """(base pointer, offset of head (b, h), stride along S) of a [B, H, S, D] view (K or V);
    AL as in head_rows."""
    if AL:
        base = view_base_aligned(addrs_ptr, views_ptr, v, DT)
        off = b * aligned_stride(view_stride(views_ptr, v, 0), 128 // DT.primitive_bitwidth) + h * aligned_stride(
            view_stride(views_ptr, v, 1), 128 // DT.primitive_bitwidth
        )
        s2 = aligned_stride(view_stride(views_ptr, v, 2), 128 // DT.primitive_bitwidth)
    else:
        base = view_base(addrs_ptr, views_ptr, v, DT)
        off = b * view_stride(views_ptr, v, 0) + h * view_stride(views_ptr, v, 1)
        s2 = view_stride(views_ptr, v, 2)
    return base, off, s2


@triton.jit
def attention_tile(
    row_ptr,
    addrs_ptr,
    views_ptr,
    Q_DT: tl.constexpr,
    K_DT: tl.constexpr,
    V_DT: tl.constexpr,
    M_DT: tl.constexpr,
    O_DT: tl.constexpr,
    DOT_DT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    CAUSAL: tl.constexpr,
    SCALE: tl.constexpr,
    GROUP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    SPLIT: tl.constexpr,
    Q_UNIT: tl.constexpr,
    K_UNIT: tl.constexpr,
    V_UNIT: tl.constexpr,
    M_UNIT: tl.constexpr,
    O_UNIT: tl.constexpr,
    Q_AL: tl.constexpr,
    K_AL: tl.constexpr,
    V_AL: tl.constexpr,
    O_AL: tl.constexpr,
    D_EXACT: tl.constexpr,
    STAGES: tl.constexpr,
):
    # X_UNIT: the last dim of X has stride 1 (known when the op was keyed): a literal 1 lets
    # Triton vectorise the loads of a head's D elements (runtime strides would hide it).
    # X_AL: X (unit last dim) starts 16-byte aligned with every other stride a multiple of 16
    # bytes, and D_EXACT: the head dim is BD (no mask along it): with both, Triton can prove the
    # 16-byte alignment it needs for wide loads (without: one 2-byte load per element).
    vq = arg(row_ptr, 0)
    vk = arg(row_ptr, 1)
    vv = arg(row_ptr, 2)
    vm = arg(row_ptr, 3)
    vo = arg(row_ptr, 4)
    b = arg(row_ptr, 5)
    hk = arg(row_ptr, 6)  # kv head: the tile's rows are the packed rows of its GROUP query heads
    mb = arg(row_ptr, 7)
    part = arg(row_ptr, 8)  # split-KV: which chunk of the keys (0 without a split)
    vml = arg(row_ptr, 9)  # split-KV: [P*B, H, Sq, 2] fp32 running max and sum per chunk
    Sq = view_size(views_ptr, vq, 2)
    D = view_size(views_ptr, vq, 3)
    Skv = view_size(views_ptr, vk, 2)
    # Packed row r of kv head hk is query position r % Sq of query head hk * GROUP + r // Sq.
    rows = mb * BM + tl.arange(0, BM)
    if GROUP == 1:
        row_ok = rows < Sq
        h = hk + tl.zeros([BM], tl.int32)
        qi = rows
    else:
        row_ok = rows < GROUP * Sq
        h = hk * GROUP + rows // Sq
        qi = rows % Sq
    d = tl.arange(0, BD)
    if D_EXACT:
        d_ok = tl.full([BD], 1, tl.int1)
    else:
        d_ok = d < D
    q_ptr, q_rows = head_rows(addrs_ptr, views_ptr, vq, b, h, qi, Q_DT, Q_AL)
    sq3 = 1 if Q_UNIT else view_stride(views_ptr, vq, 3)
    q = tl.load(
        q_ptr + (q_rows[:, None] + d[None, :] * sq3),
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q = (q.to(tl.float32) * SCALE).to(DOT_DT)
    k_ptr, k_off, sk2 = head_block(addrs_ptr, views_ptr, vk, b, hk, K_DT, K_AL)
    v_ptr, v_off, sv2 = head_block(addrs_ptr, views_ptr, vv, b, hk, V_DT, V_AL)
    sk3 = 1 if K_UNIT else view_stride(views_ptr, vk, 3)
    sv3 = 1 if V_UNIT else view_stride(views_ptr, vv, 3)
    if HAS_MASK:
        m_rows = (
            view_base(addrs_ptr, views_ptr, vm, M_DT)
            + b * view_stride(views_ptr, vm, 0)
            + h * view_stride(views_ptr, vm, 1)
            + qi * view_stride(views_ptr, vm, 2)
        )
        sm3 = 1 if M_UNIT else view_stride(views_ptr, vm, 3)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    kv_lo = 0
    kv_end = Skv
    if SPLIT:  # the chunks of Attention.kv_range
        B = view_size(views_ptr, vq, 0)
        chunk = tl.cdiv(tl.cdiv(Skv, view_size(views_ptr, vml, 0) // B), BN) * BN
        kv_lo = part * chunk
        kv_end = tl.minimum(Skv, kv_lo + chunk)
    if CAUSAL:  # no row of the tile sees a key past its last query position
        kv_end = tl.minimum(kv_end, tl.max(tl.where(row_ok, qi, 0), axis=0) + 1)
    # K, V and mask blocks are loaded at the top of the step, independent of the softmax state,
    # so the compiler's software pipeline can fetch step i+1 while step i computes.
    for n0 in tl.range(kv_lo, kv_end, BN, num_stages=STAGES):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < Skv
        k = tl.load(
            k_ptr + (k_off + cols[None, :] * sk2 + d[:, None] * sk3), mask=d_ok[:, None] & col_ok[None, :], other=0.0
        )
        v = tl.load(
            v_ptr + (v_off + cols[:, None] * sv2 + d[None, :] * sv3), mask=col_ok[:, None] & d_ok[None, :], other=0.0
        )
        keep = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= qi[:, None])
        s = tl.dot(q, k.to(DOT_DT), input_precision="ieee")
        if HAS_MASK:
            mval = tl.load(m_rows[:, None] + cols[None, :] * sm3, mask=keep, other=0)
            if MASK_BOOL:
                keep = keep & (mval != 0)
            else:
                s = s + mval.to(tl.float32)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing kept yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), v.to(DOT_DT), input_precision="ieee")
        m_i = m_new
    if SPLIT:  # unnormalised partial; attention_combine merges the chunks
        out = acc
        ob = part * view_size(views_ptr, vq, 0) + b
        ml_ptr = (
            view_base(addrs_ptr, views_ptr, vml, tl.float32)
            + ob * view_stride(views_ptr, vml, 0)
            + h * view_stride(views_ptr, vml, 1)
            + qi * view_stride(views_ptr, vml, 2)
        )
        tl.store(ml_ptr, m_i, mask=row_ok)
        tl.store(ml_ptr + view_stride(views_ptr, vml, 3), l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        ob = b
    o_ptr, o_rows = head_rows(addrs_ptr, views_ptr, vo, ob, h, qi, O_DT, O_AL)
    so3 = 1 if O_UNIT else view_stride(views_ptr, vo, 3)
    tl.store(
        o_ptr + (o_rows[:, None] + d[None, :] * so3),
        out.to(O_DT),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def attention_combine_rows(row_ptr, addrs_ptr, views_ptr, O_DT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """out[b, h] = sum_p exp(m_p - M) acc_p / sum_p exp(m_p - M) l_p over the split-KV chunks."""
    vpart = arg(row_ptr, 0)  # [P*B, H, Sq, D] fp32 unnormalised partial outputs
    vml = arg(row_ptr, 1)  # [P*B, H, Sq, 2] fp32 (max, sum) per chunk
    vo = arg(row_ptr, 2)  # [B, H, Sq, D]
    b = arg(row_ptr, 3)
    h = arg(row_ptr, 4)
    B = view_size(views_ptr, vo, 0)
    P = view_size(views_ptr, vml, 0) // B
    Sq = view_size(views_ptr, vo, 2)
    D = view_size(views_ptr, vo, 3)
    rows = tl.arange(0, BM)
    d = tl.arange(0, BD)
    row_ok = rows < Sq
    mask = row_ok[:, None] & (d[None, :] < D)
    ml_base = view_base(addrs_ptr, views_ptr, vml, tl.float32) + h * view_stride(views_ptr, vml, 1)
    p_base = view_base(addrs_ptr, views_ptr, vpart, tl.float32) + h * view_stride(views_ptr, vpart, 1)
    big = tl.full([BM], float("-inf"), tl.float32)
    for p in range(0, P):
        ml = ml_base + (p * B + b) * view_stride(views_ptr, vml, 0) + rows * view_stride(views_ptr, vml, 2)
        big = tl.maximum(big, tl.load(ml, mask=row_ok, other=float("-inf")))
    big = tl.where(big == float("-inf"), 0.0, big)
    acc = tl.zeros([BM, BD], tl.float32)
    total = tl.zeros([BM], tl.float32)
    for p in range(0, P):
        ml = ml_base + (p * B + b) * view_stride(views_ptr, vml, 0) + rows * view_stride(views_ptr, vml, 2)
        w = tl.exp(tl.load(ml, mask=row_ok, other=float("-inf")) - big)
        total += w * tl.load(ml + view_stride(views_ptr, vml, 3), mask=row_ok, other=0.0)
        part = p_base + (p * B + b) * view_stride(views_ptr, vpart, 0)
        offs = rows[:, None] * view_stride(views_ptr, vpart, 2) + d[None, :] * view_stride(views_ptr, vpart, 3)
        acc += w[:, None] * tl.load(part + offs, mask=mask, other=0.0)
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    o_ptr = (
        view_base(addrs_ptr, views_ptr, vo, O_DT)
        + b * view_stride(views_ptr, vo, 0)
        + h * view_stride(views_ptr, vo, 1)
    )
    offs = rows[:, None] * view_stride(views_ptr, vo, 2) + d[None, :] * view_stride(views_ptr, vo, 3)
    tl.store(o_ptr + offs, out.to(O_DT), mask=mask)


def _as_4d(ctx, node, v: View, what: str) -> View:
    if v.rank == 4:
        return v
    if v.rank == 3:
        return v.unsqueeze(0)
    ctx.unsupported(node, f"attention with a rank-{v.rank} {what}")


@lowers(aten.scaled_dot_product_attention.default)
def lower_sdpa(ctx, node, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p:
        ctx.unsupported(node, "attention with dropout")
    q4, k4, v4 = (_as_4d(ctx, node, t, n) for t, n in ((q, "query"), (k, "key"), (v, "value")))
    hq, hk = q4.shape[1], k4.shape[1]
    if hq % hk:
        ctx.unsupported(node, f"attention with {hq} query heads over {hk} key heads")
    k4, v4, hk = _ungroup(ctx, k4), _ungroup(ctx, v4), None
    if attn_mask is not None:
        attn_mask = attn_mask.expand((q4.shape[0], hq, q4.shape[2], k4.shape[2]))
    # Stored as [B, Sq, H, D] (what the output projection reads after transpose(1, 2)), seen
    # here as [B, H, Sq, D]: the usual transpose + reshape that follows is then a free view.
    b, h, sq, dv = q4.shape[0], q4.shape[1], q4.shape[2], v4.shape[3]
    out = ctx.graph.new_tensor(node.name, (b, sq, h, dv), node.meta["val"].dtype).permute((0, 2, 1, 3))
    scale = 1.0 / math.sqrt(q4.shape[3]) if scale is None else float(scale)
    attrs = AttentionAttrs(scale=scale, causal=bool(is_causal), group=hq // k4.shape[1])
    ctx.emit(node, "attention", (q4, k4, v4, attn_mask), (out,), attrs)
    return out.reshape(tuple(node.meta["val"].shape))


def _ungroup(ctx, kv: View) -> View:
    """Undo repeat_kv: if kv is a copy of an expanded [B, Hkv, G, S, D] view, read the source
    (G heads share one kv head) instead of the copy; the copy then dies (dead-op pass)."""
    op = next((o for o in ctx.graph.ops if o.outputs[0].buffer == kv.buffer and o.kind == "elementwise"), None)
    if op is None or op.attrs.expr[1] != "copy" or len(op.inputs) != 1:
        return kv
    src = op.inputs[0]
    if src.rank == 5 and src.strides[2] == 0 and kv.shape[1] == src.shape[1] * src.shape[2]:
        return src.select(2, 0)
    return kv


@dataclass
class AttentionAttrs:
    scale: float
    causal: bool
    group: int  # query heads per kv head
    tile: tuple[int, int] | None = None  # (BM, BN) (passes/tile.py)
    stages: int | None = None  # software pipeline stages of the key loop (passes/tile.py, split_kv.py)
    dot: torch.dtype | None = None  # tl.dot's operand dtype (passes/tile.py)
    split: int = 1  # key chunks (passes/split_kv.py)


class AttentionKey(NamedTuple):
    kind: str
    q: torch.dtype
    k: torch.dtype
    v: torch.dtype
    mask: torch.dtype | None
    out: torch.dtype
    dot: torch.dtype
    causal: bool
    scale: float
    group: int
    bm: int
    bn: int
    bd: int
    split: bool
    units: tuple[bool, ...]  # attention_tile's Q_UNIT .. D_EXACT, in its order
    stages: int


@family
class Attention(OpFamily):
    """Outputs: (out,) or, split over the keys (passes/split_kv.py), (partials, max_and_sum)."""

    kind = "attention"
    routines = ("attention_tile",)

    def splits(self, node) -> int:
        return node.attrs.split

    def key(self, node):
        q, k, v, mask = node.inputs
        bm, bn = node.attrs.tile
        return AttentionKey(
            self.kind,
            q.dtype,
            k.dtype,
            v.dtype,
            mask.dtype if mask is not None else None,
            node.outputs[0].dtype,
            node.attrs.dot,
            node.attrs.causal,
            node.attrs.scale,
            node.attrs.group,
            bm,
            bn,
            max(16, next_pow2(q.shape[3])),
            self.splits(node) > 1,
            tuple(t is not None and t.strides[3] == 1 for t in (q, k, v, mask, node.outputs[0]))
            + tuple(t.strides[3] == 1 and aligned(t) for t in (q, k, v, node.outputs[0]))
            + (all(t.shape[3] == max(16, next_pow2(q.shape[3])) for t in (q, k, v)),),
            node.attrs.stages,
        )

    def emit(self, key, name):
        mdt = key.mask
        mask_dt = tl_dtype(mdt) if mdt is not None else "tl.float32"
        return "", (
            f"attention_tile({{row}}, {{addrs}}, {{views}}, {tl_dtype(key.q)}, {tl_dtype(key.k)}, {tl_dtype(key.v)}, "
            f"{mask_dt}, {tl_dtype(key.out)}, {tl_dtype(key.dot)}, {mdt is not None}, {mdt == torch.bool}, "
            f"{key.causal}, {key.scale!r}, {key.group}, {key.bm}, {key.bn}, {key.bd}, {key.split}, "
            f"{', '.join(map(str, key.units))}, {key.stages})"
        )

    def view_args(self, node):
        """q, k, v, mask, out (or partials), then tile coords (b, kv head, m, chunk), then max_and_sum."""
        return list(node.inputs) + [node.outputs[0]]

    def instruction_tail(self, node):
        return [node.outputs[1] if self.splits(node) > 1 else None]

    def kv_heads(self, node) -> int:
        return node.inputs[1].shape[1]

    def keys(self, node) -> int:
        """Keys per sequence (the split-KV chunks divide these)."""
        return node.inputs[1].shape[2]

    def tiles(self, node):
        q = node.inputs[0]
        packed = node.attrs.group * q.shape[2]
        bm = node.attrs.tile[0]
        return [
            (b, hk, m, p)
            for p in range(self.splits(node))
            for b in range(q.shape[0])
            for hk in range(self.kv_heads(node))
            for m in range(cdiv(packed, bm))
        ]

    def row_segments(self, node, coords) -> list[tuple[int, int, int]]:
        """(query head, first, end query position) of each head the tile's packed rows cover."""
        sq, group, bm = node.inputs[0].shape[2], node.attrs.group, node.attrs.tile[0]
        _, hk, m, _ = coords
        r0, r1 = m * bm, min((m + 1) * bm, group * sq)
        return [
            (hk * group + j, max(r0, j * sq) - j * sq, min(r1, (j + 1) * sq) - j * sq)
            for j in range(r0 // sq, cdiv(r1, sq))
        ]

    def kv_range(self, node, p: int) -> tuple[int, int]:
        """Keys of chunk p; the kernel computes the same chunks."""
        skv, bn = self.keys(node), node.attrs.tile[1]
        chunk = kv_chunk(skv, self.splits(node), bn)
        return min(skv, p * chunk), min(skv, (p + 1) * chunk)

    def regions(self, node, coords):
        q, k, v, mask = node.inputs
        b, hk, _, p = coords
        segs = self.row_segments(node, coords)
        keys = self.kv_range(node, p)
        reads = [
            _union(q, [((b, b + 1), (h, h + 1), (q0, q1), (0, q.shape[3])) for h, q0, q1 in segs]),
            box_access(k, ((b, b + 1), (hk, hk + 1), keys, (0, k.shape[3]))),
            box_access(v, ((b, b + 1), (hk, hk + 1), keys, (0, v.shape[3]))),
        ]
        if mask is not None:
            reads.append(_union(mask, [((b, b + 1), (h, h + 1), (q0, q1), keys) for h, q0, q1 in segs]))
        return reads, self.writes(node, coords)

    def writes(self, node, coords) -> list[Access]:
        """The tile's rows of its output(s): of batch b, or of chunk p's copy when split."""
        b, _, _, p = coords
        ob = p * node.inputs[0].shape[0] + b
        segs = self.row_segments(node, coords)
        return [
            _union(o, [((ob, ob + 1), (h, h + 1), (q0, q1), (0, o.shape[3])) for h, q0, q1 in segs])
            for o in node.outputs
        ]

    def work(self, node, coords):
        """Q rows in and O rows out (plus max and sum per row when split), each key and value
        row once, the mask per query-key pair; FLOPs 2 x pairs x (d_qk + d_v). Causal rows see
        keys up to their own position (top-left aligned, as the kernel)."""
        q, k, v, mask = node.inputs
        dq, dv = q.shape[3], v.shape[3]
        lo, hi = self.kv_range(node, coords[3])
        rows = pairs = span = 0
        for _, r0, r1 in self.row_segments(node, coords):  # query rows of each head the tile covers
            rows += r1 - r0
            if node.attrs.causal:
                keys = np.clip(np.minimum(hi, np.arange(r0, r1) + 1) - lo, 0, None)
                pairs, span = pairs + int(keys.sum()), max(span, int(keys.max(initial=0)))
            else:
                pairs, span = pairs + (r1 - r0) * (hi - lo), hi - lo
        split = 8 if self.splits(node) > 1 else 0
        nbytes = rows * (dq * q.dtype.itemsize + dv * node.outputs[0].dtype.itemsize + split)
        nbytes += span * (dq * k.dtype.itemsize + dv * v.dtype.itemsize)
        if mask is not None:
            nbytes += pairs * mask.dtype.itemsize
        return Work(float(nbytes), 2.0 * pairs * (dq + dv))

    def describe(self, node, coords):
        b, hk, m, p = coords
        bm = node.attrs.tile[0]
        segs = self.row_segments(node, coords)
        heads = f"h{segs[0][0]}" if len(segs) == 1 else f"h{segs[0][0]}:{segs[-1][0] + 1}"
        split = f" kv{self.kv_range(node, p)[0]}:" if self.splits(node) > 1 else ""
        return f"{node.name}[b{b} kvh{hk} {heads} r{m * bm}:+{bm}{split}]"

    def kv_block(self, node, coords, tensor_of) -> tuple[slice, torch.Tensor, torch.Tensor, int]:
        """A tile's keys: (their slice of the cache, its K and V rows of the tile's kv head in fp64,
        the output's batch row: the chunk's partials of batch b sit at p x B + b)."""
        q, k, v, _ = node.inputs
        b, hk, _, p = coords
        ks = slice(*self.kv_range(node, p))
        return ks, tensor_of(k)[b, hk, ks].double(), tensor_of(v)[b, hk, ks].double(), p * q.shape[0] + b

    def reference(self, node, coords, tensor_of):
        q, k, _, mask = node.inputs
        b = coords[0]
        ks, kk, vv, ob = self.kv_block(node, coords, tensor_of)
        for h, q0, q1 in self.row_segments(node, coords):
            rs = slice(q0, q1)
            s = (tensor_of(q)[b, h, rs].double() * node.attrs.scale) @ kk.T
            keep = torch.ones_like(s, dtype=torch.bool)
            if node.attrs.causal:
                keep &= (
                    torch.arange(k.shape[2], device=s.device)[ks][None, :]
                    <= torch.arange(q.shape[2], device=s.device)[rs][:, None]
                )
            if mask is not None:
                mv = tensor_of(mask)[b, h, rs, ks]
                if mask.dtype == torch.bool:
                    keep &= mv
                else:
                    s = s + mv.double()
            self.store_rows(node, tensor_of, ob, h, rs, s.masked_fill(~keep, float("-inf")), vv)

    def store_rows(self, node, tensor_of, ob: int, h: int, rs: slice, s: torch.Tensor, vv: torch.Tensor) -> None:
        """Rows rs of head h from their masked scores s (-inf where not kept) and values vv:
        normalised into output row block ob, or (split) the chunk's unnormalised partial and its
        max and sum. Rows that keep nothing give 0."""
        if self.splits(node) == 1:
            tensor_of(node.outputs[0])[ob, h, rs] = (torch.softmax(s, -1).nan_to_num(0.0) @ vv).to(
                node.outputs[0].dtype
            )
            return
        # An empty chunk (forced split) or a fully masked one leaves max -inf and sum 0, as the kernel does.
        mx = s.amax(-1) if s.shape[-1] else torch.full(s.shape[:1], float("-inf"), dtype=s.dtype, device=s.device)
        e = torch.exp(s - torch.where(mx == float("-inf"), 0.0, mx)[:, None])
        tensor_of(node.outputs[0])[ob, h, rs] = (e @ vv).float()
        tensor_of(node.outputs[1])[ob, h, rs, 0] = mx.float()
        tensor_of(node.outputs[1])[ob, h, rs, 1] = e.sum(-1).float()


def kv_chunk(keys: int, parts: int, bn: int) -> int:
    """Keys per split-KV chunk (a multiple of BN); the kernel's arithmetic is the same."""
    return cdiv(cdiv(keys, parts), bn) * bn


def _union(view: View, boxes) -> Access:
    """box_access of several boxes of one view, merged."""
    return Access(view.buffer, merge_intervals(iv for box in boxes for iv in box_access(view, box).intervals))


class CombineKey(NamedTuple):
    kind: str
    out: torch.dtype
    bm: int
    bd: int


@family
class AttentionCombine(OpFamily):
    """Merges split-KV partials: inputs (partials, max_and_sum), output the attention output."""

    kind = "attention_combine"
    routines = ("attention_combine_rows",)

    def key(self, node):
        out = node.outputs[0]
        return CombineKey(self.kind, out.dtype, max(16, next_pow2(out.shape[2])), max(16, next_pow2(out.shape[3])))

    def emit(self, key, name):
        return "", f"attention_combine_rows({{row}}, {{addrs}}, {{views}}, {tl_dtype(key.out)}, {key.bm}, {key.bd})"

    def tiles(self, node):
        out = node.outputs[0]
        return [(b, h) for b in range(out.shape[0]) for h in range(out.shape[1])]

    def regions(self, node, coords):
        part, ml = node.inputs
        out = node.outputs[0]
        b, h = coords
        B = out.shape[0]
        reads = [
            box_access(t, ((p * B + b, p * B + b + 1), (h, h + 1), (0, t.shape[2]), (0, t.shape[3])))
            for t in (part, ml)
            for p in range(part.shape[0] // B)
        ]
        return reads, [box_access(out, ((b, b + 1), (h, h + 1), (0, out.shape[2]), (0, out.shape[3])))]

    def describe(self, node, coords):
        return f"{node.name}[b{coords[0]} h{coords[1]}]"

    def reference(self, node, coords, tensor_of):
        part, ml = node.inputs
        out = node.outputs[0]
        b, h = coords
        B = out.shape[0]
        idx = [p * B + b for p in range(part.shape[0] // B)]
        mx = tensor_of(ml)[idx, h, :, 0].double()
        sm = tensor_of(ml)[idx, h, :, 1].double()
        acc = tensor_of(part)[idx, h].double()
        big = mx.amax(0)
        big = torch.where(big == float("-inf"), 0.0, big)
        w = torch.exp(mx - big)
        total = (w * sm).sum(0)
        res = (w[..., None] * acc).sum(0) / torch.where(total > 0, total, 1.0)[:, None]
        tensor_of(out)[b, h] = res.to(out.dtype)


# ---- paged attention: keys and values read through page tables (mkcompiler/serve) ----
#
# A KV cache kept in pages: per layer a key pool and a value pool [N pages, PAGE slots, Hkv, D];
# sequence s's key j lives at pool[tables[s, j // PAGE], j % PAGE]. Query row (s, m) sees keys
# [start, end) with end = ends[s, m] (its position + 1) and start = max(0, end - window) (window
# 0: from 0), so a prefill chunk is causal within itself and sees all its earlier pages, and a
# decode row sees its whole sequence. A table entry outside the pool (negative, or N or more)
# reads the pool's first or last page (clamped: a bad table never reads outside the pool; a
# validity mask per key instead would cost the pipelined loop registers). The tile reads the
# pools through the table: no gathered copy of any sequence's keys.


@triton.jit
def pool_strides(addrs_ptr, views_ptr, v, DT: tl.constexpr, AL: tl.constexpr):
    """(base pointer, page, slot and head strides) of a [N, PAGE, H, D] pool view; AL as in head_rows."""
    if AL:
        base = view_base_aligned(addrs_ptr, views_ptr, v, DT)
        s0 = aligned_stride(view_stride(views_ptr, v, 0), 128 // DT.primitive_bitwidth)
        s1 = aligned_stride(view_stride(views_ptr, v, 1), 128 // DT.primitive_bitwidth)
        s2 = aligned_stride(view_stride(views_ptr, v, 2), 128 // DT.primitive_bitwidth)
    else:
        base = view_base(addrs_ptr, views_ptr, v, DT)
        s0 = view_stride(views_ptr, v, 0)
        s1 = view_stride(views_ptr, v, 1)
        s2 = view_stride(views_ptr, v, 2)
    return base, s0, s1, s2


@triton.jit
def paged_attention_tile(
    row_ptr,
    addrs_ptr,
    views_ptr,
    Q_DT: tl.constexpr,
    K_DT: tl.constexpr,
    V_DT: tl.constexpr,
    T_DT: tl.constexpr,
    E_DT: tl.constexpr,
    O_DT: tl.constexpr,
    DOT_DT: tl.constexpr,
    SCALE: tl.constexpr,
    GROUP: tl.constexpr,
    PAGE: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    SPLIT: tl.constexpr,
    Q_UNIT: tl.constexpr,
    K_UNIT: tl.constexpr,
    V_UNIT: tl.constexpr,
    O_UNIT: tl.constexpr,
    Q_AL: tl.constexpr,
    K_AL: tl.constexpr,
    V_AL: tl.constexpr,
    O_AL: tl.constexpr,
    D_EXACT: tl.constexpr,
    STAGES: tl.constexpr,
):
    """attention_tile's sweep (packed GQA rows, online softmax, split-KV partials) for sequence
    `seq`, its K/V rows found through its page table. The 2-D table [S, P] and ends [S, M] sit
    in dims 2 and 3 of their view rows (views are padded in front)."""
    vq = arg(row_ptr, 0)
    vk = arg(row_ptr, 1)
    vv = arg(row_ptr, 2)
    vt = arg(row_ptr, 3)  # page tables [S, P]
    ve = arg(row_ptr, 4)  # ends [S, M]
    vo = arg(row_ptr, 5)
    seq = arg(row_ptr, 6)
    hk = arg(row_ptr, 7)
    mb = arg(row_ptr, 8)
    part = arg(row_ptr, 9)
    vml = arg(row_ptr, 10)  # split-KV: [P*S, H, M, 2] fp32 running max and sum per chunk
    Sq = view_size(views_ptr, vq, 2)
    D = view_size(views_ptr, vq, 3)
    Skv = view_size(views_ptr, vt, 3) * PAGE
    n_pages = view_size(views_ptr, vk, 0)
    rows = mb * BM + tl.arange(0, BM)
    if GROUP == 1:
        row_ok = rows < Sq
        h = hk + tl.zeros([BM], tl.int32)
        qi = rows
    else:
        row_ok = rows < GROUP * Sq
        h = hk * GROUP + rows // Sq
        qi = rows % Sq
    d = tl.arange(0, BD)
    if D_EXACT:
        d_ok = tl.full([BD], 1, tl.int1)
    else:
        d_ok = d < D
    q_ptr, q_rows = head_rows(addrs_ptr, views_ptr, vq, seq, h, qi, Q_DT, Q_AL)
    sq3 = 1 if Q_UNIT else view_stride(views_ptr, vq, 3)
    q = tl.load(q_ptr + (q_rows[:, None] + d[None, :] * sq3), mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = (q.to(tl.float32) * SCALE).to(DOT_DT)
    # Each row's keys [start, end); padding rows get end 0 and keep nothing.
    e_ptr = view_base(addrs_ptr, views_ptr, ve, E_DT) + seq * view_stride(views_ptr, ve, 2)
    end = tl.load(e_ptr + qi * view_stride(views_ptr, ve, 3), mask=row_ok, other=0).to(tl.int32)
    end = tl.minimum(end, Skv)
    if WINDOW > 0:
        start = tl.maximum(end - WINDOW, 0)
    t_ptr = view_base(addrs_ptr, views_ptr, vt, T_DT) + seq * view_stride(views_ptr, vt, 2)
    st = view_stride(views_ptr, vt, 3)
    k_ptr, sk0, sk1, sk2 = pool_strides(addrs_ptr, views_ptr, vk, K_DT, K_AL)
    v_ptr, sv0, sv1, sv2 = pool_strides(addrs_ptr, views_ptr, vv, V_DT, V_AL)
    sk3 = 1 if K_UNIT else view_stride(views_ptr, vk, 3)
    sv3 = 1 if V_UNIT else view_stride(views_ptr, vv, 3)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    kv_lo = 0
    kv_end = Skv
    if SPLIT:  # the chunks of PagedAttention.kv_range
        S = view_size(views_ptr, vq, 0)
        chunk = tl.cdiv(tl.cdiv(Skv, view_size(views_ptr, vml, 0) // S), BN) * BN
        kv_lo = part * chunk
        kv_end = tl.minimum(Skv, kv_lo + chunk)
    kv_end = tl.minimum(kv_end, tl.max(end, axis=0))  # no row sees a key past its end
    if WINDOW > 0:  # nor one before its window (blocks stay BN-aligned)
        kv_lo = tl.maximum(kv_lo, tl.min(tl.where(row_ok, start, Skv), axis=0) // BN * BN)
    for n0 in tl.range(kv_lo, kv_end, BN, num_stages=STAGES):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < kv_end
        page = tl.load(t_ptr + (cols // PAGE) * st, mask=col_ok, other=0).to(tl.int64)
        page = tl.minimum(tl.maximum(page, 0), n_pages - 1)  # clamped into the pool (section comment)
        slot = cols % PAGE
        k_rows = page * sk0 + slot * sk1 + hk * sk2
        v_rows = page * sv0 + slot * sv1 + hk * sv2
        k = tl.load(k_ptr + (k_rows[None, :] + d[:, None] * sk3), mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        v = tl.load(v_ptr + (v_rows[:, None] + d[None, :] * sv3), mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        # Recomputed, not col_ok: nothing of the table load is carried to the softmax's pipeline stage.
        keep = (cols[None, :] < kv_end) & (cols[None, :] < end[:, None])
        if WINDOW > 0:
            keep = keep & (cols[None, :] >= start[:, None])
        s = tl.dot(q, k.to(DOT_DT), input_precision="ieee")
        if SOFTCAP > 0:  # logit soft-capping: SOFTCAP x tanh(s / SOFTCAP), tanh written with exp
            s = SOFTCAP * (1.0 - 2.0 / (tl.exp(s * (2.0 / SOFTCAP)) + 1.0))
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing kept yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), v.to(DOT_DT), input_precision="ieee")
        m_i = m_new
    if SPLIT:  # unnormalised partial; attention_combine merges the chunks
        out = acc
        ob = part * view_size(views_ptr, vq, 0) + seq
        ml_ptr = (
            view_base(addrs_ptr, views_ptr, vml, tl.float32)
            + ob * view_stride(views_ptr, vml, 0)
            + h * view_stride(views_ptr, vml, 1)
            + qi * view_stride(views_ptr, vml, 2)
        )
        tl.store(ml_ptr, m_i, mask=row_ok)
        tl.store(ml_ptr + view_stride(views_ptr, vml, 3), l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        ob = seq
    o_ptr, o_rows = head_rows(addrs_ptr, views_ptr, vo, ob, h, qi, O_DT, O_AL)
    so3 = 1 if O_UNIT else view_stride(views_ptr, vo, 3)
    tl.store(o_ptr + (o_rows[:, None] + d[None, :] * so3), out.to(O_DT), mask=row_ok[:, None] & d_ok[None, :])


def gather_pages(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """pool [N, page, H, D], tables [S, P] -> [S, H, P x page, D]: each sequence's slots in order
    (entries outside the pool clamped into it, as the tile does)."""
    s, p = tables.shape
    n, page, h, d = pool.shape
    return pool[tables.clamp(0, n - 1)].reshape(s, p * page, h, d).transpose(1, 2)


def paged_keep(ends: torch.Tensor, keys: int, window: int) -> torch.Tensor:
    """ends [S, M] -> [S, M, keys] bool: key j is seen by row (s, m) (the keys [start, end) above)."""
    j = torch.arange(keys, device=ends.device)
    end = ends.clamp(max=keys)[..., None]
    keep = j < end
    return keep & (j >= end - window) if window > 0 else keep


@torch.library.custom_op("mkcompiler::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    ends: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q [S, Hq, M, D] (Hq a multiple of Hkv) over the paged keys and values of S sequences
    (pools [N, page, Hkv, D], tables [S, P], ends [S, M]: see the section comment above)
    -> [S, Hq, M, D]. softcap > 0: scores are softcap x tanh(scores / softcap). Rows that see no
    key give 0. Eagerly: each sequence's pages gathered, then SDPA; compiled (lower_paged_attention):
    a tile that reads the pages in place."""
    k, v = gather_pages(k_pool, tables), gather_pages(v_pool, tables)
    keep = paged_keep(ends, k.shape[2], window)[:, None]  # [S, 1, M, L]
    if softcap <= 0:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=True)
    else:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = softcap * torch.tanh((q @ k.transpose(-1, -2)) * (scale / softcap))
        out = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v
    # Contiguous, as the fake below says (torch.compile checks the strides).
    return torch.where(keep.any(-1)[..., None], out, 0.0).to(q.dtype).contiguous()


@paged_attention.register_fake
def _paged_attention_fake(q, k_pool, v_pool, tables, ends, scale, window=0, softcap=0.0):
    return q.new_empty(q.shape[:3] + v_pool.shape[3:])


@dataclass
class PagedAttentionAttrs:
    scale: float
    group: int  # query heads per kv head
    window: int = 0  # a row sees its last `window` keys (0: all up to its end)
    softcap: float = 0.0  # > 0: logit soft-capping
    tile: tuple[int, int] | None = None  # (BM, BN) (passes/tile.py)
    stages: int | None = None  # as AttentionAttrs
    dot: torch.dtype | None = None
    split: int = 1  # key chunks (passes/split_kv.py)


@lowers(torch.ops.mkcompiler.paged_attention.default)
def lower_paged_attention(ctx, node, q, k_pool, v_pool, tables, ends, scale, window=0, softcap=0.0):
    if (q.rank, k_pool.rank, v_pool.rank, tables.rank, ends.rank) != (4, 4, 4, 2, 2):
        ctx.unsupported(
            node, "paged attention other than q [S, H, M, D], pools [N, page, H, D], tables [S, P], ends [S, M]"
        )
    s, hq, m, d = q.shape
    hk = k_pool.shape[2]
    if hq % hk or k_pool.shape[:3] != v_pool.shape[:3] or d != k_pool.shape[3] or d != v_pool.shape[3]:
        ctx.unsupported(
            node, f"paged attention of q {list(q.shape)} over pools {list(k_pool.shape)}, {list(v_pool.shape)}"
        )
    if tables.shape[0] != s or ends.shape != (s, m) or tables.dtype.is_floating_point or ends.dtype.is_floating_point:
        ctx.unsupported(node, f"paged attention with tables {list(tables.shape)} and ends {list(ends.shape)}")
    # Stored as [S, M, H, D] and seen as [S, H, M, D], as lower_sdpa's output.
    out = ctx.graph.new_tensor(node.name, (s, m, hq, d), node.meta["val"].dtype).permute((0, 2, 1, 3))
    attrs = PagedAttentionAttrs(float(scale), hq // hk, max(0, int(window)), max(0.0, float(softcap)))
    ctx.emit(node, "paged_attention", (q, k_pool, v_pool, tables, ends), (out,), attrs)
    return out


class PagedAttentionKey(NamedTuple):
    kind: str
    q: torch.dtype
    k: torch.dtype
    v: torch.dtype
    tables: torch.dtype
    ends: torch.dtype
    out: torch.dtype
    dot: torch.dtype
    scale: float
    group: int
    page: int
    window: int
    softcap: float
    bm: int
    bn: int
    bd: int
    split: bool
    units: tuple[bool, ...]  # paged_attention_tile's Q_UNIT .. D_EXACT, in its order
    stages: int


@family
class PagedAttention(Attention):
    """Inputs (q, k_pool, v_pool, tables, ends); outputs as Attention's. Tiles (sequence, kv
    head, packed row block, key chunk) and split-KV as Attention's, over P x page keys."""

    kind = "paged_attention"
    routines = ("paged_attention_tile",)

    def kv_heads(self, node) -> int:
        return node.inputs[1].shape[2]

    def keys(self, node) -> int:
        return node.inputs[3].shape[1] * node.inputs[1].shape[1]

    def key(self, node):
        q, k, v, tables, ends = node.inputs
        out = node.outputs[0]
        bd = max(16, next_pow2(q.shape[3]))
        return PagedAttentionKey(
            self.kind,
            q.dtype,
            k.dtype,
            v.dtype,
            tables.dtype,
            ends.dtype,
            out.dtype,
            node.attrs.dot,
            node.attrs.scale,
            node.attrs.group,
            k.shape[1],
            node.attrs.window,
            node.attrs.softcap,
            *node.attrs.tile,
            bd,
            self.splits(node) > 1,
            tuple(t.strides[3] == 1 for t in (q, k, v, out))
            + tuple(t.strides[3] == 1 and aligned(t) for t in (q, k, v, out))
            + (all(t.shape[3] == bd for t in (q, k, v)),),
            node.attrs.stages,
        )

    def emit(self, key, name):
        dts = ", ".join(tl_dtype(t) for t in (key.q, key.k, key.v, key.tables, key.ends, key.out, key.dot))
        return "", (
            f"paged_attention_tile({{row}}, {{addrs}}, {{views}}, {dts}, {key.scale!r}, {key.group}, {key.page}, "
            f"{key.window}, {key.softcap!r}, {key.bm}, {key.bn}, {key.bd}, {key.split}, "
            f"{', '.join(map(str, key.units))}, {key.stages})"
        )

    def regions(self, node, coords):
        q, k_pool, v_pool, tables, ends = node.inputs
        seq = coords[0]
        segs = self.row_segments(node, coords)
        reads = [
            _union(q, [((seq, seq + 1), (h, h + 1), (q0, q1), (0, q.shape[3])) for h, q0, q1 in segs]),
            whole(k_pool),  # which pages is known at run time only
            whole(v_pool),
            box_access(tables, ((seq, seq + 1), (0, tables.shape[1]))),
            _union(ends, [((seq, seq + 1), (q0, q1)) for _, q0, q1 in segs]),
        ]
        return reads, self.writes(node, coords)

    def work(self, node, coords):
        """As Attention's, every row counted over the chunk's keys (its end is known at run time
        only: an upper bound), plus the table row and the rows' ends."""
        q, k_pool, v_pool, tables, ends = node.inputs
        lo, hi = self.kv_range(node, coords[3])
        rows = sum(r1 - r0 for _, r0, r1 in self.row_segments(node, coords))
        d = q.shape[3]
        split = 8 if self.splits(node) > 1 else 0
        nbytes = rows * (d * q.dtype.itemsize + d * node.outputs[0].dtype.itemsize + split + ends.dtype.itemsize)
        nbytes += (hi - lo) * d * (k_pool.dtype.itemsize + v_pool.dtype.itemsize)
        nbytes += tables.shape[1] * tables.dtype.itemsize
        return Work(float(nbytes), 4.0 * rows * (hi - lo) * d)

    def reference(self, node, coords, tensor_of):
        q, k_pool, v_pool, tables, ends = node.inputs
        seq, hk, _, p = coords
        lo, hi = self.kv_range(node, p)
        page = k_pool.shape[1]
        j = torch.arange(lo, hi)
        pages = tensor_of(tables)[seq].long().clamp(0, k_pool.shape[0] - 1)[j // page]  # clamped, as the tile
        kk = tensor_of(k_pool)[pages, j % page, hk].double()
        vv = tensor_of(v_pool)[pages, j % page, hk].double()
        seen = paged_keep(tensor_of(ends)[seq].long(), self.keys(node), node.attrs.window)[:, lo:hi]
        ob = p * q.shape[0] + seq
        softcap = node.attrs.softcap
        for h, q0, q1 in self.row_segments(node, coords):
            rs = slice(q0, q1)
            s = (tensor_of(q)[seq, h, rs].double() * node.attrs.scale) @ kk.T
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            self.store_rows(node, tensor_of, ob, h, rs, s.masked_fill(~seen[rs], float("-inf")), vv)


ATTENTION_KINDS = (Attention.kind, PagedAttention.kind)  # what passes/tile.py and split_kv.py tile and split
