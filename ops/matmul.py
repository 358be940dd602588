"""Matrix products: mm, addmm (bias), linear; C[M,N] = A[M,K] @ B[K,N] (+ bias[N]).

Tiles are BM x BN output blocks. Split-K (passes/split_k.py): the output is then a [S, M, N]
fp32 view of partial sums, tile (i, j, s) covers the s-th K chunk, and an elementwise op adds
the S partials (plus bias, cast) afterwards. Operands are 2-D strided views, so a transposed weight
(linear's W^T) is read in place. Accumulation is fp32; fp32 operands use `precision`
("ieee" by default: exact-ish fp32, "tf32" for speed).

A folded norm (passes/fuse_norm.py, decode): attrs.norm (FoldedNorm), A is the norm's input x and
MatmulInputs.norm_weight/norm_bias its weight g and bias b; A = norm(x) is computed by the tile.
A tile seeing all of K (Matmul.norm_in_loop) sums its rows' statistics in the K loop from the A
blocks it loads, feeds the dot x * g and normalises acc's rows at the end; a split-K tile sweeps
its rows for the statistics first and normalises each A block (matmul_tile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from mkcompiler.ops.base import (
    ALIGN_BYTES,
    OpFamily,
    Work,
    aligned,
    box_access,
    cdiv,
    flat_flags,
    tl_dtype,
    whole,
)
from mkcompiler.ops.common import aligned_stride, arg, view_base, view_base_aligned, view_size, view_stride
from mkcompiler.ops.kernel_lib import wait_in_tile
from mkcompiler.ops.norm import norm_reference, norm_rstd, norm_scale
from mkcompiler.ops.registry import family, lowers

from mkcompiler.ir.graph import View

aten = torch.ops.aten

# Stages of the software pipeline of a folded norm's statistics sweep (split-K tiles): its loads
# feed no dot, so Triton pipelines them only when the loop asks (tl.range's num_stages); without
# it every step waits for its load, K / BK round trips before the first weight load.
SWEEP_STAGES: tl.constexpr = tl.constexpr(3)
# Matmuls with at most this many rows stream their weights (decode: passes/tile.matmul_tile gives
# them BM = 16 blocks); their tiles wait themselves (Matmul.early_wait).
DECODE_ROWS = 16


@triton.jit
def a_rows(addrs_ptr, views_ptr, v, DT: tl.constexpr, K_UNIT: tl.constexpr, ALIGNED: tl.constexpr):
    """(base pointer, row stride, K stride) of an [M, K] A operand view. K_UNIT: a literal unit K
    stride, which lets Triton see contiguity and issue wide, coalesced loads (a stride read from
    the view table at run time would hide it); ALIGNED: a 16-byte aligned base and, with K_UNIT,
    a row stride Triton can see is a multiple of 16 bytes (Matmul.key)."""
    if ALIGNED:
        base = view_base_aligned(addrs_ptr, views_ptr, v, DT)
        rows = view_stride(views_ptr, v, 2)
        if K_UNIT:
            rows = aligned_stride(rows, 128 // DT.primitive_bitwidth)
    else:
        base = view_base(addrs_ptr, views_ptr, v, DT)
        rows = view_stride(views_ptr, v, 2)
    return base, rows, 1 if K_UNIT else view_stride(views_ptr, v, 3)


@triton.jit
def b_cols(
    addrs_ptr, views_ptr, v, DT: tl.constexpr, K_UNIT: tl.constexpr, N_UNIT: tl.constexpr, ALIGNED: tl.constexpr
):
    """(base pointer, K stride, N stride) of a [K, N] B operand view, as a_rows: with ALIGNED the
    stride beside a unit one is a multiple of 16 bytes."""
    sbk = 1 if K_UNIT else view_stride(views_ptr, v, 2)
    sbn = 1 if N_UNIT else view_stride(views_ptr, v, 3)
    if ALIGNED:
        base = view_base_aligned(addrs_ptr, views_ptr, v, DT)
        if K_UNIT:
            sbn = aligned_stride(sbn, 128 // DT.primitive_bitwidth)
        if N_UNIT:
            sbk = aligned_stride(sbk, 128 // DT.primitive_bitwidth)
    else:
        base = view_base(addrs_ptr, views_ptr, v, DT)
    return base, sbk, sbn


@triton.jit
def c_rows(addrs_ptr, views_ptr, v, ks, DT: tl.constexpr, N_UNIT: tl.constexpr, ALIGNED: tl.constexpr):
    """(base pointer of split ks, row stride, N stride) of the C view ([S, M, N] or [M, N]);
    ALIGNED (never with split-K: Matmul.key) as a_rows."""
    base = view_base(addrs_ptr, views_ptr, v, DT) + ks * view_stride(views_ptr, v, 1)
    scm = view_stride(views_ptr, v, 2)
    scn = 1 if N_UNIT else view_stride(views_ptr, v, 3)
    if ALIGNED:
        base = view_base_aligned(addrs_ptr, views_ptr, v, DT)
        if N_UNIT:
            scm = aligned_stride(scm, 128 // DT.primitive_bitwidth)
    return base, scm, scn


@triton.jit
def k_vector(addrs_ptr, views_ptr, v, DT: tl.constexpr, FLAT: tl.constexpr):
    """(base pointer, stride) of a [K] vector view (a folded norm's weight or bias). FLAT
    (Matmul.norm_key, ops/base.flat_flags): 1 a literal unit stride (no stride to load, and
    Triton sees the contiguity), 2 also a 16-byte aligned base."""
    if FLAT == 2:
        base = view_base_aligned(addrs_ptr, views_ptr, v, DT)
    else:
        base = view_base(addrs_ptr, views_ptr, v, DT)
    stride = 1 if FLAT else view_stride(views_ptr, v, 3)
    return base, stride


@triton.jit
def _extent(views_ptr, va, vb, vc, ks, BK: tl.constexpr, KN_DIV: tl.constexpr):
    """(M, K, N, k_lo, k_hi): the product's sizes and the tile's K chunk, chunk ks of S (S = 1
    when C is a plain [M, N] view: padded dim 1 has size 1). KN_DIV: K and N are multiples of
    8, so masks stay uniform across a 16-byte vector."""
    M = view_size(views_ptr, va, 2)
    K = view_size(views_ptr, va, 3)
    N = view_size(views_ptr, vb, 3)
    if KN_DIV:
        K = aligned_stride(K, 8)
        N = aligned_stride(N, 8)
    k_chunk = tl.cdiv(tl.cdiv(K, view_size(views_ptr, vc, 1)), BK) * BK
    k_lo = ks * k_chunk
    return M, K, N, k_lo, tl.minimum(K, k_lo + k_chunk)


@triton.jit
def _b_block(b_ptr, sbk, sbn, rn, N, k, k_hi, BK: tl.constexpr):
    """The [BK, BN] weight block at K offset k."""
    rk = k + tl.arange(0, BK)
    return tl.load(
        b_ptr + rk[:, None] * sbk + rn[None, :] * sbn, mask=(rk[:, None] < k_hi) & (rn[None, :] < N), other=0.0
    )


@triton.jit
def _norm_vectors(row_ptr, addrs_ptr, views_ptr, a_ptr, NRM):
    """(nw_ptr, snw, nb_ptr, snb): a folded norm's weight g and bias b ([K] vectors), addressed once
    per tile so that the K loop loads only their BK-slices, no view metadata (placeholders
    where absent)."""
    nw_ptr, snw, nb_ptr, snb = a_ptr, 0, a_ptr, 0
    if NRM[0]:
        if NRM[6]:
            nw_ptr, snw = k_vector(addrs_ptr, views_ptr, arg(row_ptr, 7), NRM[4], NRM[9])
        if NRM[7]:
            nb_ptr, snb = k_vector(addrs_ptr, views_ptr, arg(row_ptr, 8), NRM[5], NRM[10])
    return nw_ptr, snw, nb_ptr, snb


@triton.jit
def _first_block_then_wait(b_ptr, sbk, sbn, rn, N, k_lo, k_hi, BK: tl.constexpr, wait):
    """(b_first, ok, t_ready) of a tile that waits itself (Settings.early_weights): the first K
    step's weight block is asked for (and every view addressed, by the caller) before the inputs
    are waited for (kernel_lib.wait_in_tile). A tile whose inputs are already there becomes ready
    3-4 us after its fetch instead of 0.9 (H100): the wait seems to wait for the block."""
    b_first = _b_block(b_ptr, sbk, sbn, rn, N, k_lo, k_hi, BK)
    ok, t_ready = wait_in_tile(wait)
    # A select on the wait's answer keeps the block's move into shared memory (the dot's operand)
    # after the wait: without it the compiler put the move right after the load, so the tile
    # waited for its weights to arrive before it even started waiting for its inputs.
    return tl.where(ok != 0, b_first, 0.0), ok, t_ready


@triton.jit
def _norm_prologue(
    a_ptr, sam, sak, rm, M, K, k_lo, k_hi, nw_ptr, snw, nb_ptr, snb, BM: tl.constexpr, BK: tl.constexpr, NRM
):
    """What a folded norm needs before the K loop (after the wait): (shift, mean, rstd, g_next,
    nb_next); placeholders where a configuration does not use them (_a_block takes them all)."""
    RMS: tl.constexpr = NRM[1]
    shift = tl.zeros((BM,), dtype=tl.float32)
    mean = tl.zeros((BM,), dtype=tl.float32)
    rstd = tl.zeros((BM,), dtype=tl.float32)
    g_next = tl.zeros((BK,), dtype=NRM[4])  # the types of the loads that replace them
    nb_next = tl.zeros((BK,), dtype=NRM[5])
    if NRM[0]:
        if NRM[8]:
            # The tile sees all of K (no split-K): the rows' statistics are summed inside the K loop
            # from the A blocks it loads anyway, and the normalisation is applied to acc once at the
            # end (Matmul.norm_in_loop). A sweep over K before the loop puts at least a round trip
            # for x, and K / BK reduction steps, ahead of the first weight load.
            if not RMS:
                # LayerNorm works on x - c, c = each row's first element: the dot's A is rounded
                # before it is centred, and the variance is E[x^2] - mean^2, both of which lose
                # precision as |mean| grows against the spread; shifted by c they lose it only as far
                # as x[0] lies from the mean. Used first after the loop's first wait, so the load
                # overlaps the pipeline's first weight loads.
                shift = tl.load(a_ptr + rm * sam, mask=rm < M, other=0.0).to(tl.float32)
        else:
            # Split-K: the tile sees only its K chunk, the statistics need all of K: a sweep over
            # the tile's rows first (two for LayerNorm: mean, then the centred variance).
            if not RMS:
                for k in tl.range(0, K, BK, num_stages=SWEEP_STAGES):
                    rk = k + tl.arange(0, BK)
                    mask = (rm[:, None] < M) & (rk[None, :] < K)
                    x = tl.load(a_ptr + rm[:, None] * sam + rk[None, :] * sak, mask=mask, other=0.0)
                    mean += tl.sum(x.to(tl.float32), axis=1)
                mean = mean / K
            var = tl.zeros((BM,), dtype=tl.float32)
            for k in tl.range(0, K, BK, num_stages=SWEEP_STAGES):
                rk = k + tl.arange(0, BK)
                mask = (rm[:, None] < M) & (rk[None, :] < K)
                x = tl.load(a_ptr + rm[:, None] * sam + rk[None, :] * sak, mask=mask, other=0.0).to(tl.float32)
                d = tl.where(mask, x - mean[:, None], 0.0)
                var += tl.sum(d * d, axis=1)
            rstd = norm_rstd(var / K, NRM[2])
        # g's and b's slices are loaded one K step ahead: Triton's pipeliner leaves these loads
        # alone (a [BK] vector spread over the threads is one element per thread, too narrow for
        # cp.async), so loaded in the step that uses them, each step would wait for one.
        rk = k_lo + tl.arange(0, BK)
        if NRM[6]:
            g_next = tl.load(nw_ptr + rk * snw, mask=rk < k_hi, other=0.0)
        if NRM[7]:
            nb_next = tl.load(nb_ptr + rk * snb, mask=rk < k_hi, other=0.0)
    return shift, mean, rstd, g_next, nb_next


@triton.jit
def _a_block(k, tile, s1, s2, g_next, nb_next, BM: tl.constexpr, BK: tl.constexpr, NRM):
    """matmul_tile's A block at K offset k, as the dot takes it (a folded norm applied; its
    loop-carried statistics and next weight slices updated): (a, s1, s2, g_next, nb_next).
    `tile`: what matmul_tile fixed for the whole tile (a tuple, in this order); what a
    configuration does not use are placeholders."""
    a_ptr, sam, sak, rm, M, k_hi, shift, mean, rstd = tile[:9]
    nw_ptr, snw, nb_ptr, snb = tile[9:]
    RMS: tl.constexpr = NRM[1]
    HAS_NW: tl.constexpr = NRM[6]
    HAS_NB: tl.constexpr = NRM[7]
    rk = k + tl.arange(0, BK)
    a_mask = (rm[:, None] < M) & (rk[None, :] < k_hi)
    rows = tl.arange(0, BM)
    # LayerNorm's mean term needs gW = sum_k g_k W_kn and a bias bW = sum_k b_k W_kn: the dot
    # computes them in spare rows of the A block (past the tile's rows, which norm_in_loop
    # guarantees exist; BM >= 16 while decode has a row or a few).
    G_ROW: tl.constexpr = BM - 1
    B_ROW: tl.constexpr = BM - 1 if RMS else BM - 2
    a = tl.load(a_ptr + rm[:, None] * sam + rk[None, :] * sak, mask=a_mask, other=0.0)
    if NRM[0]:
        x = a.to(tl.float32)  # 0 where A is masked
        if HAS_NW:
            g = g_next.to(tl.float32)
            g_next = tl.load(nw_ptr + (rk + BK) * snw, mask=rk + BK < k_hi, other=0.0)
        if HAS_NB:
            nb = nb_next.to(tl.float32)
            nb_next = tl.load(nb_ptr + (rk + BK) * snb, mask=rk + BK < k_hi, other=0.0)
        if NRM[8]:
            if not RMS:
                x = tl.where(a_mask, x - shift[:, None], 0.0)
                s1 += tl.sum(x, axis=1)
            s2 += tl.sum(x * x, axis=1)
            # The dot's A is x * g, rounded to h's dtype as a stored h would be (then to the
            # dot's dtype, the same on a GPU); rstd (and mean) are applied to acc after the
            # loop. h = (x - mean) * rstd * g + b, so C = rstd * ((x*g) W - mean * gW) + bW
            # (x - c and mean - c for LayerNorm: the same C).
            y = x * g[None, :] if HAS_NW else x
            if not RMS:  # the spare row G_ROW carries g (1 without a weight), masked past k_hi
                y = tl.where(rows[:, None] == G_ROW, (g if HAS_NW else (rk < k_hi).to(tl.float32))[None, :], y)
            if HAS_NB:  # and B_ROW the bias
                y = tl.where(rows[:, None] == B_ROW, nb[None, :], y)
            a = y.to(NRM[3])
        else:  # as ops/norm.py computes and stores h, then zero where A is masked
            y = (x - mean[:, None]) * rstd[:, None]
            if HAS_NW:
                y = y * g[None, :]
            if HAS_NB:
                y = y + nb[None, :]
            a = tl.where(a_mask, y.to(NRM[3]), 0.0)
    return a, s1, s2, g_next, nb_next


@triton.jit
def _norm_epilogue(acc, s1, s2, K, BM: tl.constexpr, NRM):
    """acc with a folded norm summed in the K loop applied to its rows (see _a_block):
    C = rstd * ((x*g) W - mean * gW) + bW, gW and bW read from the spare rows."""
    if NRM[0] and NRM[8]:
        RMS: tl.constexpr = NRM[1]
        rows = tl.arange(0, BM)
        G_ROW: tl.constexpr = BM - 1
        B_ROW: tl.constexpr = BM - 1 if RMS else BM - 2
        if NRM[7]:
            bw = tl.sum(tl.where(rows[:, None] == B_ROW, acc, 0.0), axis=0)
        if RMS:
            acc = acc * norm_scale(s1, s2, K, NRM[2], RMS)[1][:, None]
        else:
            gw = tl.sum(tl.where(rows[:, None] == G_ROW, acc, 0.0), axis=0)
            mean, rstd = norm_scale(s1, s2, K, NRM[2], RMS)  # of x - c
            acc = (acc - mean[:, None] * gw[None, :]) * rstd[:, None]
        if NRM[7]:
            acc += bw[None, :]
    return acc


@triton.jit
def matmul_tile(row_ptr, addrs_ptr, views_ptr, DTS, HAS_BIAS: tl.constexpr, DOT, TILE, UNITS, NRM, wait=None):
    """One [BM, BN] tile of C (split-K: of its partial sum ks). Constexpr groups, as Matmul.emit
    writes them: DTS the (A, B, bias, C) dtypes; DOT tl.dot's (operand dtype, precision); TILE
    (BM, BN, BK); UNITS (MatmulKey.units) (A_K_UNIT, B_K_UNIT, B_N_UNIT, C_N_UNIT, A_ALIGNED,
    B_ALIGNED, C_ALIGNED, KN_DIV); NRM a folded norm's (NORM, RMS, EPS, H_DT, NW_DT, NB_DT, HAS_NW,
    HAS_NB, IN_LOOP, NW_FLAT, NB_FLAT). `wait`: the tile's own wait (Matmul.early_wait), or None."""
    BM: tl.constexpr = TILE[0]
    BN: tl.constexpr = TILE[1]
    BK: tl.constexpr = TILE[2]
    va = arg(row_ptr, 0)
    vb = arg(row_ptr, 1)
    vbias = arg(row_ptr, 2)
    vc = arg(row_ptr, 3)
    tm = arg(row_ptr, 4)
    tn = arg(row_ptr, 5)
    ks = arg(row_ptr, 6)
    M, K, N, k_lo, k_hi = _extent(views_ptr, va, vb, vc, ks, BK, UNITS[7])
    a_ptr, sam, sak = a_rows(addrs_ptr, views_ptr, va, DTS[0], UNITS[0], UNITS[4])
    b_ptr, sbk, sbn = b_cols(addrs_ptr, views_ptr, vb, DTS[1], UNITS[1], UNITS[2], UNITS[5])
    rm = tm * BM + tl.arange(0, BM)
    rn = tn * BN + tl.arange(0, BN)
    nw_ptr, snw, nb_ptr, snb = _norm_vectors(row_ptr, addrs_ptr, views_ptr, a_ptr, NRM)
    ok = 1
    t_ready = tl.zeros((), tl.int64)
    k_start = k_lo
    if wait is not None:  # every view above is addressed before the wait, and the first weights asked for
        b_first, ok, t_ready = _first_block_then_wait(b_ptr, sbk, sbn, rn, N, k_lo, k_hi, BK, wait)
        k_start = k_lo + BK
    if ok != 0:
        shift, mean, rstd, g_next, nb_next = _norm_prologue(
            a_ptr, sam, sak, rm, M, K, k_lo, k_hi, nw_ptr, snw, nb_ptr, snb, BM, BK, NRM
        )
        # What _a_block needs of the tile, fixed for all its K steps (one tuple: two call sites).
        tile = (a_ptr, sam, sak, rm, M, k_hi, shift, mean, rstd, nw_ptr, snw, nb_ptr, snb)
        s1 = tl.zeros((BM,), dtype=tl.float32)  # a norm summed in the K loop: sum x (LayerNorm)
        s2 = tl.zeros((BM,), dtype=tl.float32)  # and sum x^2
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        DOT_DT: tl.constexpr = DOT[0]
        PRECISION: tl.constexpr = DOT[1]
        if wait is not None:  # the first K step's weights came before the wait
            a, s1, s2, g_next, nb_next = _a_block(k_lo, tile, s1, s2, g_next, nb_next, BM, BK, NRM)
            acc = tl.dot(a.to(DOT_DT), b_first.to(DOT_DT), acc, input_precision=PRECISION)
        # The K loop stays here, in the function that owns its range: Triton pipelines it (num_stages).
        for k in range(k_start, k_hi, BK):
            a, s1, s2, g_next, nb_next = _a_block(k, tile, s1, s2, g_next, nb_next, BM, BK, NRM)
            b = _b_block(b_ptr, sbk, sbn, rn, N, k, k_hi, BK)
            acc = tl.dot(a.to(DOT_DT), b.to(DOT_DT), acc, input_precision=PRECISION)
        acc = _norm_epilogue(acc, s1, s2, K, BM, NRM)
        if HAS_BIAS:
            bias_ptr = view_base(addrs_ptr, views_ptr, vbias, DTS[2])
            bias = tl.load(bias_ptr + rn * view_stride(views_ptr, vbias, 3), mask=rn < N, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        c_ptr, scm, scn = c_rows(addrs_ptr, views_ptr, vc, ks, DTS[3], UNITS[3], UNITS[6])
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(DTS[3]), mask=mask)
    if wait is not None:
        return ok, t_ready


