"""Decode matmuls compute their A operand from its producer's inputs.

A decode step's layer is a chain of dependent stages; several exist only to produce a matmul's
A: the residual add summing the previous matmul's split-K partials (read by the next matmuls,
whose folded norm needs the whole row), the SwiGLU gate silu(g) * u (read by the down
projection), the split-KV combine of attention's key chunks (read by the output projection).
Each such stage costs the chain a wait and a small tile. A batch-1 decode matmul
reads A as one row next to a [K, BN] weight block many times its size, so it can compute A's
elements itself from the producer's inputs (MatmulAttrs.a_expr, MatmulAttrs.a_combine) and wait
for the producer's producers instead: the stage leaves the critical path. (Several rows: every input costs the
tile's loop BM x BK of shared memory and registers, and the reads grow with the rows; the 2-layer
MLP test kernel at 4 rows spilled 16 B.)

The producer P (an elementwise op, the sole writer of all of its output, not a model output,
no positional leaves, no library calls, no constant-only node; or a combine whose output A
flattens) stays when other ops read its output (the residual stream is still stored for the next residual add, off the critical path),
and is dropped when the matmuls were its only readers. No op between P and the matmul may write
P's inputs (fuse.written_between). Runs after tiling, so tiles and dot dtypes are A's.
"""

from __future__ import annotations

import dataclasses

from mkcompiler.ops.elementwise import has_positional
from mkcompiler.ops.matmul import A_MORE, MAX_A_INPUTS, CombinedA
from mkcompiler.passes.fuse import calls_library, op_positions, reindex, sole_writers, transfer_inputs, written_between

from mkcompiler.ir.graph import Graph, OpNode, View
from mkcompiler.ir.settings import Settings

# A tile reads its A expression's inputs (over its K range) where it read A: at most this share of
# its weight bytes more (batch-1 decode: a residual sum of 4 fp32 partials and bf16 h is 18 B per K
# step against 128 B of a 64-wide bf16 weight block).
MAX_EXTRA_SHARE = 0.25


def has_constant_node(expr) -> bool:
    """Is some op node of `expr` computed from constants only (a fill: its generated code is
    a 1-D block, not the tile's [rows, cols])?"""
    if expr[0] != "op":
        return False
    args = expr[3:]
    return all(a[0] == "const" for a in args) or any(has_constant_node(a) for a in args)


def computable(p: OpNode) -> bool:
    """Can a matmul tile compute p's expression in place of reading p's output?"""
    expr = p.attrs.expr
    return expr[0] == "op" and not has_positional(expr) and not calls_library(p) and not has_constant_node(expr)


def cheap(mm: OpNode, inputs: list) -> bool:
    """Do the inputs' rows cost a tile at most MAX_EXTRA_SHARE of its weight bytes (per K step)?"""
    b = mm.inputs[1]
    bn = mm.attrs.tile[1]
    return sum(v.dtype.itemsize for v in inputs) <= MAX_EXTRA_SHARE * bn * b.dtype.itemsize


def _combine_writers(graph: Graph) -> dict[int, OpNode]:
    """buffer -> the attention_combine op writing all of it, for buffers no other op writes."""
    writers: dict[int, list[OpNode]] = {}
    for op in graph.ops:
        for o in op.outputs:
            writers.setdefault(o.buffer, []).append(op)
    found = {}
    for b, ws in writers.items():
        out = ws[0].outputs[0]
        if len(ws) == 1 and ws[0].kind == "attention_combine" and out.offset == 0 and out.is_contiguous():
            found[b] = ws[0]
    return found


def _expr_plan(mm: OpNode, p: OpNode):
    """(inputs, attrs) of matmul mm computing A by elementwise op p's expression, or None."""
    if not computable(p):
        return None
    inputs: list = []
    mapping = transfer_inputs(mm.inputs[0], p, inputs)
    if mapping is None or len(inputs) > MAX_A_INPUTS or not cheap(mm, inputs):
        return None
    expr = reindex(p.attrs.expr, mapping)
    if expr[2] != mm.inputs[0].dtype:  # p stores its value in A's dtype: the expression's root rounds to it
        expr = ("op", "copy", mm.inputs[0].dtype, expr)
    base = list(mm.inputs) + [None] * (A_MORE - len(mm.inputs))
    return (inputs[0], *base[1:A_MORE], *inputs[1:]), dataclasses.replace(mm.attrs, a_expr=expr)


def _combine_plan(mm: OpNode, c: OpNode):
    """(inputs, attrs) of matmul mm computing A as the split-KV combine c (one batch row, one
    query: A is c's output [1, H, 1, D] flattened), or None. Input 0 only gives A's shape (the
    tile reads the partials through A_MORE..; Matmul.a_reads): a [1, H x D] broadcast view of
    the partials' buffer."""
    part, ml = c.inputs
    out, a = c.outputs[0], mm.inputs[0]
    batch, heads, rows, dim = out.shape
    if (batch, rows) != (1, 1) or (a.shape, a.strides, a.offset) != ((1, heads * dim), (heads * dim, 1), 0):
        return None
    if part.shape[0] != ml.shape[0] or not cheap(mm, [part] * part.shape[0]):
        return None
    shape_view = View(part.buffer, part.dtype, a.shape, (0, 0), part.offset)
    base = list(mm.inputs) + [None] * (A_MORE - len(mm.inputs))
    attrs = dataclasses.replace(mm.attrs, a_combine=CombinedA(part.shape[0], dim, out.dtype))
    return (shape_view, *base[1:A_MORE], part, ml), attrs


def fuse_into_matmul_a(graph: Graph, settings: Settings) -> Graph:
    """Give each batch-1 decode matmul whose A an elementwise op or a split-KV combine computes
    that computation (module docstring)."""
    if not settings.fuse_matmul_a:
        return graph
    outputs, readers = graph.output_buffers(), graph.readers()
    position, writes = op_positions(graph)
    sole, combines = sole_writers(graph), _combine_writers(graph)
    taken: dict[int, tuple[OpNode, set[int]]] = {}  # producer id -> (it, ids of the matmuls that took it)
    for mm in graph.ops:
        if mm.kind != "matmul" or mm.attrs.a_expr is not None or mm.attrs.a_combine is not None:
            continue
        a = mm.inputs[0]
        p = sole.get(a.buffer) or combines.get(a.buffer)
        if p is None or a.buffer in outputs or a.shape[0] != 1:
            continue
        if any(b.buffer == a.buffer for b in mm.inputs[1:] if b is not None):
            continue  # A's buffer read as another operand too (x @ x.T): keep the one read
        if written_between(p, mm, position, writes):
            continue
        plan = _expr_plan(mm, p) if p.kind == "elementwise" else _combine_plan(mm, p)
        if plan is None:
            continue
        mm.inputs, mm.attrs = plan
        taken.setdefault(id(p), (p, set()))[1].add(id(mm))
    dropped = {
        pid for pid, (p, mms) in taken.items() if all(id(u) in mms for u in readers.get(p.outputs[0].buffer, []))
    }
    graph.ops = [op for op in graph.ops if id(op) not in dropped]
    return graph
