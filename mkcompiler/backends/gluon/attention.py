"""Gluon tiles of decode attention (issue 17): the `attention` family (GQA, causal or masked,
split-KV partials with their max and sum) and `attention_combine` (the merge of the split
partials), twins of ops/attention.py's attention_tile and attention_combine_rows for the compute
partition of the Gluon decode kernel (codegen.py). They read the SAME instruction args and views:

  attention          args q, k, v, mask (-1: none), out (split: the fp32 partials), b, kv head hk,
                     packed row block mb, key chunk p, then max_and_sum (split only)
  attention_combine  args partials, max_and_sum, out, b, h

Decode has 1..16 packed rows per kv head (G query heads x Sq positions), too few for tensor cores:
scores and P x V are FMA reductions over broadcast products. Each of the 4 compute warps owns one
slice of every key step (BNW keys) with its own online softmax for R packed rows held in registers
(a row group; more rows: more groups, their keys read again from L2), the slices merged across warps
once per row group (flash-decoding inside the CTA). So every key and value is loaded once per row
group, by one warp, and every reduction of the key loop stays inside a warp (shuffles, no CTA
barrier per step). Latency, not bandwidth, bounds a decode tile (a step is ~8 KB): the next step's
keys and values are loaded into registers before this step's math (Gluon does not software-pipeline
loops), and L2 is asked PF_STEPS steps ahead of that (prefetch.global.L2, a hint).

The split-KV chunks are attention_tile's (Attention.kv_range: chunks of the key's BN keys), so
partials land where AttentionCombine (and the Triton backend's combine) expect them. Rows that keep
no key give 0, as attention_tile. After a failed wait (ok == 0) a tile reads and stores nothing.

What is not run here (`_attention_problem`): prefill tiles (more than DECODE_ROWS packed rows).

Importing this module does no CUDA work and never fails without Gluon (tiles.HAVE_GLUON).
"""

from __future__ import annotations

import torch

from mkcompiler.backends.gluon import tiles
from mkcompiler.backends.gluon.family import Emitted, GluonFamily, register
from mkcompiler.ir.layout import Field, ViewField
from mkcompiler.ir.queue import Queue
from mkcompiler.ops.base import next_pow2, tl_dtype
from mkcompiler.ops.matmul import DECODE_ROWS

ATTENTION, COMBINE = "attention", "attention_combine"
MODULE = "mkcompiler.backends.gluon.attention"
# Register budgets of attention_tile (elements per warp per key step, checked offline on sm_90 at
# codegen's 4 compute warps: no spills), spent on keys per step (BNW): K (and as many of V) a warp holds, twice with
# the prefetched step; and the products of R rows with them (R x BNW x BD: 4096 spilled at R = 4).
WARP_KV_ELEMS = 1024
WARP_PRODUCT_ELEMS = 2048
MAX_ROWS = 4  # rows held at once (8 spilled at any BNW); more packed rows: row groups
PF_STEPS = 4  # key steps asked of L2 ahead of the one loaded into registers (latency: 1 step is ~8 KB)
# attention args (Attention.view_args + tile coords + instruction_tail)
Q, K, V, MASK, OUT, B, HK, MB, PART, ML = range(10)
# attention_combine args (AttentionCombine: inputs, output, coords)
C_PART, C_ML, C_OUT, C_B, C_H = range(5)

