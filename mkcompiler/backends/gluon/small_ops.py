"""The decode step's small op families on the Gluon backend: embedding lookups, indexed writes
(scatter: the KV-cache append) and row ops (reduce: sum / mean / amax; argmax, the greedy step's
last op; softmax; norm: RMSNorm / LayerNorm where no decode matmul folds it, i.e. before large-M
matmuls: prefill, large-batch decode). Each is the twin of its Triton routine in ops/
(embedding.embedding_rows, scatter._emit, reduce.reduce_rows / argmax_rows / softmax_rows,
norm.norm_rows): the SAME instruction args and views, the same arithmetic, in the compute
partition (none streams weights through the ring).

Row ops and the embedding are fixed device functions below (their keys are constexprs); the
scatter's routine is generated per opcode from the Triton one's line generators
(ops/elementwise.input_loads and expr_source for its values, ops/scatter.destination_lines for
its slots), translated line by line (elementwise.gluon_line), as the elementwise family's.

Gluon needs explicit layouts: a row op's [BR, BC] chunk is views.rows_layout, its rows that
layout's slice. Reductions combine with local @gluon.jit functions: gl.sum / gl.max take
Triton's @triton.jit combine functions, which the CPU suite's interpreter replaces.

Importing this module does no CUDA work and never fails without Gluon (tiles.HAVE_GLUON).
"""

from __future__ import annotations

import math

from mkcompiler.backends.gluon import tiles
from mkcompiler.backends.gluon.elementwise import VIEWS_MODULE, expr_problem, gluon_line, guarded
from mkcompiler.backends.gluon.family import Emitted, GluonFamily, register
from mkcompiler.backends.gluon.views import VIEW_HELPERS
from mkcompiler.ir.queue import Queue
from mkcompiler.ops.base import tl_dtype
from mkcompiler.ops.elementwise import expr_source, input_loads
from mkcompiler.ops.reduce import MODES
from mkcompiler.ops.scatter import destination_lines

MODULE = "mkcompiler.backends.gluon.small_ops"
EMBEDDING, SCATTER, REDUCE, ARGMAX, SOFTMAX, NORM = "embedding", "scatter", "reduce", "argmax", "softmax", "norm"
ROW_ROUTINES = {REDUCE: "reduce_rows", ARGMAX: "argmax_rows", SOFTMAX: "softmax_rows"}
INT32_MAX = 2**31 - 1

