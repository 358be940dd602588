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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
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

    def tiles(self, node):
        q, k = node.inputs[0], node.inputs[1]
        packed = node.attrs.group * q.shape[2]
        bm = node.attrs.tile[0]
        return [
            (b, hk, m, p)
            for p in range(self.splits(node))
            for b in range(q.shape[0])
            for hk in range(k.shape[1])
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
        skv, bn = node.inputs[1].shape[2], node.attrs.tile[1]
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
        ob = p * q.shape[0] + b
        writes = [
            _union(o, [((ob, ob + 1), (h, h + 1), (q0, q1), (0, o.shape[3])) for h, q0, q1 in segs])
            for o in node.outputs
        ]
        return reads, writes

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

    def reference(self, node, coords, tensor_of):
        q, k, v, mask = node.inputs
        b, hk, _, p = coords
        ks = slice(*self.kv_range(node, p))
        kk = tensor_of(k)[b, hk, ks].double()
        vv = tensor_of(v)[b, hk, ks].double()
        ob = p * q.shape[0] + b
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
            s = s.masked_fill(~keep, float("-inf"))
            if self.splits(node) == 1:
                out = (torch.softmax(s, -1).nan_to_num(0.0) @ vv).to(node.outputs[0].dtype)
                tensor_of(node.outputs[0])[b, h, rs] = out
                continue
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
