"""A split-K matmul sums its own partials (Settings.split_sum_in_matmul): no sum stage of its own.

passes/split_k.py splits a matmul with few output tiles along K: its tiles write fp32 partials
into a [S, M, N] buffer and an op E adds them (plus the bias, the cast, and after passes/fuse.py
usually the residual add that follows, or the rotary embedding and the KV-cache append) into
its output: in decode a whole dependent stage (a wake-up and a tile's fixed cost) after the
Q/K/V, O and down projections.

Here E moves into the matmul (serial split-K with a ticket, as CUTLASS's split-K serial or
stream-K fixup): each split tile (i, j, s) stores its partial block, then adds 1 to a ticket
counter of block (i, j) (passes/counters.py); the tile that arrives last computes E's expression
for the block, reading all S partials, and stores E's output. Consumers of the output wait for
all S tiles of the block (each declares writing it: ops/matmul.py regions); the last one signals
only after it stored the block, so their count is met only once the output is written. The S
tiles of a block are not ordered against each other (Matmul.combined, passes/dependencies.py).

E is an elementwise op, or a scatter (ops/scatter.py: an indexed write such as a KV-cache append
at the runtime position) whose values are an expression of the partials. E's expression is
addressed by its own row-major linear index (the scatter's: its update's), which must be the
[M, N] product's: lin = m * N + n. It may be positional ("idx" leaves, ops/elementwise.py) and
read the partials through windows moved by d elements (rotate-half: x[n + 32] below the half,
x[n - 32] above) when every moved read stays inside an aligned chunk of `inner * size` elements
of a row (a head): the matmul's BN is then a multiple of the chunk (attrs["bn_multiple"],
passes/tile.py), so the last arriver of a block has every element it reads.

The matmul takes E's place in program order (E's inputs are then all written before it; nothing
between the two may touch the matmul's inputs or partials); attrs["epilogue"] = (E's expression,
views): views[0] E's output (a scatter's update), views[1:] E's inputs (an elementwise E's made
one shape with its output, elementwise.joint_coalesce); attrs["epilogue_parts"]: per input, the
(piece s, move d) it reads of the partials, or None; a scatter's destination in
attrs["epilogue_scatter"] (ScatterStore). E's output becomes the matmul's second output.

Settings.split_sum_rope_append=False keeps positional sums and scatters apart (an A/B switch).

Left alone (today's separate sum), never a wrong answer: E is not the partials' only reader, or
neither an elementwise op nor a scatter; it reads its own output's buffer (the VM recomputes the
sum in every split tile: ops/matmul.Matmul._sum_reference); it reads the partials other than at
lin (or lin + d inside a chunk, through a window) of one piece, reads another input through a
window, or has a number of elements other than M x N; it reads another split matmul's partials
(gate/up's SwiGLU: every tile would wait for the other matmul's tiles); a chunk that is no power
of two, above MAX_CHUNK, or that a user's matmul_tile does not divide; its views need more than
MAX_RANK dims, or its inputs do not fit the instruction.
"""

from __future__ import annotations

import math

import torch
from mkcompiler.ops.elementwise import has_positional, in_window, joint_coalesce, linear_offsets, slot_windows
from mkcompiler.ops.matmul import A_TAIL
from mkcompiler.ops.registry import FAMILIES
from mkcompiler.ops.scatter import ScatterStore, parts

from mkcompiler.ir import Graph, View
from mkcompiler.layout import MAX_RANK, NUM_ARGS
from mkcompiler.settings import Settings

MAX_CHUNK = 128  # the widest matmul tile (passes/tile.py): a chunk must fit in one block
EXACT_MAX = 1 << 22  # above this many product elements only plain reads of a piece are checked


def split_sum_into_matmul(graph: Graph, settings: Settings) -> Graph:
    if not settings.split_sum_in_matmul:
        return graph
    readers = graph.readers()
    position = {id(op): i for i, op in enumerate(graph.ops)}
    split_parts = {op.outputs[0].buffer for op in graph.ops if op.kind == "matmul" and "split" in op.attrs}
    moved: dict[int, object] = {}  # id(E) -> the matmul that takes its place
    for mm in graph.ops:
        if mm.kind != "matmul" or "split" not in mm.attrs or "epilogue" in mm.attrs or len(mm.outputs) != 1:
            continue
        plan = _plan(graph, mm, readers, position, split_parts, settings)
        if plan is None:
            continue
        e, expr, views, reads, chunk, store = plan
        mm.attrs["epilogue"] = (expr, tuple(views))
        mm.attrs["epilogue_parts"] = tuple(reads)
        mm.attrs["epilogue_of"] = e.name
        if store is not None:
            mm.attrs["epilogue_scatter"] = store
        if chunk > 1:
            mm.attrs["bn_multiple"] = chunk
        mm.outputs = (mm.outputs[0], e.outputs[0])
        moved[id(e)] = mm
    placed = {id(mm) for mm in moved.values()}
    graph.ops = [moved.get(id(op), op) for op in graph.ops if id(op) not in placed]
    return graph


