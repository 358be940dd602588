"""Indexed writes: index_put / index_copy (KV-cache appends).

`base[..., index[j], ...] = values[..., j, ...]` for a runtime index tensor; or, with a second
1-D index tensor of the same length on a later dim (index_put only: a cache row and a position
per sequence, `cache[rows, :, pos] = k`), `base[.., index[j], .., index2[j], ..] = values[j]`.
When `base` is model state (a mutated buffer: torch.export functionalizes `cache[:, :, pos] = k`
into index_put + a write-back), the write happens in place, in the state's own storage: regions
make the old value's readers finish first (write-after-read) and the new value's readers wait
for it (read-after-write). The written slot is only known at run time, so a tile's
write region covers every slot of its rows. Out-of-range indices write nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from mkcompiler.ops.base import OpFamily, Work, flat_flags, linear_access, tl_dtype, whole
from mkcompiler.ops.registry import family, lowers

from mkcompiler.ir.graph import View

aten = torch.ops.aten
TILE_ELEMENTS = 4096  # elements of `values` per tile (whole rows)


@dataclass
class ScatterAttrs:
    dim: int  # the (first) indexed dim of the base
    dim2: int | None = None  # the second indexed dim (two index tensors)
    expr: tuple | None = None  # fused values (passes/fuse.py): an elementwise expression of the value inputs


class ScatterInputs(NamedTuple):
    """A scatter's inputs by name (node.inputs: the value input(s), index tensor(s), update, base)."""

    values: list[View]
    indices: list[View]
    update: View
    base: View


class ScatterKey(NamedTuple):
    kind: str
    expr: tuple
    in_dtypes: tuple
    index_dtypes: tuple
    base: torch.dtype
    dim: int  # padded to 4 dims
    dim2: int | None
    block: int
    flat: tuple[int, ...]  # flat_flags of the value inputs
    shape: tuple[int, ...]  # the update's padded shape
    per_row: int


def _index_dims(ctx, node, indices) -> list[int]:
    """The dims indexed by tensors: one, or two whose 1-D index tensors have the same length."""
    dims = [d for d, ix in enumerate(indices) if ix is not None]
    ok = len(dims) in (1, 2) and all(indices[d].rank == 1 for d in dims)
    if not ok or indices[dims[-1]].shape != indices[dims[0]].shape:
        ctx.unsupported(node, "index_put with other than one 1-D index tensor or two of one length")
    return dims


def _update(base: View, dims: list[int], n: int) -> View:
    """The part of base a scatter's values land on once placed at index 0 of each indexed dim:
    extent n along the first indexed dim (the values' j), 1 along the second."""
    update = base.slice(dims[0], 0, n)
    return update.slice(dims[1], 0, 1) if len(dims) == 2 else update


def _placed(values: View, base: View, dims: list[int], n: int) -> View:
    """Two indexed dims: the values (in torch's advanced-indexing layout: the indexed dims become
    one of length n, in their place when adjacent, else first) laid out as _update's shape."""
    d0, d1 = dims
    rest = [base.shape[d] for d in range(base.rank) if d not in dims]
    if d1 == d0 + 1:
        values = values.expand(tuple(rest[:d0]) + (n,) + tuple(rest[d0:]))
    else:
        values = values.expand((n, *rest))  # j first, then the other dims in order
        others = [d for d in range(base.rank) if d not in dims]
        values = values.permute([0 if d == d0 else 1 + others.index(d) for d in range(base.rank) if d != d1])
    return values.unsqueeze(d1)


def _scatter(ctx, node, base: View, dims: list[int], indices: list[View], values: View):
    if not isinstance(values, View):
        ctx.unsupported(node, "a scalar value")
    n = indices[0].shape[0]
    if not ctx.writable_in_place(node, base):
        base = ctx.copy(base)
    update = _update(base, dims, n)  # base's strides, the index's extent along dims[0]
    if len(dims) == 2:
        values = _placed(values, base, dims, n)
    attrs = ScatterAttrs(dims[0], dims[1] if len(dims) == 2 else None)
    ctx.emit(node, "scatter", (values.expand(update.shape), *indices, update, base), (base,), attrs)
    return base