@dataclass(frozen=True)
class FoldedNorm:
    """A row norm folded into the matmul (passes/fuse_norm.py): A = norm(x), as ops/norm.py computes it."""

    rms: bool
    eps: float
    h_dtype: torch.dtype  # the norm's output dtype: what A is rounded to
    name: str = ""  # the norm op's (reports)


@dataclass
class MatmulAttrs:
    norm: FoldedNorm | None = None  # passes/fuse_norm.py
    bn: int | None = None  # a decode BN for the op's sibling group (passes/split_k.decode_tiling)
    dot: tuple[torch.dtype, str] | None = None  # tl.dot's (operand dtype, precision) (passes/tile.py)
    tile: tuple[int, int, int] | None = None  # (BM, BN, BK) (passes/tile.py)
    group_rows: int = 1  # queue order of the tiles (Matmul.tiles)
    # No op of the graph writes B (a parameter, or an input the kernel never writes): its loads
    # may be issued before the tile's wait (Matmul.early_wait). passes/tile.py sets it.
    b_fixed: bool = False


class MatmulInputs(NamedTuple):
    """A matmul's inputs by name (node.inputs in this order; the norm's only with a folded norm)."""

    a: View  # with a folded norm: the norm's input x
    b: View
    bias: View | None
    norm_weight: View | None = None
    norm_bias: View | None = None


