"""A split-K matmul sums its own partials (Settings.split_sum_in_matmul): no sum stage of its own.

passes/split_k.py splits a matmul with few output tiles along K: its tiles write fp32 partials
into a [S, M, N] buffer and an elementwise op E adds them (plus the bias, the cast, and after
passes/fuse.py usually the residual add that follows) into the output: in decode a whole
dependent stage (a wake-up and a tile's fixed cost) after the O and down projections.

Here E moves into the matmul (serial split-K with a ticket, as CUTLASS's split-K serial or
stream-K fixup): each split tile (i, j, s) stores its partial block, then adds 1 to a ticket
counter of block (i, j) (passes/counters.py); the tile that arrives last computes E's expression
for the block, reading all S partials, and stores E's output. Consumers of the output wait for
all S tiles of the block (each declares writing it: ops/matmul.py regions); the last one signals
only after it stored the block, so their count is met only once the output is written. The S
tiles of a block are not ordered against each other (Matmul.combined, passes/dependencies.py).

The matmul takes E's place in program order (E's inputs are then all written before it; nothing
between the two may touch the matmul's inputs or partials); attrs["epilogue"] = (E's expression,
views): E's output and inputs made one shape (elementwise.joint_coalesce), and E's output becomes
the matmul's second output.

Left alone (today's separate sum), never a wrong answer: E is not the partials' only reader, or
not an elementwise op; its expression is positional (ops/elementwise.has_positional: built for
E's own linear index) or reads its own output's buffer (the VM recomputes the sum in every split
tile: ops/matmul.Matmul._sum_reference); it reads the partials other than as pieces in row-major
order of the [M, N] product, or has a number of elements other than M x N; it reads another
split matmul's partials (gate/up's SwiGLU: every tile would wait for the other matmul's tiles);
its views need more than MAX_RANK dims, or its inputs do not fit the instruction.
"""

from __future__ import annotations

import torch
from mkcompiler.ops.elementwise import has_positional, joint_coalesce
from mkcompiler.ops.matmul import A_TAIL
from mkcompiler.ops.registry import FAMILIES

from mkcompiler.ir import Graph, View
from mkcompiler.layout import MAX_RANK, NUM_ARGS
from mkcompiler.settings import Settings


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
        plan = _plan(graph, mm, readers, position, split_parts)
        if plan is None:
            continue
        e, views = plan
        mm.attrs["epilogue"] = (e.attrs["expr"], tuple(views))
        mm.attrs["epilogue_of"] = e.name
        mm.outputs = (mm.outputs[0], e.outputs[0])
        moved[id(e)] = mm
    placed = {id(mm) for mm in moved.values()}
    graph.ops = [moved.get(id(op), op) for op in graph.ops if id(op) not in placed]
    return graph


def _plan(graph: Graph, mm, readers, position, split_parts) -> tuple[object, list[View]] | None:
    """(E, [E's output, *E's inputs] jointly coalesced) when mm can compute its sum E, else None."""
    part = mm.outputs[0]
    if part.rank != 3 or part.dtype != torch.float32 or part.offset != 0 or not part.is_contiguous():
        return None
    s, m, n = part.shape
    users = list({id(u): u for u in readers.get(part.buffer, [])}.values())
    if len(users) != 1 or users[0].kind != "elementwise" or len(users[0].outputs) != 1:
        return None
    e = users[0]
    expr, out = e.attrs["expr"], e.outputs[0]
    if expr[0] != "op" or has_positional(expr) or out.numel != m * n:
        return None
    if any(v.buffer == out.buffer for v in e.inputs):
        return None  # reads its own output (state updated in place)
    for v in e.inputs:
        if v.buffer == part.buffer:
            piece = v.offset % (m * n) == 0 and v.is_contiguous() and v.numel == m * n
            if not piece or v.shape != out.shape:
                return None  # not a piece of the partials, in the output's row-major order
        elif v.buffer in split_parts:
            return None  # another split matmul's partials: the tiles would wait for its tiles
    # mm moves to E's place: nothing between may write mm's inputs, or read or write its partials.
    lo, hi = position[id(mm)], position[id(e)]
    if hi <= lo:
        return None
    mine = {v.buffer for v in mm.inputs if v is not None}
    for op in graph.ops[lo + 1 : hi]:
        if any(o.buffer in mine or o.buffer == part.buffer for o in op.outputs):
            return None
        if any(v is not None and v.buffer == part.buffer for v in op.inputs):
            return None
    views = joint_coalesce([out, *e.inputs])
    if views[0].rank > MAX_RANK:
        return None
    others = sum(v.buffer != part.buffer for v in e.inputs)
    tail = len(FAMILIES["matmul"].instruction_tail(mm))
    if A_TAIL + tail + 1 + others + 1 > NUM_ARGS:  # + the output view, + the ticket
        return None
    return e, views