if tiles.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from mkcompiler.backends.gluon.tiles import _V_ADDR, add, arg, view_base, view_field, view_size, view_stride

    NEG_INF = gl.constexpr(float("-inf"))
    _Q, _K, _V, _MASK, _OUT = gl.constexpr(Q), gl.constexpr(K), gl.constexpr(V), gl.constexpr(MASK), gl.constexpr(OUT)
    _B, _HK, _MB, _PART, _ML = gl.constexpr(B), gl.constexpr(HK), gl.constexpr(MB), gl.constexpr(PART), gl.constexpr(ML)
    _C_PART, _C_ML, _C_OUT = gl.constexpr(C_PART), gl.constexpr(C_ML), gl.constexpr(C_OUT)
    _C_B, _C_H = gl.constexpr(C_B), gl.constexpr(C_H)

    @gluon.jit
    def maximum(a, b):
        # gl.max's combine function is a @triton.jit one (an interpreter function in the CPU suite)
        return gl.maximum(a, b)

    @gluon.constexpr_function
    def rank_of(layout):
        rank = 0
        while isinstance(layout, gl.SliceLayout):
            layout, rank = layout.parent, rank - 1
        return rank + len(layout.warps_per_cta)

    @gluon.constexpr_function
    def slice_chain(parent, axis):
        """along_layout for a parent that may itself be a SliceLayout (its rank: rank_of)."""
        rank = rank_of(parent)
        layout = parent
        for _ in range(axis):
            layout = gl.SliceLayout(0, layout)
        for _ in range(rank - 1 - axis):
            layout = gl.SliceLayout(1, layout)
        return layout

    @gluon.jit
    def along(n: gl.constexpr, axis: gl.constexpr, L: gl.constexpr):
        """arange(n) along dim `axis` of a tensor of layout L (size 1 in its other dims)."""
        RANK: gl.constexpr = rank_of(L)
        x = gl.arange(0, n, layout=slice_chain(L, axis))
        for _ in gl.static_range(RANK - 1 - axis):
            x = gl.expand_dims(x, 1)
        for _ in gl.static_range(axis):
            x = gl.expand_dims(x, 0)
        return x

    @gluon.jit
    def aligned_stride(stride, VEC: gl.constexpr):
        """ops/common.aligned_stride: a stride known to be a multiple of VEC, written so the
        compiler's divisibility analysis sees it (16-byte loads)."""
        return (stride // VEC) * VEC

    @gluon.jit
    def head_base(views_ptr, v, DT: gl.constexpr, AL: gl.constexpr):
        """(base pointer, strides of dims 0, 1, 2) of a [B, H, S, D] view; AL: 16-byte aligned base
        and outer strides (ops/attention.head_rows: the hint is applied on the cast itself)."""
        VEC: gl.constexpr = 16 // DT.itemsize
        # the cast here, not view_base's: a hint on a call's result is lost when it is inlined
        base = view_field(views_ptr, v, _V_ADDR).to(gl.pointer_type(DT), bitcast=True)
        s0 = view_stride(views_ptr, v, 0)
        s1 = view_stride(views_ptr, v, 1)
        s2 = view_stride(views_ptr, v, 2)
        if AL:
            base = gl.multiple_of(base, 16)
            s0 = aligned_stride(s0, VEC)
            s1 = aligned_stride(s1, VEC)
            s2 = aligned_stride(s2, VEC)
        return base, s0, s1, s2

    @gluon.jit
    def last_stride(views_ptr, v, UNIT: gl.constexpr):
        """Stride of the head dim: a literal 1 where the key says so (vectorised accesses)."""
        if UNIT:
            s3 = 1
        else:
            s3 = view_stride(views_ptr, v, 3)
        return s3

    @gluon.jit
    def packed_rows(r, n_rows, hk, Sq, GROUP: gl.constexpr):
        """Packed row r of kv head hk (< n_rows real ones): (kept, query head, query position)."""
        return r < n_rows, hk * GROUP + r // Sq, r % Sq

    @gluon.jit
    def prefetch_keys(
        ptr, s2, s3, lo, hi, D, DT: gl.constexpr, n: gl.constexpr, BD: gl.constexpr, num_warps: gl.constexpr
    ):
        """Ask L2 for the 128-byte lines of rows [lo, min(lo + n, hi)) (lo < hi) of one head's K or V
        (a hint: no data comes back, nothing waits). Addresses stay inside the rows' D elements
        (clamped, not masked: inline asm has no mask)."""
        LINE: gl.constexpr = 128 // DT.itemsize  # elements per line
        LINES: gl.constexpr = (BD + LINE - 1) // LINE
        L1D: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        i = gl.arange(0, n * LINES, layout=L1D)
        key = gl.minimum(lo + i // LINES, hi - 1)
        p = ptr + (key * s2 + gl.minimum((i % LINES) * LINE, D - 1) * s3)
        gl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [p], gl.int32, False, 1)

    @gluon.jit
    def attention_tile(
        row,
        views_ptr,
        idx,
        ok,
        Q_DT: gl.constexpr,
        K_DT: gl.constexpr,
        V_DT: gl.constexpr,
        M_DT: gl.constexpr,
        O_DT: gl.constexpr,
        DOT_DT: gl.constexpr,
        HAS_MASK: gl.constexpr,
        MASK_BOOL: gl.constexpr,
        CAUSAL: gl.constexpr,
        SCALE: gl.constexpr,
        GROUP: gl.constexpr,
        BM: gl.constexpr,
        BN: gl.constexpr,
        BD: gl.constexpr,
        SPLIT: gl.constexpr,
        Q_UNIT: gl.constexpr,
        K_UNIT: gl.constexpr,
        V_UNIT: gl.constexpr,
        M_UNIT: gl.constexpr,
        O_UNIT: gl.constexpr,
        Q_AL: gl.constexpr,
        K_AL: gl.constexpr,
        V_AL: gl.constexpr,
        O_AL: gl.constexpr,
        D_EXACT: gl.constexpr,
        D_VEC: gl.constexpr,
        R: gl.constexpr,
        BNW: gl.constexpr,
        VEC: gl.constexpr,
        PF_STEPS: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """One attention instruction (ops/attention.attention_tile's arithmetic: q scaled and rounded
        to DOT_DT, scores and P x V in fp32 from DOT_DT-rounded operands, online softmax): the tile's
        packed rows R at a time; per row group the keys [kv_lo, end) in steps of S x BNW, warp j
        taking keys [j x BNW, (j + 1) x BNW) of each step."""
        S: gl.constexpr = num_warps
        TPW_D: gl.constexpr = BD // VEC if BD // VEC < 32 else 32
        TPW_N: gl.constexpr = 32 // TPW_D
        # [rows, key slices, keys of a slice, head dim]: a warp per key slice, the rows in registers
        L4: gl.constexpr = gl.BlockedLayout([1, 1, 1, VEC], [1, 1, TPW_N, TPW_D], [1, S, 1, 1], [3, 2, 1, 0])
        LS: gl.constexpr = gl.SliceLayout(3, L4)  # scores [R, S, BNW]
        LA: gl.constexpr = gl.SliceLayout(2, L4)  # accumulators [R, S, BD]
        LO: gl.constexpr = gl.SliceLayout(1, LA)  # merged rows [R, BD]
        LR: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, LS))  # one value per row [R]
        STEP: gl.constexpr = S * BNW
        AHEAD: gl.constexpr = PF_STEPS * STEP  # keys asked of L2 ahead of the step being loaded
        vq = arg(row, idx, _Q)
        vk = arg(row, idx, _K)
        vv = arg(row, idx, _V)
        vo = arg(row, idx, _OUT)
        b = arg(row, idx, _B)
        hk = arg(row, idx, _HK)
        r0 = arg(row, idx, _MB) * BM
        # sizes in int32 (index math stays 32-bit; offsets become 64-bit with the strides)
        Sq = view_size(views_ptr, vq, 2).to(gl.int32)
        D = view_size(views_ptr, vq, 3).to(gl.int32)
        Skv = view_size(views_ptr, vk, 2).to(gl.int32)
        if D_VEC:  # the head dim is a multiple of VEC: its mask is uniform over a thread's vector
            D = gl.multiple_of(D, VEC)
        n_rows = gl.minimum(GROUP * Sq, r0 + BM)  # packed rows end; rows past it are padding
        n_rows = gl.where(ok != 0, n_rows, r0)  # a wait gave up: no row, nothing read or stored
        kv_lo = 0
        kv_end = Skv
        if SPLIT:  # the chunks of Attention.kv_range
            part = arg(row, idx, _PART)
            vml = arg(row, idx, _ML)
            parts = (view_size(views_ptr, vml, 0) // view_size(views_ptr, vq, 0)).to(gl.int32)
            chunk = (((Skv + parts - 1) // parts + BN - 1) // BN) * BN
            kv_lo = part * chunk
            kv_end = gl.minimum(Skv, kv_lo + chunk)
            b_out = part * view_size(views_ptr, vq, 0) + b
        else:
            b_out = b
        q_ptr, sq0, sq1, sq2 = head_base(views_ptr, vq, Q_DT, Q_AL)
        k_ptr, sk0, sk1, sk2 = head_base(views_ptr, vk, K_DT, K_AL)
        v_ptr, sv0, sv1, sv2 = head_base(views_ptr, vv, V_DT, V_AL)
        o_ptr, so0, so1, so2 = head_base(views_ptr, vo, O_DT, O_AL)
        sq3 = last_stride(views_ptr, vq, Q_UNIT)
        sk3 = last_stride(views_ptr, vk, K_UNIT)
        sv3 = last_stride(views_ptr, vv, V_UNIT)
        so3 = last_stride(views_ptr, vo, O_UNIT)
        k_ptr = k_ptr + b * sk0 + hk * sk1
        v_ptr = v_ptr + b * sv0 + hk * sv1
        d4 = along(BD, 3, L4)
        dO = along(BD, 1, LO)
        keys4 = along(S, 1, L4) * BNW + along(BNW, 2, L4)  # [1, S, BNW, 1]: the step's key offsets
        keysS = along(S, 1, LS) * BNW + along(BNW, 2, LS)  # the same, as scores
        if D_EXACT:
            d_ok4 = d4 < BD
            d_okO = dO < BD
        else:
            d_ok4 = d4 < D
            d_okO = dO < D
        for g in range(r0, n_rows, R):
            row4 = g + along(R, 0, L4)
            row_ok4, h4, qi4 = packed_rows(row4, n_rows, hk, Sq, GROUP)
            q = gl.load(q_ptr + (b * sq0 + h4 * sq1 + qi4 * sq2 + d4 * sq3), mask=row_ok4 & d_ok4, other=0.0)
            q = (q.to(gl.float32) * SCALE).to(DOT_DT).to(gl.float32)  # [R, 1, 1, BD]
            rowS = g + along(R, 0, LS)
            row_okS, hS, qiS = packed_rows(rowS, n_rows, hk, Sq, GROUP)
            end = kv_end
            if CAUSAL:  # no row of the group sees a key past its last query position
                row_okR, hR, qiR = packed_rows(g + gl.arange(0, R, layout=LR), n_rows, hk, Sq, GROUP)
                end = gl.minimum(end, gl.reduce(gl.where(row_okR, qiR, 0), 0, maximum) + 1)
            if HAS_MASK:
                vm = arg(row, idx, _MASK)
                m_rows = (
                    view_base(views_ptr, vm, M_DT)
                    + b * view_stride(views_ptr, vm, 0)
                    + hS * view_stride(views_ptr, vm, 1)
                    + qiS * view_stride(views_ptr, vm, 2)
                )
                sm3 = last_stride(views_ptr, vm, M_UNIT)
            m_i = gl.full([R, S], NEG_INF, gl.float32, layout=gl.SliceLayout(2, LS))
            l_i = gl.zeros([R, S], gl.float32, layout=gl.SliceLayout(2, LS))
            acc = gl.zeros([R, S, BD], gl.float32, layout=LA)
            if kv_lo < end:  # L2 gets the first AHEAD keys now, then each step's the window after
                prefetch_keys(k_ptr, sk2, sk3, kv_lo, end, D, K_DT, AHEAD, BD, num_warps)
                prefetch_keys(v_ptr, sv2, sv3, kv_lo, end, D, V_DT, AHEAD, BD, num_warps)
            # step kv_lo's keys and values, loaded ahead (every step loads the next one's)
            cols4 = kv_lo + keys4
            kv_mask = (cols4 < end) & d_ok4
            k_next = gl.load(k_ptr + (cols4 * sk2 + d4 * sk3), mask=kv_mask, other=0.0)
            v_next = gl.load(v_ptr + (cols4 * sv2 + d4 * sv3), mask=kv_mask, other=0.0)
            for n0 in range(kv_lo, end, STEP):
                k = k_next
                v = v_next
                if n0 + AHEAD < end:
                    prefetch_keys(k_ptr, sk2, sk3, n0 + AHEAD, end, D, K_DT, STEP, BD, num_warps)
                    prefetch_keys(v_ptr, sv2, sv3, n0 + AHEAD, end, D, V_DT, STEP, BD, num_warps)
                ahead = n0 + STEP + keys4
                ahead_ok = (ahead < end) & d_ok4
                k_next = gl.load(k_ptr + (ahead * sk2 + d4 * sk3), mask=ahead_ok, other=0.0)
                v_next = gl.load(v_ptr + (ahead * sv2 + d4 * sv3), mask=ahead_ok, other=0.0)
                colsS = n0 + keysS
                keep = row_okS & (colsS < end)
                if CAUSAL:
                    keep = keep & (colsS <= qiS)
                s = gl.reduce(q * k.to(DOT_DT).to(gl.float32), 3, add)  # [R, S, BNW]
                if HAS_MASK:
                    mval = gl.load(m_rows + colsS * sm3, mask=keep, other=0)
                    if MASK_BOOL:
                        keep = keep & (mval != 0)
                    else:
                        s = s + mval.to(gl.float32)
                s = gl.where(keep, s, NEG_INF)
                m_new = gl.maximum(m_i, gl.reduce(s, 2, maximum))
                m_safe = gl.where(m_new == NEG_INF, 0.0, m_new)  # slices with nothing kept yet
                p = gl.exp(s - gl.expand_dims(m_safe, 2))
                alpha = gl.exp(m_i - m_safe)
                l_i = l_i * alpha + gl.reduce(p, 2, add)
                p = gl.expand_dims(p.to(DOT_DT).to(gl.float32), 3)
                pv = gl.reduce(p * v.to(DOT_DT).to(gl.float32), 2, add)  # [R, S, BD]
                alpha = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(2, LA)), 2)
                acc = acc * alpha + pv
                m_i = m_new
            # merge the S slices of each row (the only reductions across warps)
            big = gl.reduce(m_i, 1, maximum)  # [R]
            w = gl.exp(m_i - gl.expand_dims(gl.where(big == NEG_INF, 0.0, big), 1))
            total = gl.reduce(l_i * w, 1, add)
            w = gl.expand_dims(gl.convert_layout(w, gl.SliceLayout(2, LA)), 2)
            out = gl.reduce(acc * w, 1, add)  # [R, BD]
            rowO = g + along(R, 0, LO)
            row_okO, hO, qiO = packed_rows(rowO, n_rows, hk, Sq, GROUP)
            if SPLIT:  # unnormalised partial, its max and sum; attention_combine merges the chunks
                row_okR, hR, qiR = packed_rows(g + gl.arange(0, R, layout=LR), n_rows, hk, Sq, GROUP)
                ml_ptr = (
                    view_base(views_ptr, vml, gl.float32)
                    + b_out * view_stride(views_ptr, vml, 0)
                    + hR * view_stride(views_ptr, vml, 1)
                    + qiR * view_stride(views_ptr, vml, 2)
                )
                gl.store(ml_ptr, big, mask=row_okR)
                gl.store(ml_ptr + view_stride(views_ptr, vml, 3), total, mask=row_okR)
            else:
                total = gl.convert_layout(total, gl.SliceLayout(1, LO))
                out = out / gl.expand_dims(gl.where(total > 0, total, 1.0), 1)
            offs = b_out * so0 + hO * so1 + qiO * so2 + dO * so3
            gl.store(o_ptr + offs, out.to(O_DT), mask=row_okO & d_okO)

    @gluon.jit
    def attention_combine_tile(
        row, views_ptr, idx, ok, O_DT: gl.constexpr, BM: gl.constexpr, BD: gl.constexpr, num_warps: gl.constexpr
    ):
        """ops/attention.attention_combine_rows: out[b, h] = sum_p exp(m_p - M) acc_p /
        sum_p exp(m_p - M) l_p over the split-KV chunks (fp32)."""
        VEC: gl.constexpr = 4  # 16 B of the fp32 partials per thread
        TPW_D: gl.constexpr = BD // VEC if BD // VEC < 32 else 32
        blk: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TPW_D, TPW_D], [num_warps, 1], [1, 0])
        vpart = arg(row, idx, _C_PART)  # [P*B, H, Sq, D] fp32 unnormalised partial outputs
        vml = arg(row, idx, _C_ML)  # [P*B, H, Sq, 2] fp32 (max, sum) per chunk
        vo = arg(row, idx, _C_OUT)  # [B, H, Sq, D]
        b = arg(row, idx, _C_B)
        h = arg(row, idx, _C_H)
        B = view_size(views_ptr, vo, 0)
        P = (view_size(views_ptr, vml, 0) // B) * ok  # a wait gave up: no chunk is read
        Sq = view_size(views_ptr, vo, 2) * ok  # ... and no row stored
        D = view_size(views_ptr, vo, 3)
        rows = gl.arange(0, BM, layout=gl.SliceLayout(1, blk))
        d = gl.arange(0, BD, layout=gl.SliceLayout(0, blk))
        row_ok = rows < Sq
        mask = gl.expand_dims(row_ok, 1) & gl.expand_dims(d < D, 0)
        ml_base = view_base(views_ptr, vml, gl.float32) + h * view_stride(views_ptr, vml, 1)
        ml_rows = rows * view_stride(views_ptr, vml, 2)
        sml0 = view_stride(views_ptr, vml, 0)
        sml3 = view_stride(views_ptr, vml, 3)
        p_base = view_base(views_ptr, vpart, gl.float32) + h * view_stride(views_ptr, vpart, 1)
        p_offs = gl.expand_dims(rows * view_stride(views_ptr, vpart, 2), 1) + gl.expand_dims(
            d * view_stride(views_ptr, vpart, 3), 0
        )
        sp0 = view_stride(views_ptr, vpart, 0)
        big = gl.full([BM], NEG_INF, gl.float32, layout=gl.SliceLayout(1, blk))
        for p in range(0, P):
            big = gl.maximum(big, gl.load(ml_base + (p * B + b) * sml0 + ml_rows, mask=row_ok, other=NEG_INF))
        big = gl.where(big == NEG_INF, 0.0, big)
        acc = gl.zeros([BM, BD], gl.float32, layout=blk)
        total = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, blk))
        for p in range(0, P):
            ml = ml_base + (p * B + b) * sml0 + ml_rows
            w = gl.exp(gl.load(ml, mask=row_ok, other=NEG_INF) - big)
            total += w * gl.load(ml + sml3, mask=row_ok, other=0.0)
            acc += gl.expand_dims(w, 1) * gl.load(p_base + (p * B + b) * sp0 + p_offs, mask=mask, other=0.0)
        out = acc / gl.expand_dims(gl.where(total > 0, total, 1.0), 1)
        o_ptr = view_base(views_ptr, vo, O_DT) + b * view_stride(views_ptr, vo, 0) + h * view_stride(views_ptr, vo, 1)
        o_offs = gl.expand_dims(rows * view_stride(views_ptr, vo, 2), 1) + gl.expand_dims(
            d * view_stride(views_ptr, vo, 3), 0
        )
        gl.store(o_ptr + o_offs, out.to(O_DT), mask=mask)