class FoldedNormKey(NamedTuple):
    """What matmul_tile specialises on of a folded norm."""

    rms: bool
    eps: float
    h_dtype: torch.dtype
    weight_dtype: torch.dtype | None
    bias_dtype: torch.dtype | None
    in_loop: bool  # Matmul.norm_in_loop
    weight_flat: int  # flat_flags of the weight and the bias
    bias_flat: int


class MatmulKey(NamedTuple):
    kind: str
    a: torch.dtype
    b: torch.dtype
    bias: torch.dtype | None
    c: torch.dtype
    dot: torch.dtype
    precision: str
    tile: tuple[int, int, int]
    units: tuple[bool, ...]  # matmul_tile's UNITS (A_K_UNIT .. KN_DIV, in its order)
    norm: FoldedNormKey | None
    b_fixed: bool  # MatmulAttrs.b_fixed


def _norm_reference(x, node, tensor_of):
    norm, ins = node.attrs.norm, Matmul.operands(node)
    w, b = (tensor_of(v) if v is not None else None for v in (ins.norm_weight, ins.norm_bias))
    return norm_reference(x, norm.rms, norm.eps, w, b).to(norm.h_dtype)


def _norm_in_loop_reference(x, w, node, tensor_of):
    """x @ w with x's rows normalised as matmul_tile's one-pass path does it (Matmul.norm_in_loop):
    the dot's A is x * g rounded to h's dtype, each row of the product is scaled by rstd at the
    end; LayerNorm (on x shifted by its row's first element) subtracts rstd * mean * (g W) and a
    bias adds b W, g and b rounded to h's dtype
    as the kernel's spare A rows are. That rounds x * g where storing h rounds the normalised
    value: the results differ by bf16 rounding, so these tiles are specified here, not by
    _norm_reference (which split-K tiles, sweeping first, still match exactly)."""
    norm, ins = node.attrs.norm, Matmul.operands(node)
    nw, nb, h_dtype = ins.norm_weight, ins.norm_bias, norm.h_dtype
    xs, w = x.double(), w.double()
    g = tensor_of(nw).double() if nw is not None else torch.ones(xs.shape[-1], dtype=torch.float64)
    if norm.rms:
        acc = (xs * g).to(h_dtype).double() @ w
        acc = acc * torch.rsqrt((xs * xs).mean(-1, keepdim=True) + norm.eps)
    else:  # on x - (each row's first element), as the kernel
        xs = xs - xs[:, :1]
        acc = (xs * g).to(h_dtype).double() @ w
        mean = xs.mean(-1, keepdim=True)
        rstd = torch.rsqrt(xs.var(-1, unbiased=False, keepdim=True) + norm.eps)
        acc = (acc - mean * (g.to(h_dtype).double() @ w)) * rstd
    if nb is not None:
        acc = acc + tensor_of(nb).to(h_dtype).double() @ w
    return acc


