"""Embedding lookup: out[r, :] = weight[indices[r], :], a tile is BR index rows."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from mkcompiler.ops.base import Work, linear_access, row_access, tl_dtype, whole
from mkcompiler.ops.common import arg, store_view, view_base, view_numel, view_offsets, view_size, view_stride
from mkcompiler.ops.reduce import RowAttrs, RowFamily
from mkcompiler.ops.registry import family, lowers

aten = torch.ops.aten


@triton.jit
def embedding_rows(
    row_ptr,
    addrs_ptr,
    views_ptr,
    W_DT: tl.constexpr,
    I_DT: tl.constexpr,
    Y_DT: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    Y_FLAT: tl.constexpr,
):
    vw = arg(row_ptr, 0)
    vi = arg(row_ptr, 1)
    vy = arg(row_ptr, 2)
    R = view_numel(views_ptr, vi)
    V = view_size(views_ptr, vw, 2)
    C = view_size(views_ptr, vw, 3)
    rows = arg(row_ptr, 3) * BR + tl.arange(0, BR)
    row_ok = rows < R
    idx = tl.load(view_base(addrs_ptr, views_ptr, vi, I_DT) + view_offsets(views_ptr, vi, rows), mask=row_ok, other=0)
    idx = idx.to(tl.int64)
    idx = tl.where(idx < 0, idx + V, idx)  # from the end, as tensor indexing
    ok = row_ok & (idx >= 0) & (idx < V)  # out-of-range ids read nothing (rows stay 0)
    w_ptr = view_base(addrs_ptr, views_ptr, vw, W_DT)
    sv = view_stride(views_ptr, vw, 2)
    sc = view_stride(views_ptr, vw, 3)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        col_ok = cols < C
        x = tl.load(w_ptr + idx[:, None] * sv + cols[None, :] * sc, mask=ok[:, None] & col_ok[None, :], other=0.0)
        store_view(
            addrs_ptr,
            views_ptr,
            vy,
            rows[:, None] * C + cols[None, :],
            row_ok[:, None] & col_ok[None, :],
            x.to(tl.float32),
            Y_DT,
            Y_FLAT,
        )


@lowers(aten.embedding.default)
def lower_embedding(ctx, node, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    if weight.rank != 2:
        ctx.unsupported(node, "embedding with a weight that is not 2-D")
    out = ctx.new_output(node)
    ctx.emit(node, "embedding", (weight, ctx.row_input(indices)), (out,), RowAttrs())
    return out


def _take(ctx, node, x, dim, index):
    """x indexed along `dim` by an integer tensor of any shape (out: x.shape[:dim] + index.shape +
    x.shape[dim + 1:]): an embedding lookup in x seen as [x.shape[dim], the other dims] (a copy
    first when those dims cannot be merged without one). Its rows are written in index order, so
    for dim > 0 they go to out seen with the index dims first: free when the dims before `dim`
    have size 1 (a batch of one, hidden[:, rows] before an LM head), else through a copy."""
    if x.rank == 0:
        ctx.unsupported(node, "indexing a 0-d tensor")
    dim %= x.rank
    n = x.shape[dim]
    others = x.numel // max(n, 1)
    moved = x.permute((dim, *range(dim), *range(dim + 1, x.rank)))
    weight = moved.reshape((n, others))
    if weight is None:
        weight = ctx.copy(moved).reshape((n, others))
    index = ctx.row_input(index) if index.rank else index.reshape((1,))
    out = ctx.new_output(node)
    k = out.rank - x.rank + 1  # the index's dims, at dim..dim+k of out
    order = (*range(dim, dim + k), *range(dim), *range(dim + k, out.rank))
    rows = out.permute(order).reshape((index.numel, others))
    if dim == 0 and out.shape[-1] == others:
        rows = out  # rank 2 and more, already a row per index
    if rows is not None:
        ctx.emit(node, "embedding", (weight, index), (rows,), RowAttrs())
        return out
    gathered = ctx.graph.new_tensor(node.name, (index.numel, others), out.dtype)
    ctx.emit(node, "embedding", (weight, index), (gathered,), RowAttrs())
    moved_out = out.permute(order)
    back = sorted(range(out.rank), key=order.__getitem__)  # the inverse of order
    ctx.copy_into(gathered.reshape(moved_out.shape).permute(back), out)
    return out


@lowers(aten.index_select.default)
def lower_index_select(ctx, node, x, dim, index):
    return _take(ctx, node, x, dim, index)


@lowers(aten.index.Tensor)
def lower_index(ctx, node, x, indices):
    """x[..., index] with one integer index tensor on any dim (x[:, rows]); several index tensors
    and boolean masks: refused."""
    given = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(given) != 1 or given[0][1].dtype == torch.bool:
        ctx.unsupported(node, "tensor indexing other than by one integer index tensor on one dim")
    dim, index = given[0]
    return _take(ctx, node, x, dim, index)


class EmbeddingKey(NamedTuple):
    kind: str
    weight: torch.dtype
    index: torch.dtype
    y: torch.dtype
    tile: tuple[int, int]
    y_flat: bool  # the output is contiguous


@family
class Embedding(RowFamily):
    kind = "embedding"
    routines = ("embedding_rows",)

    def rows(self, node):
        return node.inputs[1].numel

    def key(self, node):
        w, i = node.inputs
        y = node.outputs[0]
        return EmbeddingKey(self.kind, w.dtype, i.dtype, y.dtype, node.attrs.tile, y.is_contiguous())

    def emit(self, key, name):
        br, bc = key.tile
        return "", (
            f"embedding_rows({{row}}, {{addrs}}, {{views}}, {tl_dtype(key.weight)}, {tl_dtype(key.index)}, "
            f"{tl_dtype(key.y)}, {br}, {bc}, {key.y_flat})"
        )

    def regions(self, node, coords):
        w, i = node.inputs
        r0, r1 = self.row_range(node, coords)
        return [whole(w), linear_access(i, r0, r1)], [row_access(node.outputs[0], r0, r1)]

    def work(self, node, coords):
        """Per row: its index, one weight row in, one output row out (not the whole table that
        `regions` names for dependencies)."""
        r0, r1 = self.row_range(node, coords)
        w, i = node.inputs
        per_row = w.shape[1] * (w.dtype.itemsize + node.outputs[0].dtype.itemsize) + i.dtype.itemsize
        return Work(float((r1 - r0) * per_row))

    def reference(self, node, coords, tensor_of):
        r0, r1 = self.row_range(node, coords)
        w, i = node.inputs
        ids = tensor_of(i).reshape(-1)[r0:r1].long()
        ids = torch.where(ids < 0, ids + w.shape[0], ids)
        c = w.shape[1]
        tensor_of(node.outputs[0]).view(-1, c)[r0:r1] = tensor_of(w)[ids].to(node.outputs[0].dtype)
