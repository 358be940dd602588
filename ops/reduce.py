"""Row ops over the last dim: sum / mean / amax (keepdim or not) and softmax.

A tile is a block of BR rows; each row is swept in BC-column chunks, so any row length
works with one compiled routine. Also defines RowFamily, the tiling shared with norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from mkcompiler.ops.base import OpFamily, cdiv, linear_access, row_access, row_flags, tl_dtype
from mkcompiler.ops.common import aligned_stride, arg, load_view, store_view, view_numel, view_size
from mkcompiler.ops.registry import family, lowers

aten = torch.ops.aten
MODES = {"sum": 0, "mean": 1, "amax": 2}


@triton.jit
def row_shape(views_ptr, vx, X_DT: tl.constexpr, X_FLAT: tl.constexpr):
    """(row length C, number of rows R) of a row op's input view (last dim = row). With
    X_FLAT == 2 every row starts 16-byte aligned (key: base.row_flags), and C is written so
    that Triton sees it: masks then stay uniform across 16-byte vectors."""
    C = view_size(views_ptr, vx, 3)
    if X_FLAT == 2:
        C = aligned_stride(C, 128 // X_DT.primitive_bitwidth)
    return C, view_numel(views_ptr, vx) // C


@triton.jit
def reduce_rows(
    row_ptr,
    addrs_ptr,
    views_ptr,
    X_DT: tl.constexpr,
    Y_DT: tl.constexpr,
    MODE: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    X_FLAT: tl.constexpr,
    Y_FLAT: tl.constexpr,
):
    vx = arg(row_ptr, 0)
    vy = arg(row_ptr, 1)
    C, R = row_shape(views_ptr, vx, X_DT, X_FLAT)
    rows = arg(row_ptr, 2) * BR + tl.arange(0, BR)
    if MODE == 2:
        acc = tl.full([BR], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([BR], tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = load_view(addrs_ptr, views_ptr, vx, rows[:, None] * C + cols[None, :], mask, X_DT, X_FLAT)
        if MODE == 2:
            acc = tl.maximum(acc, tl.max(tl.where(mask, x, float("-inf")), axis=1))
        else:
            acc += tl.sum(x, axis=1)
    if MODE == 1:
        acc = acc / C
    store_view(addrs_ptr, views_ptr, vy, rows, rows < R, acc, Y_DT, Y_FLAT)


@triton.jit
def argmax_rows(
    row_ptr,
    addrs_ptr,
    views_ptr,
    X_DT: tl.constexpr,
    Y_DT: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    X_FLAT: tl.constexpr,
    Y_FLAT: tl.constexpr,
):
    """Index of the first maximum of each row (as torch.argmax)."""
    vx = arg(row_ptr, 0)
    vy = arg(row_ptr, 1)
    C, R = row_shape(views_ptr, vx, X_DT, X_FLAT)
    rows = arg(row_ptr, 2) * BR + tl.arange(0, BR)
    best = tl.full([BR], float("-inf"), tl.float32)
    best_i = tl.zeros([BR], tl.int32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = load_view(addrs_ptr, views_ptr, vx, rows[:, None] * C + cols[None, :], mask, X_DT, X_FLAT)
        x = tl.where(mask, x, float("-inf"))
        chunk_max = tl.max(x, axis=1)
        chunk_arg = (tl.argmax(x, axis=1, tie_break_left=True) + c0).to(tl.int32)
        better = chunk_max > best  # strict: an earlier chunk keeps ties
        best_i = tl.where(better, chunk_arg, best_i)
        best = tl.where(better, chunk_max, best)
    store_view(addrs_ptr, views_ptr, vy, rows, rows < R, best_i.to(tl.float32), Y_DT, Y_FLAT)


@triton.jit
def softmax_rows(
    row_ptr,
    addrs_ptr,
    views_ptr,
    X_DT: tl.constexpr,
    Y_DT: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    X_FLAT: tl.constexpr,
    Y_FLAT: tl.constexpr,
):
    vx = arg(row_ptr, 0)
    vy = arg(row_ptr, 1)
    C, R = row_shape(views_ptr, vx, X_DT, X_FLAT)
    rows = arg(row_ptr, 2) * BR + tl.arange(0, BR)
    row_ok = rows < R
    m = tl.full([BR], float("-inf"), tl.float32)
    s = tl.zeros([BR], tl.float32)
    for c0 in range(0, C, BC):  # online max and sum of exponentials
        cols = c0 + tl.arange(0, BC)
        mask = row_ok[:, None] & (cols[None, :] < C)
        x = load_view(addrs_ptr, views_ptr, vx, rows[:, None] * C + cols[None, :], mask, X_DT, X_FLAT)
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_new = tl.where(row_ok, m_new, 0.0)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        mask = row_ok[:, None] & (cols[None, :] < C)
        lin = rows[:, None] * C + cols[None, :]
        x = load_view(addrs_ptr, views_ptr, vx, lin, mask, X_DT, X_FLAT)
        store_view(addrs_ptr, views_ptr, vy, lin, mask, tl.exp(x - m[:, None]) / s[:, None], Y_DT, Y_FLAT)


@dataclass
class RowAttrs:
    """A row op's attributes (every RowFamily's attrs are one of these)."""

    tile: tuple[int, int] | None = None  # (BR rows per tile, BC columns per sweep step) (passes/tile.py)


@dataclass(kw_only=True)
class ReduceAttrs(RowAttrs):
    mode: str  # a key of MODES


class RowKey(NamedTuple):
    """Key of a row op x -> y whose routine takes (X_DT, Y_DT, BR, BC, X_FLAT, Y_FLAT) only."""

    kind: str
    x: torch.dtype
    y: torch.dtype
    tile: tuple[int, int]
    flat: tuple[int, ...]  # row_flags of x and y


class ReduceKey(NamedTuple):
    kind: str
    mode: str
    x: torch.dtype
    y: torch.dtype
    tile: tuple[int, int]
    flat: tuple[int, ...]  # row_flags of x and y


def _last_dim(ctx, node, x, dims):
    dims = [d % x.rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if dims != [x.rank - 1]:
        ctx.unsupported(node, f"reduction over dims {dims}: only the last dim is supported")


def _reduce(ctx, node, mode, x, dims, keepdim=False, dtype=None):
    _last_dim(ctx, node, x, dims)
    x = ctx.row_input(x)
    out = ctx.new_output(node)
    ctx.emit(node, "reduce", (x,), (out,), ReduceAttrs(mode=mode))
    return out


@lowers(aten.sum.dim_IntList)
def lower_sum(ctx, node, x, dims, keepdim=False, dtype=None):
    return _reduce(ctx, node, "sum", x, dims)


@lowers(aten.mean.dim)
def lower_mean(ctx, node, x, dims, keepdim=False, dtype=None):
    return _reduce(ctx, node, "mean", x, dims)


@lowers(aten.amax.default)
def lower_amax(ctx, node, x, dims=(), keepdim=False):
    return _reduce(ctx, node, "amax", x, dims)


@lowers(aten.argmax.default)
def lower_argmax(ctx, node, x, dim=None, keepdim=False):
    if dim is None:
        ctx.unsupported(node, "argmax over all elements (give dim=-1)")
    _last_dim(ctx, node, x, dim)
    out = ctx.new_output(node)
    ctx.emit(node, "argmax", (ctx.row_input(x),), (out,), RowAttrs())
    return out


@lowers(aten.amin.default)
def lower_amin(ctx, node, x, dims=(), keepdim=False):
    """-amax(-x)."""
    _last_dim(ctx, node, x, dims)
    neg = ctx.row_input(ctx.elementwise(None, "neg", x))
    meta = node.meta["val"]
    top = ctx.graph.new_tensor(node.name, tuple(meta.shape), meta.dtype)
    ctx.emit(node, "reduce", (neg,), (top,), ReduceAttrs(mode="amax"))
    return ctx.elementwise(node, "neg", top)


def _variance(ctx, node, x, dims, correction, out_meta):
    """(sum of (x - mean)^2, mean, N - correction) over the last dim (two passes: no
    cancellation); the sum has out_meta's shape (keepdim or not), the mean keeps the dim."""
    _last_dim(ctx, node, x, dims if dims is not None else list(range(x.rank)))
    n = x.shape[-1]
    correction = 1 if correction is None else correction
    rows = ctx.row_input(x)
    mean = ctx.graph.new_tensor(f"{node.name}_mean", tuple(x.shape[:-1]) + (1,), out_meta.dtype)
    ctx.emit(None, "reduce", (rows,), (mean,), ReduceAttrs(mode="mean"))
    dev = ctx.elementwise(None, "sub", x, mean)
    sq = ctx.row_input(ctx.elementwise(None, "mul", dev, dev))
    total = ctx.graph.new_tensor(f"{node.name}_ss", tuple(out_meta.shape), out_meta.dtype)
    ctx.emit(node, "reduce", (sq,), (total,), ReduceAttrs(mode="sum"))
    return total, mean, max(n - correction, 0)