# ---- the families (codegen.generate asks them for their branches) ----


def gl_dtype(dtype: torch.dtype) -> str:
    """codegen.gl_dtype (not imported: codegen imports this module to register its families)."""
    return tl_dtype(dtype).replace("tl.", "gl.")


def _attention_problem(key) -> str | None:
    if key.bm > DECODE_ROWS:
        return f"{key.bm}-row tiles (decode attention has at most {DECODE_ROWS} packed rows per kv head)"
    return None


def _combine_problem(key) -> str | None:
    if key.bm > DECODE_ROWS:
        return f"{key.bm} query positions (decode has at most {DECODE_ROWS})"
    return None


def packed_rows_of(queue: Queue, opcode: int, key) -> int:
    """The most packed rows any instruction of this attention opcode has (G x Sq, at most BM)."""
    most = 1
    for i in range(len(queue)):
        if int(queue.rows[i, Field.OPCODE]) == opcode:
            vq = int(queue.rows[i, Field.ARG0 + Q])
            most = max(most, min(key.bm, key.group * int(queue.views[vq, ViewField.SIZE0 + 2])))
    return most


def kv_shape(key, rows: int) -> tuple[int, int, int]:
    """(R, BNW, VEC) of attention_tile: packed rows held at once (the row groups' size), keys per
    warp per step, elements per thread along the head dim (16 bytes)."""
    r = min(MAX_ROWS, next_pow2(rows))
    vec = min(key.bd, 16 // max(key.k.itemsize, key.v.itemsize))
    tpw_n = 32 // min(32, key.bd // vec)  # lanes along the keys (the rest span the head dim)
    wide = max(key.k.itemsize, key.v.itemsize) // 2  # fp32 keys: twice the registers per element
    bnw = max(tpw_n, min(key.bn, WARP_KV_ELEMS // key.bd, WARP_PRODUCT_ELEMS // (r * key.bd * max(1, wide))))
    return r, bnw, vec


def head_dims_of(queue: Queue, opcode: int) -> set[int]:
    """The head dims (q's last dim) of this attention opcode's instructions."""
    views = {
        int(queue.rows[i, Field.ARG0 + Q]) for i in range(len(queue)) if int(queue.rows[i, Field.OPCODE]) == opcode
    }
    return {int(queue.views[v, ViewField.SIZE0 + 3]) for v in views}


def _emit_attention(key, opcode: int, queue: Queue) -> Emitted:
    r, bnw, vec = kv_shape(key, packed_rows_of(queue, opcode, key))
    d_vec = all(d % vec == 0 for d in head_dims_of(queue, opcode))
    mask_dt = gl_dtype(key.mask) if key.mask is not None else "gl.float32"
    dts = (
        ", ".join(gl_dtype(t) for t in (key.q, key.k, key.v)) + f", {mask_dt}, {gl_dtype(key.out)}, {gl_dtype(key.dot)}"
    )
    return Emitted(
        "",
        f"attention_tile(row, views_ptr, idx, ok, {dts}, {key.mask is not None}, {key.mask == torch.bool}, "
        f"{key.causal}, {key.scale!r}, {key.group}, {key.bm}, {key.bn}, {key.bd}, {key.split}, "
        f"{', '.join(map(str, key.units))}, {d_vec}, {r}, {bnw}, {vec}, {PF_STEPS}, num_warps)",
    )


def _emit_combine(key, opcode: int, queue: Queue) -> Emitted:
    return Emitted(
        "", f"attention_combine_tile(row, views_ptr, idx, ok, {gl_dtype(key.out)}, {key.bm}, {key.bd}, num_warps)"
    )


register(ATTENTION, GluonFamily(_attention_problem, _emit_attention, MODULE, ("attention_tile",)))
register(COMBINE, GluonFamily(_combine_problem, _emit_combine, MODULE, ("attention_combine_tile",)))