if tiles.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from mkcompiler.backends.gluon.tiles import add, arg, view_base, view_numel
    from mkcompiler.backends.gluon.views import (
        aligned_stride,
        load_view,
        rows_layout,
        store_view,
        view_offsets,
        view_size,
        view_stride,
    )

    _SUM, _MEAN, _AMAX = (gl.constexpr(MODES[m]) for m in ("sum", "mean", "amax"))
    _INT32_MAX = gl.constexpr(INT32_MAX)

    @gluon.jit
    def maximum(a, b):
        return gl.maximum(a, b)

    @gluon.jit
    def minimum(a, b):
        return gl.minimum(a, b)

    @gluon.jit
    def row_shape(views_ptr, vx, X_DT: gl.constexpr, X_FLAT: gl.constexpr):
        """(row length C, number of rows R) of a row op's input (ops/reduce.row_shape): with
        X_FLAT == 2 every row starts 16-byte aligned, and C is written so that the compiler sees it."""
        C = view_size(views_ptr, vx, 3)
        if X_FLAT == 2:
            C = aligned_stride(C, 128 // X_DT.primitive_bitwidth)
        return C, view_numel(views_ptr, vx) // C

    @gluon.jit
    def tile_rows(row, ins, i: gl.constexpr, BR: gl.constexpr, L: gl.constexpr):
        """The tile's BR row numbers (arg i: the tile's index), in the rows' slice of L."""
        return arg(row, ins, i) * BR + gl.arange(0, BR, layout=gl.SliceLayout(1, L))

    @gluon.jit
    def chunk_cols(c0, BC: gl.constexpr, L: gl.constexpr):
        return c0 + gl.arange(0, BC, layout=gl.SliceLayout(0, L))

    @gluon.jit
    def embedding_rows(
        row,
        views_ptr,
        ins,
        W_DT: gl.constexpr,
        I_DT: gl.constexpr,
        Y_DT: gl.constexpr,
        BR: gl.constexpr,
        BC: gl.constexpr,
        Y_FLAT: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """ops/embedding.embedding_rows: out[r, :] = weight[ids[r], :] for the tile's BR rows;
        negative ids count from the end, out-of-range ones write zeros."""
        L: gl.constexpr = rows_layout(BC, num_warps)
        vw = arg(row, ins, 0)
        vi = arg(row, ins, 1)
        vy = arg(row, ins, 2)
        R = view_numel(views_ptr, vi)
        V = view_size(views_ptr, vw, 2)
        C = view_size(views_ptr, vw, 3)
        rows = tile_rows(row, ins, 3, BR, L)
        row_ok = rows < R
        i_ptr = view_base(views_ptr, vi, I_DT) + view_offsets(views_ptr, vi, rows)
        ids = gl.load(i_ptr, mask=row_ok, other=0, cache_modifier=".cg").to(gl.int64)
        ids = gl.where(ids < 0, ids + V, ids)  # from the end, as tensor indexing
        ok = row_ok & (ids >= 0) & (ids < V)  # out-of-range ids read nothing (rows stay 0)
        w_ptr = view_base(views_ptr, vw, W_DT)
        sv = view_stride(views_ptr, vw, 2)
        sc = view_stride(views_ptr, vw, 3)
        for c0 in range(0, C, BC):
            cols = chunk_cols(c0, BC, L)
            col_ok = cols < C
            x = gl.load(w_ptr + ids[:, None] * sv + cols[None, :] * sc, mask=ok[:, None] & col_ok[None, :], other=0.0)
            lin = rows[:, None] * C + cols[None, :]
            store_view(views_ptr, vy, lin, row_ok[:, None] & col_ok[None, :], x.to(gl.float32), Y_DT, Y_FLAT)

    @gluon.jit
    def reduce_rows(
        row,
        views_ptr,
        ins,
        X_DT: gl.constexpr,
        Y_DT: gl.constexpr,
        MODE: gl.constexpr,
        BR: gl.constexpr,
        BC: gl.constexpr,
        X_FLAT: gl.constexpr,
        Y_FLAT: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """ops/reduce.reduce_rows: the sum, mean or max of each of the tile's rows."""
        L: gl.constexpr = rows_layout(BC, num_warps)
        vx = arg(row, ins, 0)
        vy = arg(row, ins, 1)
        C, R = row_shape(views_ptr, vx, X_DT, X_FLAT)
        rows = tile_rows(row, ins, 2, BR, L)
        if MODE == _AMAX:
            acc = gl.full([BR], float("-inf"), gl.float32, layout=gl.SliceLayout(1, L))
        else:
            acc = gl.zeros([BR], gl.float32, layout=gl.SliceLayout(1, L))
        for c0 in range(0, C, BC):
            cols = chunk_cols(c0, BC, L)
            mask = (rows[:, None] < R) & (cols[None, :] < C)
            x = load_view(views_ptr, vx, rows[:, None] * C + cols[None, :], mask, X_DT, X_FLAT)
            if MODE == _AMAX:
                acc = gl.maximum(acc, gl.reduce(gl.where(mask, x, float("-inf")), 1, maximum))
            else:
                acc += gl.reduce(x, 1, add)
        if MODE == _MEAN:
            acc = acc / C
        store_view(views_ptr, vy, rows, rows < R, acc, Y_DT, Y_FLAT)

    @gluon.jit
    def argmax_rows(
        row,
        views_ptr,
        ins,
        X_DT: gl.constexpr,
        Y_DT: gl.constexpr,
        BR: gl.constexpr,
        BC: gl.constexpr,
        X_FLAT: gl.constexpr,
        Y_FLAT: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """ops/reduce.argmax_rows: the index of the first maximum of each of the tile's rows (as
        torch.argmax), stored through fp32 as the Triton routine does (exact below 2**24)."""
        L: gl.constexpr = rows_layout(BC, num_warps)
        vx = arg(row, ins, 0)
        vy = arg(row, ins, 1)
        C, R = row_shape(views_ptr, vx, X_DT, X_FLAT)
        rows = tile_rows(row, ins, 2, BR, L)
        best = gl.full([BR], float("-inf"), gl.float32, layout=gl.SliceLayout(1, L))
        best_i = gl.zeros([BR], gl.int32, layout=gl.SliceLayout(1, L))
        for c0 in range(0, C, BC):
            cols = chunk_cols(c0, BC, L)
            mask = (rows[:, None] < R) & (cols[None, :] < C)
            x = load_view(views_ptr, vx, rows[:, None] * C + cols[None, :], mask, X_DT, X_FLAT)
            x = gl.where(mask, x, float("-inf"))
            chunk_max = gl.reduce(x, 1, maximum)
            # the chunk's first column holding its max (tl.argmax's tie_break_left)
            at_max = gl.where(x == chunk_max[:, None], cols[None, :], _INT32_MAX)
            chunk_arg = gl.reduce(at_max, 1, minimum).to(gl.int32)  # C < 2**31 (int64 view sizes)
            better = chunk_max > best  # strict: an earlier chunk keeps ties
            best_i = gl.where(better, chunk_arg, best_i)
            best = gl.where(better, chunk_max, best)
        store_view(views_ptr, vy, rows, rows < R, best_i.to(gl.float32), Y_DT, Y_FLAT)

    @gluon.jit
    def softmax_rows(
        row,
        views_ptr,
        ins,
        X_DT: gl.constexpr,
        Y_DT: gl.constexpr,
        BR: gl.constexpr,
        BC: gl.constexpr,
        X_FLAT: gl.constexpr,
        Y_FLAT: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """ops/reduce.softmax_rows: an online max and sum of exponentials, then the outputs."""
        L: gl.constexpr = rows_layout(BC, num_warps)
        vx = arg(row, ins, 0)
        vy = arg(row, ins, 1)
        C, R = row_shape(views_ptr, vx, X_DT, X_FLAT)
        rows = tile_rows(row, ins, 2, BR, L)
        row_ok = rows < R
        m = gl.full([BR], float("-inf"), gl.float32, layout=gl.SliceLayout(1, L))
        s = gl.zeros([BR], gl.float32, layout=gl.SliceLayout(1, L))
        for c0 in range(0, C, BC):
            cols = chunk_cols(c0, BC, L)
            mask = row_ok[:, None] & (cols[None, :] < C)
            x = load_view(views_ptr, vx, rows[:, None] * C + cols[None, :], mask, X_DT, X_FLAT)
            x = gl.where(mask, x, float("-inf"))
            m_new = gl.maximum(m, gl.reduce(x, 1, maximum))
            m_new = gl.where(row_ok, m_new, 0.0)
            s = s * gl.exp(m - m_new) + gl.reduce(gl.exp(x - m_new[:, None]), 1, add)
            m = m_new
        for c0 in range(0, C, BC):
            cols = chunk_cols(c0, BC, L)
            mask = row_ok[:, None] & (cols[None, :] < C)
            lin = rows[:, None] * C + cols[None, :]
            x = load_view(views_ptr, vx, lin, mask, X_DT, X_FLAT)
            store_view(views_ptr, vy, lin, mask, gl.exp(x - m[:, None]) / s[:, None], Y_DT, Y_FLAT)

    @gluon.jit
    def norm_rows(
        row,
        views_ptr,
        ins,
        X_DT: gl.constexpr,
        W_DT: gl.constexpr,
        B_DT: gl.constexpr,
        Y_DT: gl.constexpr,
        HAS_W: gl.constexpr,
        HAS_B: gl.constexpr,
        RMS: gl.constexpr,
        EPS: gl.constexpr,
        BR: gl.constexpr,
        BC: gl.constexpr,
        X_FLAT: gl.constexpr,
        W_FLAT: gl.constexpr,
        B_FLAT: gl.constexpr,
        Y_FLAT: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """ops/norm.norm_rows: LayerNorm (mean, then the variance of x - mean) or RMSNorm (the
        mean square) of each of the tile's rows, times the weight, plus the bias."""
        L: gl.constexpr = rows_layout(BC, num_warps)
        vx = arg(row, ins, 0)
        vw = arg(row, ins, 1)
        vb = arg(row, ins, 2)
        vy = arg(row, ins, 3)
        C, R = row_shape(views_ptr, vx, X_DT, X_FLAT)
        rows = tile_rows(row, ins, 4, BR, L)
        row_ok = rows < R
        mean = gl.zeros([BR], gl.float32, layout=gl.SliceLayout(1, L))
        if not RMS:
            for c0 in range(0, C, BC):
                cols = chunk_cols(c0, BC, L)
                mask = row_ok[:, None] & (cols[None, :] < C)
                mean += gl.reduce(
                    load_view(views_ptr, vx, rows[:, None] * C + cols[None, :], mask, X_DT, X_FLAT), 1, add
                )
            mean = mean / C
        var = gl.zeros([BR], gl.float32, layout=gl.SliceLayout(1, L))
        for c0 in range(0, C, BC):
            cols = chunk_cols(c0, BC, L)
            mask = row_ok[:, None] & (cols[None, :] < C)
            x = load_view(views_ptr, vx, rows[:, None] * C + cols[None, :], mask, X_DT, X_FLAT)
            d = gl.where(mask, x - mean[:, None], 0.0)
            var += gl.reduce(d * d, 1, add)
        rstd = 1.0 / gl.sqrt(var / C + EPS)  # ops/norm.norm_rstd
        for c0 in range(0, C, BC):
            cols = chunk_cols(c0, BC, L)
            col_ok = cols < C
            mask = row_ok[:, None] & col_ok[None, :]
            lin = rows[:, None] * C + cols[None, :]
            y = (load_view(views_ptr, vx, lin, mask, X_DT, X_FLAT) - mean[:, None]) * rstd[:, None]
            if HAS_W:
                y = y * load_view(views_ptr, vw, cols, col_ok, W_DT, W_FLAT)[None, :]
            if HAS_B:
                y = y + load_view(views_ptr, vb, cols, col_ok, B_DT, B_FLAT)[None, :]
            store_view(views_ptr, vy, lin, mask, y, Y_DT, Y_FLAT)


def gl_dtype(dtype) -> str:
    return tl_dtype(dtype).replace("tl.", "gl.")


# ---- embedding and row ops: calls of the routines above ----


def _emit_embedding(key, opcode: int, queue: Queue) -> Emitted:
    br, bc = key.tile
    dts = ", ".join(gl_dtype(d) for d in (key.weight, key.index, key.y))
    # y_flat is a bool (contiguous or not): 1 or 0 as the view helpers' FLAT
    return Emitted("", guarded(f"embedding_rows(row, views_ptr, idx, {dts}, {br}, {bc}, {int(key.y_flat)}, num_warps)"))


def _emit_row_op(key, opcode: int, queue: Queue) -> Emitted:
    """reduce (ReduceKey: its mode first), argmax and softmax (RowKey): (X_DT, Y_DT, BR, BC, flags)."""
    br, bc = key.tile
    mode = f"{MODES[key.mode]}, " if key.kind == REDUCE else ""
    args = f"{gl_dtype(key.x)}, {gl_dtype(key.y)}, {mode}{br}, {bc}, {', '.join(map(str, key.flat))}"
    return Emitted("", guarded(f"{ROW_ROUTINES[key.kind]}(row, views_ptr, idx, {args}, num_warps)"))


def _emit_norm(key, opcode: int, queue: Queue) -> Emitted:
    """norm (ops/norm.NormKey): the Triton call's arguments, an absent weight or bias as fp32 and
    its HAS_ flag False."""
    w, b = (gl_dtype(d) if d is not None else "gl.float32" for d in (key.weight, key.bias))
    br, bc = key.tile
    args = (
        f"{gl_dtype(key.x)}, {w}, {b}, {gl_dtype(key.y)}, {key.weight is not None}, {key.bias is not None}, "
        f"{key.rms}, {key.eps!r}, {br}, {bc}, {', '.join(map(str, key.flat))}"
    )
    return Emitted("", guarded(f"norm_rows(row, views_ptr, idx, {args}, num_warps)"))


# ---- scatter: generated per opcode ----


def scatter_routine(key, name: str) -> str:
    """The Gluon twin of ops/scatter._emit's routine: the update's elements of rows [r0, r1) in
    blocks of BLOCK, one index split (over the update's padded shape, a constant) per element
    serving the values (an elementwise expression of the value inputs), the index tensor(s) and
    the destination; each value stored at the slot its index gives (negative from the end,
    out of range: not written)."""
    expr, in_dtypes, idts, dim, dim2 = key.expr, key.in_dtypes, key.index_dtypes, key.dim, key.dim2
    shape, per_row, total = key.shape, key.per_row, math.prod(key.shape)
    k = len(in_dtypes)
    two = dim2 is not None
    names = ["vi", *(["vi2"] if two else []), "vo", "vb", "r0", "r1"]  # the args after the values, in order
    lines, result = expr_source(expr, k, "lin")
    limits = [f"view_size(views_ptr, vb, {dim})"] + ([f"view_size(views_ptr, vb, {dim2})"] if two else [])
    setup, store = destination_lines((dim, dim2)[: 1 + two], limits, idts, key.base)
    src = [
        "",
        "",
        "@gluon.jit",
        f"def {name}(row, views_ptr, ins, num_warps: gl.constexpr):",
        f"    BLOCK: gl.constexpr = {key.block}",
        "    LAYOUT: gl.constexpr = flat_layout(BLOCK, num_warps)",
        *(f"    {v} = arg(row, ins, {k + i})" for i, v in enumerate(names)),
        *(f"    {gluon_line(line)}" for line in setup),
        f"    for start in range(r0 * {per_row}, gl.minimum(r1 * {per_row}, {total}), BLOCK):",
        "        lin = start + gl.arange(0, BLOCK, layout=LAYOUT)",
        f"        mask = (lin < r1 * {per_row}) & (lin < {total})",
        f"        i0, i1, i2, i3 = split_index(lin, {shape[1]}, {shape[2]}, {shape[3]})",
    ]
    body = input_loads(expr, in_dtypes, key.flat, lambda i: f"arg(row, ins, {i})", True)
    body += lines + store(result)
    src += [f"        {gluon_line(line)}" for line in body]
    return "\n".join(src) + "\n"


def _emit_scatter(key, opcode: int, queue: Queue) -> Emitted:
    name = f"op{opcode}_scatter"
    return Emitted(scatter_routine(key, name), guarded(f"{name}(row, views_ptr, idx, num_warps)"))


register(EMBEDDING, GluonFamily(lambda key: None, _emit_embedding, MODULE, ("embedding_rows",)))
register(SCATTER, GluonFamily(lambda key: expr_problem(key.expr), _emit_scatter, VIEWS_MODULE, VIEW_HELPERS))
register(NORM, GluonFamily(lambda key: None, _emit_norm, MODULE, ("norm_rows",)))
for _kind, _routine in ROW_ROUTINES.items():
    register(_kind, GluonFamily(lambda key: None, _emit_row_op, MODULE, (_routine,)))
