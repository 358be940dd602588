"""Fuse chains of elementwise ops into one op (one generated tile routine, one pass over memory).

A producer P (an elementwise op, the sole writer of all of its output, not a model output) is
spliced into the elementwise ops reading it: its expression replaces their reads of its output,
over P's inputs seen through each read's window of the output (`transfer`: a broadcast, a
reshape, a slice such as RoPE's halves). Buffers are written once and not mutated between P and
its reader (checked: state is updated in place), so computing P's tree later, inside a reader,
gives the same values. P is spliced when it has one reader op (x * sigmoid(x) reads x twice),
or when it is small (at most DUPLICATE_MAX_ELEMENTS: then it is recomputed in every reader); a
merged node keeps the reader's output view (which may be a slice, e.g. of a cat).

Norms (ops/norm.py) are readers too, through their x: the residual add producing x (a split-K
sum inside) is computed by the norm itself in each sweep over its rows, one dependent stage less
before every norm. A small P that some other reader cannot absorb stays, and its norm readers
recompute it anyway (they no longer wait for it).

Elementwise producers also fuse into the scatters that store their values (`fuse_into_scatter`:
KV-cache appends).
"""

from __future__ import annotations

from mkcompiler.ops.norm import NORM_TAIL

from mkcompiler.ir import Graph, View, contiguous_strides
from mkcompiler.layout import NUM_ARGS

MAX_INPUTS = NUM_ARGS - 3  # instruction args: output view, the inputs, first block, block count
NORM_MAX_INPUTS = NUM_ARGS - NORM_TAIL  # a fused norm's args: its x inputs, weight, bias, output, row block


def reindex(expr, mapping):
    if expr[0] == "in":
        return ("in", mapping[expr[1]])
    if expr[0] == "const":
        return expr
    return expr[:3] + tuple(reindex(a, mapping) for a in expr[3:])


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


def fuse_elementwise(graph: Graph, into_norms: bool = True) -> Graph:
    """Fuse to a fixed point: a splice can leave a producer with a single reader (x read by
    sigmoid and by mul: once sigmoid is in mul, x can go in too). Producers with one reader go
    first (nothing is recomputed): a split-K sum is inside its residual add before the add,
    read by a norm and by the next residual add, is recomputed in them, so the recomputed
    chains (the residual stream) stay bounded by the readers' inputs (MAX_INPUTS,
    NORM_MAX_INPUTS). Then splice elementwise producers into the scatters storing their values
    (fuse_into_scatter). `into_norms` (Settings.fuse_into_norm): norms absorb their input's
    producer too."""
    while _inline_producers(graph, False, into_norms) or _inline_producers(graph, True, into_norms):
        pass
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


def _absorbing(u, buffer: int, into_norms: bool = True):
    """(inputs, expr) of the elementwise computation in reader u that a producer of `buffer`
    would be spliced into: an elementwise op's, or a norm's x (ops/norm.py: x itself, or its
    fused expression); None if u cannot absorb it (another kind of op, or a norm reading the
    buffer as its weight or bias)."""
    if u.kind == "elementwise":
        return list(u.inputs), u.attrs["expr"]
    if into_norms and u.kind == "norm" and all(v is None or v.buffer != buffer for v in u.inputs[-2:]):
        return list(u.inputs[:-2]), u.attrs.get("expr", ("in", 0))
    return None


def _most_inputs(u, shared: bool, norm_x: set[int]) -> int:
    """The most inputs reader u may have after a splice: what its instruction holds; in the
    recomputing tier, an elementwise op that a norm reads stays small enough for the norm to
    absorb it in turn (x_{l+1} = x_l + ..., read by a norm and by the next residual add: the
    chain stops before a norm would have to wait for it)."""
    if u.kind == "norm" or (shared and u.outputs[0].buffer in norm_x):
        return NORM_MAX_INPUTS
    return MAX_INPUTS


def _apply(u, plan) -> None:
    inputs, expr = plan
    if u.kind == "norm":
        inputs = inputs + tuple(u.inputs[-2:])
    u.inputs, u.attrs["expr"] = inputs, expr