def _as_2d(ctx, v: View) -> View:
    """Flatten leading dims of a matmul operand (no copy when strides allow)."""
    if v.rank == 2:
        return v
    flat = v.reshape((-1, v.shape[-1]))
    return flat if flat is not None else ctx.copy(v).reshape((-1, v.shape[-1]))


@lowers(aten.mm.default)
def lower_mm(ctx, node, a, b):
    return ctx.emit_matmul(node, a, b, None)


@lowers(aten.addmm.default)
def lower_addmm(ctx, node, bias, a, b, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        ctx.unsupported(node, "addmm with beta/alpha != 1")
    if bias.rank == 2 and bias.shape[0] != 1:
        ctx.unsupported(node, "addmm with a 2-D (per-row) bias")
    return ctx.emit_matmul(node, a, b, bias.reshape((bias.shape[-1],)) if bias.rank == 2 else bias)


@lowers(aten.linear.default)
def lower_linear(ctx, node, x, w, bias=None):
    x2 = _as_2d(ctx, x)
    out = ctx.emit_matmul(node, x2, w.permute((1, 0)), bias)
    return out.reshape(x.shape[:-1] + (w.shape[0],))


@lowers(aten.matmul.default)
def lower_matmul(ctx, node, a, b):
    if b.rank != 2 or a.rank < 1:
        ctx.unsupported(node, "matmul of batched right operand")
    a2 = _as_2d(ctx, a if a.rank > 1 else a.unsqueeze(0))
    out = ctx.emit_matmul(node, a2, b, None)
    return out.reshape(tuple(a.shape[:-1]) + (b.shape[1],))


def _stride_aligned(v: View, dim: int) -> bool:
    return v.shape[dim] == 1 or (v.strides[dim] * v.dtype.itemsize) % ALIGN_BYTES == 0


@family
class Matmul(OpFamily):
    kind = "matmul"
    routines = ("matmul_tile",)

    @staticmethod
    def operands(node) -> MatmulInputs:
        return MatmulInputs(*node.inputs)

    def key(self, node):
        a, b, bias = self.operands(node)[:3]
        c = node.outputs[0]
        dot, prec = node.attrs.dot
        a_k, b_k, b_n, c_n = (
            a.strides[1] == 1,
            b.strides[0] == 1,
            b.strides[1] == 1 and b.strides[0] != 1,
            c.strides[-1] == 1,
        )
        units = (a_k, b_k, b_n, c_n)
        # X_ALIGNED makes the kernel take the stride of the dim beside a unit one as a multiple of
        # 16 bytes. aligned() skips every stride-1 dim, so it must be checked here: a [M, 1] view
        # with strides (1, 1) is "unit" along its size-1 dim and has an M stride of one element.
        a_al = aligned(a) and (not a_k or _stride_aligned(a, 0))
        b_al = aligned(b) and (not b_k or _stride_aligned(b, 1)) and (not b_n or _stride_aligned(b, 0))
        c_al = aligned(c) and self.splits(node) == 1 and (not c_n or _stride_aligned(c, -2))
        units += (a_al, b_al, c_al)
        units += (a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0,)
        return MatmulKey(
            self.kind,
            a.dtype,
            b.dtype,
            bias.dtype if bias is not None else None,
            c.dtype,
            dot,
            prec,
            node.attrs.tile,
            units,
            self.norm_key(node),
            node.attrs.b_fixed,
        )

    def norm_key(self, node) -> FoldedNormKey | None:
        norm = node.attrs.norm
        if norm is None:
            return None
        ins = self.operands(node)
        nw, nb = ins.norm_weight, ins.norm_bias
        dtypes = (nw.dtype if nw is not None else None, nb.dtype if nb is not None else None)
        return FoldedNormKey(norm.rms, norm.eps, norm.h_dtype, *dtypes, self.norm_in_loop(node), *flat_flags(nw, nb))

    def norm_in_loop(self, node) -> bool:
        """Does the tile compute its folded norm's statistics inside the K loop (one pass, the
        rows normalised at the end) rather than in a sweep over K first? Only when every tile sees
        all of K (no split-K) and, for LayerNorm or a norm bias, the A block has spare rows past
        M for the dot to compute gW (and bW) in (matmul_tile). (Split-K tiles summing the other
        chunks' statistics in their loop spilled and were slower: RESULTS.md, session 6.)"""
        ins = self.operands(node)
        spare = (0 if node.attrs.norm.rms else 1) + (ins.norm_bias is not None)
        return self.splits(node) == 1 and ins.a.shape[0] + spare <= node.attrs.tile[0]

    def view_args(self, node):
        ins = self.operands(node)
        return [ins.a, ins.b, ins.bias, node.outputs[0]]  # then tile coords

    def instruction_tail(self, node):
        ins = self.operands(node)
        return [ins.norm_weight, ins.norm_bias] if node.attrs.norm is not None else []

    def emit(self, key, name):
        bias, norm = key.bias, key.norm
        dts = (key.a, key.b, bias if bias is not None else torch.float32, key.c)
        if norm is None:
            nrm = "False, True, 0.0, tl.float32, tl.float32, tl.float32, False, False, False, 1, 1"
        else:
            nw_dt, nb_dt = norm.weight_dtype, norm.bias_dtype
            nrm = (
                f"True, {norm.rms}, {norm.eps!r}, {tl_dtype(norm.h_dtype)}, "
                f"{tl_dtype(nw_dt) if nw_dt else 'tl.float32'}, "
                f"{tl_dtype(nb_dt) if nb_dt else 'tl.float32'}, {nw_dt is not None}, {nb_dt is not None}, "
                f"{norm.in_loop}, {norm.weight_flat}, {norm.bias_flat}"
            )
        return "", (  # {wait}: the tile's own wait (early_wait), or None
            f"matmul_tile({{row}}, {{addrs}}, {{views}}, ({', '.join(map(tl_dtype, dts))}), {bias is not None}, "
            f"({tl_dtype(key.dot)}, {key.precision!r}), {key.tile}, {key.units}, ({nrm}), wait={{wait}})"
        )

    def early_wait(self, key) -> bool:
        """A decode matmul tile (BM at most DECODE_ROWS) whose B nothing writes (a weight) waits
        itself: its first B block and every view's address are asked for first (matmul_tile's
        `wait`). A B that another instruction writes (x @ y.T of two activations) must not be read
        before the wait: the GPU fuzz found such tiles reading unwritten memory. Larger tiles keep
        the dispatcher's wait: their first block would hold registers across it (a Llama prefill
        kernel spilled) for a load that is a small part of their time."""
        return key.tile[0] <= DECODE_ROWS and key.b_fixed

    def splits(self, node) -> int:
        c = node.outputs[0]
        return c.shape[0] if c.rank == 3 else 1

    def k_range(self, node, s: int) -> tuple[int, int]:
        """K chunk of split s; the kernel computes the same chunks."""
        k = self.operands(node).a.shape[1]
        bk = node.attrs.tile[2]
        chunk = cdiv(cdiv(k, self.splits(node)), bk) * bk
        return min(k, s * chunk), min(k, (s + 1) * chunk)

    def tiles(self, node):
        """(row block, column block, K split) in queue order: per split, groups of group_rows
        row blocks (Settings.matmul_group_rows), column by column, each column's rows together."""
        bm, bn, _ = node.attrs.tile
        m, n = node.outputs[0].shape[-2:]
        rows, cols, g = cdiv(m, bm), cdiv(n, bn), node.attrs.group_rows
        order = [(i, j) for i0 in range(0, rows, g) for j in range(cols) for i in range(i0, min(i0 + g, rows))]
        return [(i, j, s) for s in range(self.splits(node)) for i, j in order]

    def regions(self, node, coords):
        ins = self.operands(node)
        a, b, bias = ins.a, ins.b, ins.bias
        c = node.outputs[0]
        bm, bn, _ = node.attrs.tile
        i, j, s = coords
        m, n = c.shape[-2:]
        rows = (i * bm, min((i + 1) * bm, m))
        cols = (j * bn, min((j + 1) * bn, n))
        ks = self.k_range(node, s)
        reads = [box_access(b, (ks, cols))]
        if bias is not None:
            reads.append(box_access(bias, (cols,)))
        # A folded norm reads whole rows of x (its statistics), and its weight and bias.
        a_ks = (0, a.shape[1]) if node.attrs.norm is not None else ks
        reads.append(box_access(a, (rows, a_ks)))
        reads += [whole(v) for v in (ins.norm_weight, ins.norm_bias) if v is not None]
        out = box_access(c, ((s, s + 1), rows, cols)) if c.rank == 3 else box_access(c, (rows, cols))
        return reads, [out]

    def work(self, node, coords):
        """The tile's real rows and columns (edge tiles clipped) over its K range: A and B in,
        bias and C out."""
        a, b, bias = self.operands(node)[:3]
        c = node.outputs[0]
        bm, bn, _ = node.attrs.tile
        i, j, s = coords
        m, n = c.shape[-2:]
        rows, cols = min(bm, m - i * bm), min(bn, n - j * bn)
        k0, k1 = self.k_range(node, s)
        k = k1 - k0
        nbytes = rows * k * a.dtype.itemsize + k * cols * b.dtype.itemsize + rows * cols * c.dtype.itemsize
        if bias is not None:
            nbytes += cols * bias.dtype.itemsize
        return Work(float(nbytes), 2.0 * rows * cols * k)

    def describe(self, node, coords):
        bm, bn, _ = node.attrs.tile
        split = f", k{self.k_range(node, coords[2])[0]}:" if self.splits(node) > 1 else ""
        return f"{node.name}[m{coords[0] * bm}:+{bm}, n{coords[1] * bn}:+{bn}{split}]"

    def reference(self, node, coords, tensor_of):
        a, b, bias = self.operands(node)[:3]
        c = node.outputs[0]
        bm, bn, _ = node.attrs.tile
        i, j, s = coords
        rs, cs = slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn)
        k0, k1 = self.k_range(node, s)
        if node.attrs.norm is not None and self.norm_in_loop(node):
            acc = _norm_in_loop_reference(tensor_of(a)[rs], tensor_of(b)[:, cs], node, tensor_of)
        else:
            x = tensor_of(a)[rs]
            if node.attrs.norm is not None:  # h = norm(x) as ops/norm.py stores it
                x = _norm_reference(x, node, tensor_of)
            acc = x[:, k0:k1].double() @ tensor_of(b)[k0:k1, cs].double()
        if bias is not None:
            acc = acc + tensor_of(bias)[cs].double()
        out = tensor_of(c)
        (out[s] if c.rank == 3 else out)[rs, cs] = acc.to(c.dtype)
