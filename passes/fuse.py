"""Fuse chains of elementwise ops into one op (one generated tile routine, one pass over memory).

A producer P (an elementwise op, the sole writer of all of its output, not a model output) is
spliced into the elementwise ops reading it: its expression replaces their reads of its output,
over P's inputs seen through each read's window of the output (`transfer`: a broadcast, a
reshape, a slice such as RoPE's halves). Buffers are written once and never mutated, so
computing P's tree later, inside a reader, gives the same values. P is spliced when it has one
reader op (x * sigmoid(x) reads x twice), or when it is small (at most DUPLICATE_MAX_ELEMENTS:
then it is recomputed in every reader); a merged node keeps the reader's output view (which may
be a slice, e.g. of a cat). Elementwise producers also fuse into the scatters that store their
values (`fuse_into_scatter`: KV-cache appends).
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


def sole_writers(graph: Graph) -> dict[int, object]:
    """buffer -> the elementwise op writing all of it, for buffers no other op writes (a cat's
    pieces each write a slice: their buffer has no sole writer, whatever its first piece looks
    like)."""
    writers: dict[int, list] = {}
    for op in graph.ops:
        for o in op.outputs:
            writers.setdefault(o.buffer, []).append((op, o))
    sole = {}
    for b, ws in writers.items():
        if len(ws) == 1:
            op, o = ws[0]
            whole = o.offset == 0 and o.is_contiguous() and o.numel == graph.buffers[b].numel
            if op.kind == "elementwise" and whole:
                sole[b] = op
    return sole


def fuse_elementwise(graph: Graph) -> Graph:
    """Fuse to a fixed point: a splice can leave a producer with a single reader (x read by
    sigmoid and by mul: once sigmoid is in mul, x can go in too). Then splice elementwise
    producers into the scatters storing their values (fuse_into_scatter)."""
    while True:
        before = len(graph.ops)
        graph = _inline_producers(graph)
        if len(graph.ops) == before:
            return fuse_into_scatter(graph)


DUPLICATE_MAX_ELEMENTS = 1 << 16  # recomputing a producer in each reader pays only for small tensors


def transfer(view: View, out_shape, x: View) -> View | None:
    """The view of x that `view` selects, where `view` reads a producer's contiguous output of
    shape out_shape, and x is one of the producer's inputs (expanded to out_shape): element i
    of `view` is out[m(i)], computed from x[m(i)]. None when `view` is not a plain window of the
    output (each of its dims must walk one output dim without carrying into the next)."""
    out_shape = tuple(out_shape)
    cs = contiguous_strides(out_shape)
    numel = 1
    for n in out_shape:
        numel *= n
    if not 0 <= view.offset < max(numel, 1):
        return None
    flat = x.reshape((numel,))
    if flat is not None:  # x walks its elements in output order: `view`'s strides carry over
        return View(
            x.buffer,
            x.dtype,
            tuple(view.shape),
            tuple(st * flat.strides[0] for st in view.strides),
            x.offset + view.offset * flat.strides[0],
        )
    start, rest = [], view.offset  # the window's first output index
    for c in cs:
        start.append(rest // c)
        rest %= c
    used, strides = set(), []
    for size, st in zip(view.shape, view.strides):
        if size == 1 or st == 0:
            strides.append(0)
            continue
        dims = [j for j, c in enumerate(cs) if c == st and out_shape[j] > 1]
        if len(dims) != 1 or dims[0] in used or start[dims[0]] + size > out_shape[dims[0]]:
            return None
        used.add(dims[0])
        strides.append(x.strides[dims[0]])
    offset = x.offset + sum(m * xs for m, xs in zip(start, x.strides))
    return View(x.buffer, x.dtype, tuple(view.shape), tuple(strides), offset)


def _inline_producers(graph: Graph) -> Graph:
    """Splice each elementwise producer into the elementwise ops reading it, when it has one
    reader op, or it is small (then it is recomputed inside each reader: a split-K sum read by
    RoPE's pieces and product costs no stage of its own). Each reading view must be a window of
    the producer's output (transfer) and the result must fit the reader's inputs."""
    outputs, readers = graph.output_buffers(), graph.readers()
    removed = set()
    sole = sole_writers(graph)
    for p in graph.ops:
        out = p.outputs[0]
        users = readers.get(out.buffer, [])
        if sole.get(out.buffer) is not p or out.buffer in outputs or not users:
            continue
        if any(id(u) in removed for u in users):
            continue
        if len({id(u) for u in users}) > 1 and out.numel > DUPLICATE_MAX_ELEMENTS:
            continue
        if any(u.kind != "elementwise" or u is p for u in users):
            continue
        plans = {id(u): _plan_inline(u, p) for u in users}
        if any(plan is None for plan in plans.values()):
            continue
        for u in {id(u): u for u in users}.values():
            u.inputs, u.attrs["expr"] = plans[id(u)]
        removed.add(id(p))
    graph.ops = [op for op in graph.ops if id(op) not in removed]
    return graph


def _plan_inline(consumer, p):
    """(inputs, expr) of `consumer` with every read of p's output replaced by p's expression
    over p's inputs seen through that read's view; None if a view is not a window of p's
    output or the inputs would not fit an instruction."""
    out = p.outputs[0]
    inputs = [v for v in consumer.inputs if v.buffer != out.buffer]
    keep = {i: inputs.index(v) for i, v in enumerate(consumer.inputs) if v.buffer != out.buffer}
    replaced = {}
    for i, v in enumerate(consumer.inputs):
        if v.buffer != out.buffer:
            continue
        mapping = {}
        for j, x in enumerate(p.inputs):
            t = transfer(v, out.shape, x.expand(out.shape))
            if t is None:
                return None
            if t not in inputs:
                inputs.append(t)
            mapping[j] = inputs.index(t)
        replaced[i] = _reindex(p.attrs["expr"], mapping)
    if len(inputs) > MAX_INPUTS:
        return None
    return tuple(inputs), _substitute_each(consumer.attrs["expr"], replaced, keep)


def _substitute_each(expr, replaced, keep):
    if expr[0] == "in":
        return replaced[expr[1]] if expr[1] in replaced else ("in", keep[expr[1]])
    if expr[0] == "const":
        return expr
    return expr[:3] + tuple(_substitute_each(a, replaced, keep) for a in expr[3:])


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
    producers = sole_writers(graph)
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
        inputs = [transfer(values, out.shape, x.expand(out.shape)) for x in p.inputs]
        if any(x is None for x in inputs):
            continue
        op.inputs = tuple(inputs) + tuple(op.inputs[1:])
        op.attrs["expr"] = p.attrs["expr"]
        removed.add(id(p))
    graph.ops = [op for op in graph.ops if id(op) not in removed]
    return graph
