"""Fold a row normalisation into the matmuls that read its output, when they have few rows.

A norm op N (LayerNorm or RMSNorm over the last dim: h = norm(x) * w (+ b), ops/norm.py) whose
output h is read only by matmuls, each as its whole A operand ([R, C] rows of h), is folded
into every one of them: the matmul tile computes its rows' statistics from x with a sweep over
K before its main loop, then normalises each A block as it loads it and rounds it to h's dtype,
exactly as N would have stored h. N then has no reader and is dropped: in decode, one stage
(and one wait) less per norm. Only for matmuls of at most MAX_ROWS rows: each tile redoes its
rows' statistics, free next to streaming the weights in decode, wasteful in prefill where
every column tile would redo them.
"""

from __future__ import annotations

from mkcompiler.ir import Graph, View

MAX_ROWS = 16


def _as_rows(v: View, c: int) -> View | None:
    return v.reshape((v.numel // c, c)) if v.numel % c == 0 else None


def fuse_norm_into_matmul(graph: Graph) -> Graph:
    outputs, readers = graph.output_buffers(), graph.readers()
    dropped = set()
    for norm in graph.ops:
        if norm.kind != "norm" or "expr" in norm.attrs:  # x computed by a fused expression (passes/fuse.py)
            continue
        h = norm.outputs[0]
        x, w, b = norm.inputs
        c = x.shape[-1]
        users = readers.get(h.buffer, [])
        if not users or h.buffer in outputs or h.offset != 0 or not h.is_contiguous():
            continue
        rows = _as_rows(h, c)
        if not all(_reads_rows_as_a(op, h, rows) for op in users):
            continue
        x2 = _as_rows(x, c)
        if x2 is None or any(op.inputs[0].shape[0] > MAX_ROWS for op in users):
            continue
        for op in users:
            a, bmat, bias = op.inputs
            op.inputs = (x2, bmat, bias, w, b)
            op.attrs["norm"] = (norm.attrs["rms"], norm.attrs["eps"], h.dtype)
            op.attrs["norm_of"] = norm.name
        dropped.add(id(norm))
    graph.ops = [op for op in graph.ops if id(op) not in dropped]
    return graph


def _reads_rows_as_a(op, h: View, rows: View | None) -> bool:
    """op is a matmul whose A operand is all of h, read as [R, C] rows, and nothing else of it."""
    if op.kind != "matmul" or rows is None or len(op.inputs) != 3 or "norm" in op.attrs:
        return False
    a, bmat, bias = op.inputs
    others = [v for v in (bmat, bias) if v is not None]
    return a == rows and all(v.buffer != h.buffer for v in others)
