"""Fuse chains of elementwise ops into one op (one generated tile routine, one pass over memory).

A producer P is spliced into its consumer C when P's output buffer is read by C alone
(possibly several times, e.g. x * sigmoid(x), all through one view), through P's own full
view (optionally broadcast; strides of size-1 dims don't matter, so [1, N] read as [1, 1, N]
fuses), and is not a model output. Buffers
are written once and never mutated, so computing P's tree later, inside C, reads the same
values. The merged node keeps C's output view (which may be a slice, e.g. of a cat).
"""

from __future__ import annotations

from mkcompiler.ir import Graph, View, contiguous_strides
from mkcompiler.layout import NUM_ARGS

MAX_INPUTS = NUM_ARGS - 3  # instruction args: output view, the inputs, first block, block count


def _reindex(expr, mapping):
    if expr[0] == "in":
        return ("in", mapping[expr[1]])
    if expr[0] == "const":
        return expr
    return expr[:3] + tuple(_reindex(a, mapping) for a in expr[3:])


def _is_broadcast_of_full(view: View, full_shape) -> bool:
    """view == (contiguous view of a buffer of shape full_shape).expand(view.shape)?"""
    if view.offset != 0:
        return False
    try:
        ref = View(view.buffer, view.dtype, tuple(full_shape), contiguous_strides(tuple(full_shape))).expand(view.shape)
    except (ValueError, AssertionError):
        return False
    return all(a == b for a, b, n in zip(ref.strides, view.strides, view.shape) if n != 1)


def fuse_elementwise(graph: Graph) -> Graph:
    """Fuse to a fixed point: a splice can leave a producer with a single reader (x read by
    sigmoid and by mul: once sigmoid is in mul, x can go in too). Then splice elementwise
    producers into the scatters storing their values (fuse_into_scatter)."""
    while True:
        before = len(graph.ops)
        graph = _fuse_once(graph)
        if len(graph.ops) == before:
            return fuse_into_scatter(graph)


SCATTER_TAIL = 5  # a scatter instruction's args after its value inputs: index, update, base, r0, r1


def fuse_into_scatter(graph: Graph) -> Graph:
    """A scatter (index_put / index_copy: a KV-cache append) whose values an elementwise op
    computes, read by the scatter alone, computes them itself (ops/scatter.py, fused form): the
    RoPE'd key is rotated where it is stored, one stage (and one wait) less per layer."""
    outputs = {v.buffer for v in graph.outputs if isinstance(v, View)}
    readers: dict[int, list] = {}
    for op in graph.ops:
        for v in op.inputs:
            if v is not None:
                readers.setdefault(v.buffer, []).append((op, v))
    producers = {op.outputs[0].buffer: op for op in graph.ops if op.kind == "elementwise"}
    removed = set()
    for op in graph.ops:
        if op.kind != "scatter" or "expr" in op.attrs:
            continue
        values = op.inputs[0]
        p = producers.get(values.buffer)
        if p is None or values.buffer in outputs or len(p.inputs) + SCATTER_TAIL > NUM_ARGS:
            continue
        out = p.outputs[0]
        if out.offset != 0 or not out.is_contiguous() or {id(o) for o, _ in readers[values.buffer]} != {id(op)}:
            continue
        if not all(v == values for _, v in readers[values.buffer]):
            continue
        if not _is_broadcast_of_full(values, out.shape):
            continue
        op.inputs = tuple(x.expand(values.shape) for x in p.inputs) + tuple(op.inputs[1:])
        op.attrs["expr"] = p.attrs["expr"]
        removed.add(id(p))
    graph.ops = [op for op in graph.ops if id(op) not in removed]
    return graph


def _fuse_once(graph: Graph) -> Graph:
    outputs = {v.buffer for v in graph.outputs if isinstance(v, View)}
    readers: dict[int, set[int]] = {}  # buffer -> the ops reading it
    views: dict[int, set] = {}  # buffer -> the views it is read through
    for op in graph.ops:
        for v in op.inputs:
            if v is not None:
                readers.setdefault(v.buffer, set()).add(id(op))
                views.setdefault(v.buffer, set()).add(v)
    producer = {}
    for op in graph.ops:
        if op.kind == "elementwise":
            out = op.outputs[0]
            b = out.buffer
            single = len(readers.get(b, ())) == 1 and len(views.get(b, ())) == 1
            if out.offset == 0 and out.is_contiguous() and b not in outputs and single:
                producer[b] = op
    removed = set()
    for op in graph.ops:
        if op.kind != "elementwise":
            continue
        changed = True
        while changed:
            changed = False
            for v in op.inputs:
                p = producer.get(v.buffer)
                if p is None or id(p) in removed or not _is_broadcast_of_full(v, p.outputs[0].shape):
                    continue
                ks = {i for i, x in enumerate(op.inputs) if x == v}  # every read of P (one view)
                new_inputs = [x for i, x in enumerate(op.inputs) if i not in ks]
                extra = [x.expand(v.shape) for x in p.inputs]
                mapping_c = {}
                for i in range(len(op.inputs)):
                    if i not in ks:
                        mapping_c[i] = i - sum(1 for j in ks if j < i)
                mapping_p = {}
                for j, x in enumerate(extra):
                    if x in new_inputs:
                        mapping_p[j] = new_inputs.index(x)
                    else:
                        mapping_p[j] = len(new_inputs)
                        new_inputs.append(x)
                if len(new_inputs) > MAX_INPUTS:
                    continue
                p_expr = _reindex(p.attrs["expr"], mapping_p)
                op.attrs["expr"] = _substitute(op.attrs["expr"], ks, p_expr, mapping_c)
                op.inputs = tuple(new_inputs)
                removed.add(id(p))
                changed = True
                break
    graph.ops = [op for op in graph.ops if id(op) not in removed]
    return graph


def _substitute(expr, ks, replacement, mapping):
    if expr[0] == "in":
        return replacement if expr[1] in ks else ("in", mapping[expr[1]])
    if expr[0] == "const":
        return expr
    return expr[:3] + tuple(_substitute(a, ks, replacement, mapping) for a in expr[3:])
