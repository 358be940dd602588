"""A split-K matmul that sums its own partials (passes/split_sum.py, Settings
.split_sum_in_matmul): the ticket, the sum's routine source, its key, regions and VM reference.

Every split tile (i, j, s) stores its partial block, then takes a ticket (split_sum_last); the
last of the block's S tiles to arrive loads the sum's inputs over the block (its matmul's
partials from L2, moved by d inside a chunk through a window where the sum reads them so: RoPE's
rotate-half), evaluates the expression as the elementwise op would have, and stores the result,
or writes it where the scatter it replaces would have (a KV-cache append). ops/matmul.py keeps
the matmul tile; this file the sum it may end with.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mkcompiler.ops.base import Access, flat_flags, linear_access, merge_intervals, next_pow2, tl_dtype, whole
from mkcompiler.ops.common import arg, view_base, view_size, view_stride
from mkcompiler.ops.elementwise import expr_source, expr_torch, linear_offsets, slot_windows, window_src, window_values
from mkcompiler.ops.scatter import destination_lines, destination_offsets, written_rows

from mkcompiler.ir import View


@triton.jit
def split_sum_last(row_ptr, counters_ptr, generation, TICKET: tl.constexpr, S: tl.constexpr):
    """Take this split tile's ticket, once its partial block is stored: True for the last of the
    block's S tiles to arrive in launch `generation` (tickets count on across launches, as the
    dependency counters do). acq_rel: releases this tile's partial, acquires the others'."""
    tl.debug_barrier()  # every thread's partial stores happen before the release (one thread's atomic)
    old = tl.atomic_add(counters_ptr + arg(row_ptr, TICKET), 1, sem="acq_rel")
    return old == generation * S - 1


@triton.jit
def split_sum_block(row_ptr, addrs_ptr, views_ptr, BM: tl.constexpr, BN: tl.constexpr, ROWS: tl.constexpr):
    """(lin, mask, partials' base pointer, stride between partials) of the tile's [BM, BN] output
    block, as [ROWS, BN] (ROWS = BM, or a power of two >= M when M < BM: one block then holds
    every row): lin = m * N + n, the row-major index the sum's views are addressed by."""
    vc = arg(row_ptr, 3)
    M = view_size(views_ptr, vc, 2)
    N = view_size(views_ptr, vc, 3)
    rm = arg(row_ptr, 4) * BM + tl.arange(0, ROWS)
    rn = arg(row_ptr, 5) * BN + tl.arange(0, BN)
    lin = rm[:, None] * N + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    return lin, mask, view_base(addrs_ptr, views_ptr, vc, tl.float32), view_stride(views_ptr, vc, 1)


def sum_routine(name: str, tile_call: str, sum_key, bm: int, bn: int) -> str:
    """Source of the @triton.jit routine of a split tile that sums its matmul's partials itself:
    matmul_tile (`tile_call`), then the ticket; the last arriver loads the sum's inputs over its
    block (own partials from the partial buffer, L2 only: other tiles wrote them), evaluates the
    expression as the elementwise op would have, and stores the output."""
    expr, splits, out_dtype, out_flat, ins, base, dest, rows = sum_key
    lines, result = expr_source(expr, len(ins), "lin")
    others = [k for k, d in enumerate(ins) if d[0] != "part"]
    n_index = len(dest[0]) if dest is not None else 0
    ticket = base + 1 + len(others) + n_index
    windows = slot_windows(expr)
    src = [
        "from mkcompiler.ops.matmul_sum import split_sum_block, split_sum_last",
        "",
        "",
        "@triton.jit",
        f"def {name}(row_ptr, addrs_ptr, views_ptr, counters_ptr, generation, wait=None):",
        "    ok = 1",
        "    t_ready = tl.zeros((), tl.int64)",
        "    if wait is not None:  # the tile waits itself (early_wait): no ticket unless its wait succeeded",
        f"        ok, t_ready = {tile_call[:-1]}, wait=wait)",
        "    else:",
        f"        {tile_call}",
        "    last = tl.zeros((), tl.int32)",
        "    if ok != 0:",
        f"        last = split_sum_last(row_ptr, counters_ptr, generation, {ticket}, {splits}).to(tl.int32)",
        "    if last != 0:",
        f"        lin, mask, part, part_stride = split_sum_block(row_ptr, addrs_ptr, views_ptr, {bm}, {bn}, {rows})",
    ]
    body = _input_loads(ins, windows, base, others) + lines
    body += _stores(dest, result, out_dtype, out_flat, base, base + 1 + len(others))
    src += [f"        {line}" for line in body]
    src += ["    if wait is not None:", "        return ok, t_ready"]
    return "\n".join(src) + "\n"


def _input_loads(ins, windows, base: int, others: list[int]) -> list[str]:
    """Lines loading the sum's inputs x0.. over the block: a piece s of the partials, moved by d
    (inside the block: passes/split_sum.py), from L2 (other tiles wrote it) under its window;
    any other input through its view in the instruction (slots after the output's, `base`)."""
    lines = []
    for k, d in enumerate(ins):
        mask = f"mask & {window_src(windows[k])}" if k in windows else "mask"
        if d[0] == "part":
            at = f"lin {'+' if d[2] > 0 else '-'} {abs(d[2])}" if d[2] else "lin"
            lines.append(
                f"x{k} = tl.load(part + {d[1]} * part_stride + {at}, mask={mask}, other=0.0, cache_modifier='.cg')"
            )
        else:
            slot = base + 1 + others.index(k)
            view = f"arg(row_ptr, {slot})"
            lines.append(f"x{k} = load_view(addrs_ptr, views_ptr, {view}, lin, {mask}, {tl_dtype(d[0])}, {d[1]})")
    return lines


def _stores(dest, result: str, out_dtype, out_flat: int, base: int, first_index: int) -> list[str]:
    """Lines storing the sum: through the output view (slot `base`), or, for a scatter's sum (a
    KV-cache append), where the scatter would have written (its update's view in slot `base`,
    its index tensors from slot `first_index` on)."""
    if dest is None:
        out = f"arg(row_ptr, {base})"
        return [f"store_view(addrs_ptr, views_ptr, {out}, lin, mask, {result}, {tl_dtype(out_dtype)}, {out_flat})"]
    dims, limits, idts, shape = dest
    index_views = [f"vi{n}" for n in range(len(dims))]
    lines = [f"vo = arg(row_ptr, {base})"] + [f"vi{n} = arg(row_ptr, {first_index + n})" for n in range(len(dims))]
    setup, store = destination_lines(dims, [str(x) for x in limits], idts, out_dtype, "vo", index_views)
    lines.append(f"i0, i1, i2, i3 = split_index(lin, {shape[1]}, {shape[2]}, {shape[3]})")
    return lines + setup + store(result)


def sum_span(v: View, lin: torch.Tensor, tensor_of) -> tuple[torch.Tensor, torch.Tensor]:
    """(a 1-D tensor over the elements view v gives linear indices `lin`, their indices in it)."""
    offs = linear_offsets(v, lin)
    lo, hi = int(offs.min()), int(offs.max()) + 1
    return tensor_of(View(v.buffer, v.dtype, (hi - lo,), (1,), lo)), offs - lo


def sum_key(node, splits: int, base: int):
    """(expr, S, output dtype, output flat flag, per input ("part", s, d) for piece s of the
    own partial buffer moved by d or (dtype, flat flag), first instruction slot of the sum's
    views, a scatter's destination (padded dims, limits, index dtypes, update's padded
    shape) or None, rows of the block the sum covers) of a split-K sum in the matmul
    (passes/split_sum.py). base: the instruction slot of the sum's first view (after the matmul's
    tail)."""
    expr, views = node.attrs["epilogue"]
    flags = flat_flags(*views)
    ins = tuple(
        ("part", *r) if r is not None else (v.dtype, f)
        for v, f, r in zip(views[1:], flags[1:], node.attrs["epilogue_parts"])
    )
    store = node.attrs.get("epilogue_scatter")
    dest = None
    if store is not None:
        dest = (store.dims, store.limits, tuple(i.dtype for i in store.indices), views[0].padded(4)[0])
    # the sum's rows: all M of them when M < BM (decode: 1 of 16 rows, not 16 rows of registers)
    rows = min(node.attrs["tile"][0], next_pow2(node.outputs[0].shape[1]))
    return expr, splits, views[0].dtype, flags[0], ins, base, dest, rows


def sum_regions(node, rows: tuple[int, int], cols: tuple[int, int]):
    """(reads, writes) of the sum over output block [rows) x [cols) of a split-K matmul that sums
    its partials: what any of the block's split tiles may read and write as the last arriver."""
    _, views = node.attrs["epilogue"]
    part = node.outputs[0]
    m, n = part.shape[-2:]
    flat = part.reshape((-1,))
    reads = []
    for v, r in zip(views[1:], node.attrs["epilogue_parts"]):  # a moved read stays in the block
        piece = v if r is None else flat.slice(0, r[0] * m * n, (r[0] + 1) * m * n)
        reads.append(block_access(piece, rows, cols, n))
    store = node.attrs.get("epilogue_scatter")
    if store is None:
        return reads, [block_access(views[0], rows, cols, n)]
    reads += [whole(i) for i in store.indices]
    first, last = rows[0] * n + cols[0], (rows[1] - 1) * n + cols[1] - 1
    return reads, [written_rows(store.base, store.dim, first // store.per_row, last // store.per_row + 1)]


def sum_reference(node, i: int, j: int, tensor_of):
    """The block's sum from the partial buffer as it is now. The kernel's last arriver does
    this once; the VM runs tiles one at a time and cannot tell which is last, so every split
    tile does it: the last to run leaves the sum of all S partials, the same whichever tile
    that is, and no reader sees the block before all S tiles have signalled. (The sum never
    reads its own output: passes/split_sum.py.)"""
    expr, views = node.attrs["epilogue"]
    bm, bn, _ = node.attrs["tile"]
    m, n = node.outputs[0].shape[1:]
    rows = torch.arange(i * bm, min((i + 1) * bm, m))
    cols = torch.arange(j * bn, min((j + 1) * bn, n))
    lin = (rows[:, None] * n + cols[None, :]).reshape(-1)
    windows = slot_windows(expr)
    ins = []
    for k, v in enumerate(views[1:]):
        if k in windows:  # a moved read of the partials: only inside its window
            ins.append(window_values(v, windows[k], lin, tensor_of))
        else:
            span, idx = sum_span(v, lin, tensor_of)
            ins.append(span[idx])
    value = expr_torch(expr, ins, lin)
    store = node.attrs.get("epilogue_scatter")
    if store is None:
        span, idx = sum_span(views[0], lin, tensor_of)
        span[idx] = value.to(span.dtype)
        return
    dst, ok = destination_offsets(store, views[0], lin, tensor_of)
    if ok.any():
        lo, hi = int(dst[ok].min()), int(dst[ok].max()) + 1
        span = tensor_of(View(store.base.buffer, store.base.dtype, (hi - lo,), (1,), lo))
        span[dst[ok] - lo] = value[ok].to(span.dtype)


def block_access(v: View, rows: tuple[int, int], cols: tuple[int, int], n: int) -> Access:
    """The elements of v (a view of a split-K sum, addressed by lin = m * n + col) at output rows
    [rows) and columns [cols)."""
    pairs = []
    for m in range(*rows):
        pairs += linear_access(v, m * n + cols[0], m * n + cols[1]).intervals
    return Access(v.buffer, merge_intervals(pairs))