@lowers(aten.index_put.default, aten.index_put_.default)
def lower_index_put(ctx, node, base, indices, values, accumulate=False):
    if accumulate:
        ctx.unsupported(node, "index_put with accumulate=True")
    indices = list(indices) + [None] * (base.rank - len(indices))
    dims = _index_dims(ctx, node, indices)
    return _scatter(ctx, node, base, dims, [indices[d] for d in dims], values)


@lowers(aten.index_copy.default, aten.index_copy_.default)
def lower_index_copy(ctx, node, base, dim, index, values):
    return _scatter(ctx, node, base, [dim % base.rank], [index], values)


@lowers(aten.slice_scatter.default)
def lower_slice_scatter(ctx, node, base, src, dim=0, start=None, end=None, step=1):
    """`base` with base[start:end:step] along dim replaced by src. `cache[:b, :, pos] = k` with
    b below the cache's batch exports as index_put on a slice of the cache, then a
    slice_scatter of that back: the index_put already wrote in the cache's own storage, so
    src *is* that slice and there is nothing left to copy."""
    dim %= base.rank
    start, end = 0 if start is None else start, base.shape[dim] if end is None else end
    if src == base.slice(dim, start, end, step):
        return base
    if not ctx.writable_in_place(node, base):
        base = ctx.copy(base)
    ctx.copy_into(src, base.slice(dim, start, end, step), node)
    return base


def written_rows(base: View, dim: int, r0: int, r1: int):
    """What a scatter writing rows [r0, r1) of base (its dims before `dim`) may write: every
    slot of those rows (the slot is known at run time only); all of base when strided."""
    if not base.is_contiguous():
        return whole(base)
    row = math.prod(base.shape[dim:])
    return linear_access(base, r0 * row, r1 * row)


def tail_size(node) -> int:
    """A scatter's inputs after its values: its index tensor(s), the update, the base."""
    return 4 if node.attrs.dim2 is not None else 3


def parts(node) -> ScatterInputs:
    k = len(node.inputs) - tail_size(node)
    *indices, update, base = node.inputs[k:]
    return ScatterInputs(list(node.inputs[:k]), indices, update, base)