def _plan(graph: Graph, mm, readers, position, split_parts, settings: Settings):
    """(E, its expression, views, per input its read of the partials, chunk, ScatterStore or
    None) when mm can compute its sum E, else None."""
    part = mm.outputs[0]
    if part.rank != 3 or part.dtype != torch.float32 or part.offset != 0 or not part.is_contiguous():
        return None
    s, m, n = part.shape
    users = list({id(u): u for u in readers.get(part.buffer, [])}.values())
    if len(users) != 1 or users[0].kind not in ("elementwise", "scatter") or len(users[0].outputs) != 1:
        return None
    e = users[0]
    if e.kind == "elementwise":
        expr, out, ins, store = e.attrs["expr"], e.outputs[0], list(e.inputs), None
    else:
        values, indices, update, base = parts(e)
        expr, out, ins = FAMILIES["scatter"].expr(e), update, values
        store = _scatter_store(e, indices, update, base)
        if store is None:
            return None
    if expr[0] != "op" or out.numel != m * n:
        return None
    if not settings.split_sum_rope_append and (store is not None or has_positional(expr)):
        return None
    if any(v.buffer in (out.buffer, e.outputs[0].buffer) for v in ins):
        return None  # reads its own output (state updated in place)
    windows = slot_windows(expr)
    reads, chunk = [], 1
    for k, v in enumerate(ins):
        if v.buffer == part.buffer:
            read = _partial_read(v, windows.get(k), m, n)
            if read is None:
                return None
            reads.append(read[:2])
            chunk = max(chunk, read[2])
        elif v.buffer in split_parts or k in windows:
            return None  # another split matmul's partials; a window on an input other than the partials
        else:
            reads.append(None)
    if not _chunk_fits(chunk, settings):
        return None
    if not _in_order(graph, mm, e, position, part):
        return None
    views = joint_coalesce([out, *ins]) if store is None else [out, *ins]
    if max(v.rank for v in views) > MAX_RANK:
        return None
    others = sum(r is None for r in reads)
    tail = len(FAMILIES["matmul"].instruction_tail(mm))
    extra = len(store.indices) if store is not None else 0
    if A_TAIL + tail + 1 + others + extra + 1 > NUM_ARGS:  # + the output view, + the ticket
        return None
    return e, expr, views, reads, chunk, store


def _partial_read(v: View, win, m: int, n: int) -> tuple[int, int, int] | None:
    """(piece s, move d, chunk) when input view v of the partials gives, at every product index
    lin (inside its window, if it has one), element s * M * N + lin + d, and lin + d stays in
    lin's chunk of the row (chunk = the window's inner * size; 1 when d = 0); else None."""
    mn = m * n
    if v.numel != mn:
        return None
    if mn > EXACT_MAX:  # large: only a plain piece in row-major order
        plain = v.offset % mn == 0 and v.is_contiguous() and win is None
        return (v.offset // mn, 0, 1) if plain else None
    lin = torch.arange(mn, dtype=torch.int64)
    if win is not None:
        lin = lin[in_window(lin, win)]
        if lin.numel() == 0:
            return None
    moved = linear_offsets(v, lin) - lin
    if (moved != moved[0]).any():
        return None
    c = int(moved[0])
    piece = (c + lin) // mn
    if (piece != piece[0]).any():
        return None
    s = int(piece[0])
    d = c - s * mn
    if d == 0:
        return s, 0, 1
    if win is None:
        return None
    chunk = win[0] * win[1]
    if n % chunk or ((lin + d) // chunk != lin // chunk).any():
        return None
    return s, d, chunk


def _chunk_fits(chunk: int, settings: Settings) -> bool:
    """Can every block of the matmul hold whole chunks (its BN a multiple of the chunk)?"""
    if chunk == 1:
        return True
    if chunk & (chunk - 1) or chunk > MAX_CHUNK:
        return False  # tiles are powers of two up to MAX_CHUNK wide
    return settings.matmul_tile is None or settings.matmul_tile[1] % chunk == 0


def _in_order(graph: Graph, mm, e, position, part: View) -> bool:
    """Can mm move to E's place: nothing between may write mm's inputs, or read or write its
    partials."""
    lo, hi = position[id(mm)], position[id(e)]
    if hi <= lo:
        return False
    mine = {v.buffer for v in mm.inputs if v is not None}
    for op in graph.ops[lo + 1 : hi]:
        if any(o.buffer in mine or o.buffer == part.buffer for o in op.outputs):
            return False
        if any(v is not None and v.buffer == part.buffer for v in op.inputs):
            return False
    return True


def _scatter_store(e, indices: list[View], update: View, base: View) -> ScatterStore | None:
    """Where a scatter E stores (ops/scatter.ScatterStore), or None if the kernel cannot say."""
    if update.rank > 4:
        return None
    scatter = FAMILIES["scatter"]
    dims = [scatter.padded_dim(e)] + ([e.attrs["dim2"] + 4 - update.rank] if "dim2" in e.attrs else [])
    limits = [base.shape[e.attrs["dim"]]] + ([base.shape[e.attrs["dim2"]]] if "dim2" in e.attrs else [])
    per_row = math.prod(update.shape[e.attrs["dim"] :])
    return ScatterStore(tuple(dims), tuple(limits), tuple(indices), base, e.attrs["dim"], per_row)