@lowers(aten.var.correction, aten.std.correction)
def lower_var_std(ctx, node, x, dims=None, correction=None, keepdim=False):
    total, _, dof = _variance(ctx, node, x, dims, correction, node.meta["val"])
    var = ctx.elementwise(None if node.target == aten.std.correction else node, "div", total, float(dof))
    return ctx.elementwise(node, "sqrt", var) if node.target == aten.std.correction else var


@lowers(aten.var_mean.correction)
def lower_var_mean(ctx, node, x, dims=None, correction=None, keepdim=False):
    meta = node.meta["val"][0]
    total, mean, dof = _variance(ctx, node, x, dims, correction, meta)
    var = ctx.elementwise(None, "div", total, float(dof))
    return var, mean.reshape(tuple(meta.shape))


@lowers(aten.max.dim, aten.min.dim)
def lower_max_min_dim(ctx, node, x, dim, keepdim=False):
    """(values, indices) along the last dim: amax and argmax (of -x for min: the first of the
    smallest, as torch)."""
    _last_dim(ctx, node, x, dim)
    if node.target == aten.min.dim:
        x = ctx.elementwise(None, "neg", x)
    x = ctx.row_input(x)
    meta = node.meta["val"][0]
    values = ctx.graph.new_tensor(node.name, tuple(meta.shape), meta.dtype)
    ctx.emit(node, "reduce", (x,), (values,), ReduceAttrs(mode="amax"))
    indices = ctx.new_output(node, 1)
    ctx.emit(None, "argmax", (x,), (indices,), RowAttrs())
    if node.target == aten.min.dim:
        values = ctx.elementwise(None, "neg", values)
    return values, indices