@family
class Scatter(OpFamily):
    kind = "scatter"

    def view_args(self, node):
        return list(node.inputs)  # the value input(s), index(es), update, base; then rows r0, r1

    def padded_dim(self, node) -> int:
        update = parts(node).update
        if update.rank > 4:
            raise NotImplementedError("index_put on a tensor of rank > 4")
        return node.attrs.dim + 4 - update.rank

    def values(self, node) -> list[View]:
        """The value inputs: one view, or (fused, passes/fuse.fuse_into_scatter) the inputs of
        node.attrs.expr, all expanded to the update's shape."""
        return parts(node).values

    @staticmethod
    def expr(node):
        """The values as an elementwise expression of the value inputs (a plain scatter: x0)."""
        return node.attrs.expr if node.attrs.expr is not None else ("in", 0)

    def key(self, node):
        values, indices, update, base = parts(node)
        _, per_row = self.rows(node)
        dim2 = node.attrs.dim2
        return ScatterKey(
            self.kind,
            self.expr(node),
            tuple(v.dtype for v in values),
            tuple(i.dtype for i in indices),
            base.dtype,
            self.padded_dim(node),
            None if dim2 is None else dim2 + 4 - update.rank,
            1024,
            flat_flags(*values),
            update.padded(4)[0],
            per_row,
        )

    def emit(self, key, name):
        return _emit(key, name)

    def rows(self, node) -> tuple[int, int]:
        update, dim = parts(node).update, node.attrs.dim
        outer = math.prod(update.shape[:dim])
        per_row = math.prod(update.shape[dim:])
        return outer, per_row

    def tiles(self, node):
        outer, per_row = self.rows(node)
        step = max(1, TILE_ELEMENTS // max(per_row, 1))
        return [(r, min(r + step, outer)) for r in range(0, outer, step)]

    def regions(self, node, coords):
        values, indices, update, base = parts(node)
        r0, r1 = coords
        _, per_row = self.rows(node)
        written = written_rows(base, node.attrs.dim, r0, r1)
        from mkcompiler.ops.elementwise import slot_windows, window_access

        windows = slot_windows(self.expr(node))
        lo, hi = r0 * per_row, r1 * per_row
        reads = [
            window_access(v, lo, hi, windows[k]) if k in windows else linear_access(v, lo, hi)
            for k, v in enumerate(values)
        ]
        return reads + [whole(i) for i in indices], [written]

    def work(self, node, coords):
        """Per row: the values in and the written row of the base out; the indices whole."""
        values, indices, _, base = parts(node)  # one value view, or a fused expression's inputs
        _, per_row = self.rows(node)
        row_bytes = per_row * (sum(v.dtype.itemsize for v in values) + base.dtype.itemsize)
        index_bytes = sum(i.numel * i.dtype.itemsize for i in indices)
        return Work(float((coords[1] - coords[0]) * row_bytes + index_bytes))

    def describe(self, node, coords):
        return f"{node.name}[rows {coords[0]}:{coords[1]}]"

    def reference(self, node, coords, tensor_of):
        values, indices, update, base = parts(node)
        dim = node.attrs.dim
        r0, r1 = coords
        b = tensor_of(base).reshape(-1, *base.shape[dim:]) if base.is_contiguous() else None
        if b is None:
            raise NotImplementedError("VM scatter into a strided base")
        from mkcompiler.ops.elementwise import expr_torch, slot_windows, window_values

        expr, windows = self.expr(node), slot_windows(self.expr(node))
        lin = torch.arange(update.numel, dtype=torch.int64)
        ins = [
            window_values(x, windows[k], lin, tensor_of).reshape(update.shape) if k in windows else tensor_of(x)
            for k, x in enumerate(values)
        ]
        v = expr_torch(expr, ins, lin.reshape(update.shape)).reshape(-1, *update.shape[dim:])
        # Per index tensor: its dim's place within a row of b (dims from `dim` on) and its values.
        places = [0] + ([node.attrs.dim2 - dim] if node.attrs.dim2 is not None else [])
        idx = []
        for place, index in zip(places, indices):
            i = tensor_of(index).long()
            size = base.shape[dim + place]
            idx.append(torch.where(i < 0, i + size, i).tolist())
        for r in range(r0, r1):
            for j, slot in enumerate(zip(*idx)):
                if all(0 <= i < base.shape[dim + p] for i, p in zip(slot, places)):
                    at = [slice(None)] * (base.rank - dim)
                    src = [slice(None)] * (base.rank - dim)
                    for i, p in zip(slot, places):
                        at[p], src[p] = i, 0
                    src[0] = j
                    b[r][tuple(at)] = v[r][tuple(src)].to(b.dtype)


def _emit(key, name: str) -> tuple[str, str]:
    """The scatter's tile routine. Its values are an elementwise expression of its inputs (x0 for
    a plain scatter; a fused producer's tree otherwise: computed where they are stored). The
    update's padded shape is a compile-time constant: one index split per element serves values,
    index and destination (runtime divisors would cost an integer division each)."""
    from mkcompiler.ops.elementwise import expr_source, input_loads

    expr, in_dtypes, idts, odt, dim, dim2 = key.expr, key.in_dtypes, key.index_dtypes, key.base, key.dim, key.dim2
    flat, shape, per_row = key.flat, key.shape, key.per_row
    k = len(in_dtypes)
    two = dim2 is not None
    lines, result = expr_source(expr, k, "lin")
    src = [
        "@triton.jit",
        f"def {name}(row_ptr, addrs_ptr, views_ptr, BLOCK: tl.constexpr):",
        f"    vi = arg(row_ptr, {k})",
        *([f"    vi2 = arg(row_ptr, {k + 1})"] if two else []),
        f"    vo = arg(row_ptr, {k + 1 + two})",
        f"    vb = arg(row_ptr, {k + 2 + two})",
        f"    r0 = arg(row_ptr, {k + 3 + two})",
        f"    r1 = arg(row_ptr, {k + 4 + two})",
    ]
    limits = [f"view_size(views_ptr, vb, {dim})"] + ([f"view_size(views_ptr, vb, {dim2})"] if two else [])
    setup, store = destination_lines((dim, dim2)[: 1 + two], limits, idts, odt)
    src += [f"    {line}" for line in setup]
    src += [
        f"    for start in range(r0 * {per_row}, tl.minimum(r1 * {per_row}, {math.prod(shape)}), BLOCK):",
        "        lin = start + tl.arange(0, BLOCK)",
        f"        mask = (lin < r1 * {per_row}) & (lin < {math.prod(shape)})",
        f"        i0, i1, i2, i3 = split_index(lin, {shape[1]}, {shape[2]}, {shape[3]})",
    ]
    src += [f"        {line}" for line in input_loads(expr, in_dtypes, flat, lambda i: f"arg(row_ptr, {i})", True)]
    src += [f"        {line}" for line in lines]
    src += [f"        {line}" for line in store(result)]
    return "\n".join(src) + "\n", f"{name}({{row}}, {{addrs}}, {{views}}, {key.block})"


def destination_lines(dims, limits, idts, odt):
    """(setup lines, store(value) -> lines) of a scatter's write: the values at update indices
    i0..i3 (split_index over the update's padded shape, under `mask`) go to the base at the
    runtime slots the index tensors (view ids vi, vi2) give along padded dims `dims` (the first:
    the values' j; a second, of extent 1 in the update: an offset of its own). vo is the
    update's view id; limits the base's sizes along dims (Triton expressions). Negative indices
    count from the end; out-of-range ones write nothing."""
    setup = [f"o_ptr = view_base(addrs_ptr, views_ptr, vo, {tl_dtype(odt)})"]
    for n, (d, lim, v, idt) in enumerate(zip(dims, limits, ["vi", "vi2"], idts)):
        sfx = "" if n == 0 else str(n + 1)
        setup += [
            f"limit{sfx} = {lim}",
            f"i{sfx}_ptr = view_base(addrs_ptr, views_ptr, {v}, {tl_dtype(idt)})",
            f"i{sfx}_stride = view_stride(views_ptr, {v}, 3)",
            f"stride{sfx} = view_stride(views_ptr, vo, {d})",
        ]

    def store(value: str) -> list[str]:
        lines = [
            f"j = i{dims[0]}",
            "idx = tl.load(i_ptr + j.to(tl.int64) * i_stride, mask=mask, other=0).to(tl.int64)",
            "idx = tl.where(idx < 0, idx + limit, idx)",
            "written = mask & (idx >= 0) & (idx < limit)",
            "dst = o_ptr + strided_offsets(views_ptr, vo, i0, i1, i2, i3) + (idx - j) * stride",
        ]
        if len(dims) == 2:
            lines += [
                "idx2 = tl.load(i2_ptr + j.to(tl.int64) * i2_stride, mask=mask, other=0).to(tl.int64)",
                "idx2 = tl.where(idx2 < 0, idx2 + limit2, idx2)",
                "written = written & (idx2 >= 0) & (idx2 < limit2)",
                "dst += idx2 * stride2",
            ]
        return lines + [f"tl.store(dst, {value}.to({tl_dtype(odt)}), mask=written)"]

    return setup, store