def _inline_producers(graph: Graph, shared: bool, into_norms: bool = True) -> int:
    """Splice each elementwise producer into the ops reading it (elementwise ops, and norms
    through their x); returns the number of splices. Not `shared`: producers read by one op
    only (nothing is recomputed). `shared`: small producers (at most DUPLICATE_MAX_ELEMENTS)
    are recomputed inside each of their readers (a split-K sum read by RoPE's
    pieces and product costs no stage of its own); when some reader cannot absorb it, the
    producer stays, and the norms among its readers that can still compute it themselves (a
    residual add also read by the next residual add: the norm no longer waits for the add).
    Each reading view must be a window of the producer's output (transfer), the result must fit
    the reader's instruction, and no op between the producer and the reader may write the
    producer's inputs (in-place state updates)."""
    outputs, readers = graph.output_buffers(), graph.readers()
    position = {id(op): i for i, op in enumerate(graph.ops)}
    writes: dict[int, list[int]] = {}
    for i, op in enumerate(graph.ops):
        for o in op.outputs:
            writes.setdefault(o.buffer, []).append(i)
    norm_x = {v.buffer for op in graph.ops if op.kind == "norm" for v in op.inputs[:-2]}  # buffers norms read as x
    removed, splices = set(), 0
    sole = sole_writers(graph)
    for p in graph.ops:
        out = p.outputs[0]
        users = list({id(u): u for u in readers.get(out.buffer, [])}.values())
        if sole.get(out.buffer) is not p or not users or any(id(u) in removed or u is p for u in users):
            continue
        if (len(users) > 1 and not shared) or (shared and out.numel > DUPLICATE_MAX_ELEMENTS):
            continue
        plans = {
            id(u): _plan_inline(u, p, position, writes, _most_inputs(u, shared, norm_x), into_norms) for u in users
        }
        if out.buffer not in outputs and all(plan is not None for plan in plans.values()):
            chosen = users
            removed.add(id(p))
        elif shared:  # p stays: only norms recompute it (they wait for it no longer)
            chosen = [u for u in users if u.kind == "norm" and plans[id(u)] is not None]
        else:
            continue
        for u in chosen:
            _apply(u, plans[id(u)])
            if u.kind == "norm":
                norm_x.update(v.buffer for v in plans[id(u)][0])
            splices += 1
    graph.ops = [op for op in graph.ops if id(op) not in removed]
    return splices


def written_between(p, consumer, position, writes) -> bool:
    """Does an op between producer p and `consumer` (graph order) write one of p's inputs? Then
    computing p inside the consumer would read the updated state (an in-place cache write)."""
    lo, hi = position[id(p)], position[id(consumer)]
    return any(lo < i < hi for x in p.inputs for i in writes.get(x.buffer, ()))


def transfer_inputs(view: View, p, inputs: list) -> dict[int, int] | None:
    """p's inputs seen through `view`'s window of p's output, added to `inputs` where new:
    {index of p's input: index in inputs}, or None when `view` is not a window (transfer)."""
    out = p.outputs[0]
    mapping = {}
    for j, x in enumerate(p.inputs):
        t = transfer(view, out.shape, x.expand(out.shape))
        if t is None:
            return None
        if t not in inputs:
            inputs.append(t)
        mapping[j] = inputs.index(t)
    return mapping


def _plan_inline(consumer, p, position, writes, most: int, into_norms: bool = True):
    """(inputs, expr) of `consumer`'s elementwise computation with every read of p's output
    replaced by p's expression over p's inputs seen through that read's view; None if the
    consumer cannot absorb p, a view is not a window of p's output, the inputs would not fit
    an instruction, or an op between p and the consumer writes one of p's inputs."""
    out = p.outputs[0]
    absorbing = _absorbing(consumer, out.buffer, into_norms)
    if absorbing is None:
        return None
    consumer_inputs, consumer_expr = absorbing
    if written_between(p, consumer, position, writes):
        return None
    inputs = [v for v in consumer_inputs if v.buffer != out.buffer]
    keep = {i: inputs.index(v) for i, v in enumerate(consumer_inputs) if v.buffer != out.buffer}
    replaced = {}
    for i, v in enumerate(consumer_inputs):
        if v.buffer != out.buffer:
            continue
        mapping = transfer_inputs(v, p, inputs)
        if mapping is None:
            return None
        replaced[i] = reindex(p.attrs["expr"], mapping)
    if len(inputs) > most or (not inputs and consumer.kind == "norm"):  # a norm's rows come from its inputs
        return None
    return tuple(inputs), _substitute_each(consumer_expr, replaced, keep)


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