@lowers(aten._softmax.default, aten.softmax.int)
def lower_softmax(ctx, node, x, dim, half_to_float=False):
    _last_dim(ctx, node, x, dim)
    x = ctx.row_input(x)
    out = ctx.new_output(node)
    ctx.emit(node, "softmax", (x,), (out,), RowAttrs())
    return out


class RowFamily(OpFamily):
    """Ops whose tile is BR whole rows of inputs[0] (last dim = row)."""

    def rows(self, node) -> int:
        x = node.inputs[0]
        return x.numel // x.shape[-1]

    def tiles(self, node):
        return [(b,) for b in range(cdiv(self.rows(node), node.attrs.tile[0]))]

    def row_range(self, node, coords):
        br = node.attrs.tile[0]
        return coords[0] * br, min((coords[0] + 1) * br, self.rows(node))

    def regions(self, node, coords):
        r0, r1 = self.row_range(node, coords)
        reads = [row_access(node.inputs[0], r0, r1)]
        reads += [row_access(v, 0, 1) for v in node.inputs[1:] if v is not None]  # per-column params
        # An output holds numel / rows elements per row: a whole row (softmax, norms) or one
        # (reductions, whose output's last dim is another dim of x when keepdim=False).
        rows = self.rows(node)
        return reads, [linear_access(v, r0 * (v.numel // rows), r1 * (v.numel // rows)) for v in node.outputs]

    def describe(self, node, coords):
        r0, r1 = self.row_range(node, coords)
        return f"{node.name}[rows {r0}:{r1}]"


@family
class Reduce(RowFamily):
    kind = "reduce"
    routines = ("reduce_rows",)

    def key(self, node):
        x, y = node.inputs[0], node.outputs[0]
        return ReduceKey(self.kind, node.attrs.mode, x.dtype, y.dtype, node.attrs.tile, row_flags(x, y))

    def label(self, key):
        return f"{self.kind}_{key.mode}"

    def emit(self, key, name):
        br, bc = key.tile
        return "", (
            f"reduce_rows({{row}}, {{addrs}}, {{views}}, {tl_dtype(key.x)}, {tl_dtype(key.y)}, {MODES[key.mode]}, "
            f"{br}, {bc}, {', '.join(map(str, key.flat))})"
        )

    def reference(self, node, coords, tensor_of):
        r0, r1 = self.row_range(node, coords)
        x = tensor_of(node.inputs[0])
        x = x.reshape(-1, x.shape[-1])[r0:r1].double()
        y = {"sum": lambda t: t.sum(-1), "mean": lambda t: t.mean(-1), "amax": lambda t: t.amax(-1)}[node.attrs.mode](x)
        out = tensor_of(node.outputs[0])
        idx = torch.unravel_index(torch.arange(r0, r1), out.shape)
        out[idx] = y.to(out.dtype)


class OneInOneOut(RowFamily):
    """A row op x -> y whose routine takes (X_DT, Y_DT, BR, BC, X_FLAT, Y_FLAT) only."""

    def key(self, node):
        x, y = node.inputs[0], node.outputs[0]
        return RowKey(self.kind, x.dtype, y.dtype, node.attrs.tile, row_flags(x, y))

    def emit(self, key, name):
        br, bc = key.tile
        args = f"{tl_dtype(key.x)}, {tl_dtype(key.y)}, {br}, {bc}, {', '.join(map(str, key.flat))}"
        return "", f"{self.routines[0]}({{row}}, {{addrs}}, {{views}}, {args})"


@family
class Argmax(OneInOneOut):
    kind = "argmax"
    routines = ("argmax_rows",)

    def reference(self, node, coords, tensor_of):
        r0, r1 = self.row_range(node, coords)
        x = tensor_of(node.inputs[0])
        y = x.reshape(-1, x.shape[-1])[r0:r1].float().argmax(-1)
        tensor_of(node.outputs[0]).view(-1)[r0:r1] = y.to(node.outputs[0].dtype)


@family
class Softmax(OneInOneOut):
    kind = "softmax"
    routines = ("softmax_rows",)

    def reference(self, node, coords, tensor_of):
        r0, r1 = self.row_range(node, coords)
        x = tensor_of(node.inputs[0])
        c = x.shape[-1]
        y = torch.softmax(x.reshape(-1, c)[r0:r1].double(), -1)
        tensor_of(node.outputs[0]).view(-1, c)[r0:r1] = y.to(node.outputs[0].dtype)
