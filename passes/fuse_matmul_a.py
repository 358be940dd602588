"""A decode matmul computes its A operand from the elementwise op producing it.

In a decode MLP, `down(silu(gate(x)) * up(x))`, the product `silu(gate) * up` is an elementwise
op between the gate/up matmuls and the down matmul: a whole dependent stage on the critical
path. A is tiny in decode (at most DECODE_ROWS rows), so each down tile computes its slice of
A itself while it loads A: p's expression over p's inputs, each seen through A's view of p's
output (fuse.transfer). p is dropped, and the down tile covering K range [k0, k1) waits only
for the gate/up tiles writing those columns (its regions read the expression's inputs there).

The matmul then reads A from `attrs["a_expr"] = (expr, A's dtype)` over the views
`inputs[3:]`; `inputs[0]` is the first of them, which keeps giving the matmul A's shape [M, K]
(ops/matmul.py; passes/tile.py takes the dot's operand dtype from it, so an input of A's dtype
goes first). The instruction holds inputs[0] in A's slot and the others after the tile
coordinates (Matmul.instruction_tail): at most A_EXPR_MAX_INPUTS inputs.

Kept from slowing the tile down or changing its rounding: the dot keeps its operand dtype
(inputs[0] decides it: a half-precision A needs an input of its dtype, or the dot would fall
back to fp32 on FMA units, the case of split-K partials whose sum is A; an fp32 A must not
become a half dot operand), and A's inputs load at most A_MAX_BYTES bytes per element,
as many per K step as the weights (a BM = 16 row block against a BN = 64 column block), so the
tile's shared memory (its loads are pipelined) and registers stay near a plain decode tile's.

Fused when p is an elementwise op, the sole writer of all of its output (fuse.sole_writers),
its output is not a model output and the matmul is its only reader, no op between p and the
matmul writes p's inputs (in-place state updates), and the matmul carries no folded norm.
"""

from __future__ import annotations

import torch
from mkcompiler.ops.elementwise import has_positional
from mkcompiler.ops.matmul import A_EXPR_MAX_INPUTS, DECODE_ROWS
from mkcompiler.passes.fuse import reindex, sole_writers, transfer_inputs, written_between

from mkcompiler.ir import Graph, View

HALF = (torch.bfloat16, torch.float16)
A_MAX_BYTES = 4  # times the dot's operand size: bytes of A's inputs per element of A


def _dot_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """tl.dot's operand dtype on a GPU (passes/tile.dot_config; the interpreter's fp32 dots do
    not change what fuses)."""
    return a if a == b and a in HALF else torch.float32


def fuse_into_matmul_a(graph: Graph) -> Graph:
    outputs, readers = graph.output_buffers(), graph.readers()
    sole = sole_writers(graph)
    position = {id(op): i for i, op in enumerate(graph.ops)}
    writes: dict[int, list[int]] = {}
    for i, op in enumerate(graph.ops):
        for o in op.outputs:
            writes.setdefault(o.buffer, []).append(i)
    removed = set()
    for mm in graph.ops:
        if mm.kind != "matmul" or "norm" in mm.attrs or "a_expr" in mm.attrs or len(mm.inputs) != 3:
            continue
        a = mm.inputs[0]
        p = sole.get(a.buffer)
        if p is None or id(p) in removed or a.rank != 2 or a.shape[0] > DECODE_ROWS or a.buffer in outputs:
            continue
        if any(u is not mm for u in readers.get(a.buffer, ())):
            continue
        if any(v is not None and v.buffer == a.buffer for v in mm.inputs[1:]):
            continue  # B or the bias read p's output too
        plan = _plan(mm, p, position, writes)
        if plan is None:
            continue
        xs, expr = plan
        mm.inputs = (xs[0], *mm.inputs[1:], *xs)
        mm.attrs["a_expr"] = (expr, a.dtype)
        mm.attrs["a_of"] = p.name
        removed.add(id(p))
    graph.ops = [op for op in graph.ops if id(op) not in removed]
    return graph


def _plan(mm, p, position, writes) -> tuple[list[View], tuple] | None:
    """(input views, expression) of A = p's expression over p's inputs seen through A's view,
    the views that have A's dtype first; None when A is not a window of p's output, the inputs
    would not fit the instruction, or an op between p and mm writes one of p's inputs."""
    a, expr = mm.inputs[0], p.attrs["expr"]
    if expr[0] != "op" or has_positional(expr):  # positional leaves index p's own output (passes/fuse.fold_cats)
        return None
    if written_between(p, mm, position, writes):
        return None
    xs: list[View] = []
    mapping = transfer_inputs(a, p, xs)
    if mapping is None or not xs or len(xs) > A_EXPR_MAX_INPUTS:
        return None
    order = sorted(range(len(xs)), key=lambda k: xs[k].dtype != a.dtype)  # stable: A's dtype first
    b = mm.inputs[1].dtype
    dot = _dot_dtype(a.dtype, b)
    if _dot_dtype(xs[order[0]].dtype, b) != dot or sum(x.dtype.itemsize for x in xs) > A_MAX_BYTES * dot.itemsize:
        return None
    new = {old: k for k, old in enumerate(order)}
    return [xs[k] for k in order], reindex(expr, {j: new[k] for j, k in mapping.items()})
