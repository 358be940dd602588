"""Fuse chains of elementwise ops into one op (one generated tile routine, one pass over memory).

A producer P (an elementwise op, the sole writer of all of its output, not a model output) is
spliced into the elementwise ops reading it: its expression replaces their reads of its output,
over P's inputs seen through each read's window of the output (`transfer`: a broadcast, a
reshape, a slice such as RoPE's halves). Buffers are written once and not mutated between P and
its reader (checked: state is updated in place), so computing P's tree later, inside a reader,
gives the same values. P is spliced when it has one reader op (x * sigmoid(x) reads x twice),
or when it is small (at most DUPLICATE_MAX_ELEMENTS: then it is recomputed in every reader) and
calls no long library code (sin, cos, ...: ops/elementwise.LIBRARY_OPS); a
merged node keeps the reader's output view (which may be a slice, e.g. of a cat).

Elementwise producers also fuse into the scatters that store their values (`fuse_into_scatter`:
KV-cache appends).

Last, a `cat` whose pieces are elementwise ops folds into its readers (`fold_cats`): each reader
selects, by its output index along the cat's dim, the piece that lands there, computed over the
piece's inputs shifted to where it lands (ops/elementwise.py, positional leaves). RoPE's
rotate-half, cat((-x2, x1)), is then computed by the RoPE product and by the KV-cache scatter
themselves: one dependent stage less between the Q/K/V projections and attention.
"""

from __future__ import annotations

import math

import torch
from mkcompiler.ops.elementwise import (
    LIBRARY_OPS,
    ElementwiseAttrs,
    group_windows,
    has_positional,
    op_names,
    slot_windows,
)
from mkcompiler.ops.scatter import Scatter, parts, tail_size

from mkcompiler.ir.graph import BufferKind, Graph, OpNode, View, contiguous_strides
from mkcompiler.ir.layout import MAX_RANK, NUM_ARGS

MAX_INPUTS = NUM_ARGS - 3  # instruction args: output view, the inputs, first block, block count


def reindex(expr, mapping):
    if expr[0] in ("in", "win"):  # a window's shared load (group_windows) is the reader's to regroup
        return (expr[0], mapping[expr[1]], *expr[2:6])
    if expr[0] in ("const", "idx"):
        return expr
    return expr[:3] + tuple(reindex(a, mapping) for a in expr[3:])


def sole_writers(graph: Graph) -> dict[int, object]:
    """buffer -> the elementwise op writing all of it, for buffers no other op writes (a cat's
    pieces each write a slice: their buffer has no sole writer, whatever its first piece looks
    like). Model state is left out: its writes are results of the step, and ops before the
    writer read its old value."""
    writers: dict[int, list] = {}
    for op in graph.ops:
        for o in op.outputs:
            writers.setdefault(o.buffer, []).append((op, o))
    sole = {}
    for b, ws in writers.items():
        if len(ws) == 1 and graph.buffers[b].kind != BufferKind.STATE:
            op, o = ws[0]
            whole = o.offset == 0 and o.is_contiguous() and o.numel == graph.buffers[b].numel
            if op.kind == "elementwise" and whole:
                sole[b] = op
    return sole


def fuse_elementwise(graph: Graph) -> Graph:
    """Fuse to a fixed point: a splice can leave a producer with a single reader (x read by
    sigmoid and by mul: once sigmoid is in mul, x can go in too). Producers with one reader go
    first (nothing is recomputed: a split-K sum goes into its residual add before small
    producers are recomputed in their readers). Then splice elementwise producers into the
    scatters storing their values (fuse_into_scatter) and fold cats into their readers
    (fold_cats)."""
    while _inline_producers(graph, False) or _inline_producers(graph, True):
        pass
    return fold_cats(fuse_into_scatter(graph))


DUPLICATE_MAX_ELEMENTS = 1 << 16  # recomputing a producer in each reader pays only for small tensors


def transfer(view: View, out_shape, x: View) -> View | None:
    """The view of x that `view` selects, where `view` reads a producer's contiguous output of
    shape out_shape, and x is one of the producer's inputs (expanded to out_shape): element i
    of `view` is out[m(i)], computed from x[m(i)]. None when `view` is not a plain window of the
    output (each of its dims must walk one output dim without carrying into the next)."""
    out_shape = tuple(out_shape)
    numel = math.prod(out_shape)
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
    walk = window_dims(view, out_shape)
    if walk is None:
        return None
    start, dims = walk
    strides = [0 if j is None else x.strides[j] for j in dims]
    offset = x.offset + sum(m * xs for m, xs in zip(start, x.strides))
    return View(x.buffer, x.dtype, tuple(view.shape), tuple(strides), offset)


def window_dims(view: View, out_shape) -> tuple[list[int], list[int | None]] | None:
    """How `view` walks a contiguous tensor of shape out_shape: (the index of its first element,
    per dim of `view` the dim of out_shape it walks, None where it stays put), or None when some
    dim of `view` does not walk one dim without carrying into the next."""
    out_shape = tuple(out_shape)
    cs = contiguous_strides(out_shape)
    start = _first_index(view, out_shape)
    if start is None:
        return None
    used, dims = set(), []
    for size, st in zip(view.shape, view.strides):
        if size == 1 or st == 0:
            dims.append(None)
            continue
        found = [j for j, c in enumerate(cs) if c == st and out_shape[j] > 1]
        if len(found) != 1 or found[0] in used or start[found[0]] + size > out_shape[found[0]]:
            return None
        used.add(found[0])
        dims.append(found[0])
    return start, dims


def _first_index(view: View, out_shape: tuple[int, ...]) -> list[int] | None:
    """The index in a contiguous tensor of shape out_shape of the element `view` starts at."""
    if not 0 <= view.offset < max(math.prod(out_shape), 1):
        return None
    start, rest = [], view.offset
    for c in contiguous_strides(out_shape):
        start.append(rest // c)
        rest %= c
    return start


def _inline_producers(graph: Graph, shared: bool) -> int:
    """Splice each elementwise producer into the elementwise ops reading it, when all of them
    can take it; returns the number of splices. Not `shared`: producers read by one op only
    (nothing is recomputed). `shared`: small producers (at most DUPLICATE_MAX_ELEMENTS) without
    library calls (_library) are recomputed inside each of their readers (a split-K sum read by
    RoPE's pieces and product costs no stage of its own). Each reading view must be a window of
    the producer's output (transfer), the result must fit the reader's instruction, and no op
    between the producer and the reader may write the producer's inputs (in-place state updates)."""
    outputs, readers = graph.output_buffers(), graph.readers()
    position = {id(op): i for i, op in enumerate(graph.ops)}
    writes: dict[int, list[int]] = {}
    for i, op in enumerate(graph.ops):
        for o in op.outputs:
            writes.setdefault(o.buffer, []).append(i)
    removed, splices = set(), 0
    sole = sole_writers(graph)
    for p in graph.ops:
        out = p.outputs[0]
        users = list({id(u): u for u in readers.get(out.buffer, [])}.values())
        if sole.get(out.buffer) is not p or not users or any(id(u) in removed or u is p for u in users):
            continue
        if (len(users) > 1 and not shared) or (shared and out.numel > DUPLICATE_MAX_ELEMENTS):
            continue
        if len({u.outputs[0].buffer for u in users}) > 1 and _library(p):
            continue  # pieces of one cat (one output buffer) are one reader: each computes its part
        if out.buffer in outputs:
            continue
        plans = {id(u): _plan_inline(u, p, position, writes) for u in users}
        if any(plan is None for plan in plans.values()):
            continue
        for u in users:
            u.inputs, u.attrs.expr = plans[id(u)]
            splices += 1
        removed.add(id(p))
    graph.ops = [op for op in graph.ops if id(op) not in removed]
    return splices


def _library(p) -> bool:
    """Does p's expression call long library code (LIBRARY_OPS)? Then it is not recomputed in
    readers writing different outputs: once, in its own op, costs a small tile off the layers'
    critical path (RoPE's cos and sin depend on the positions only) instead of inlined copies per
    element in every reader (every layer's RoPE of q and k)."""
    return any(name in LIBRARY_OPS for name in op_names(p.attrs.expr))


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


def _plan_inline(consumer, p, position, writes):
    """(inputs, expr) of elementwise op `consumer` with every read of p's output replaced by
    p's expression over p's inputs seen through that read's view; None if the consumer is no
    elementwise op, a view is not a window of p's output, the inputs would not fit an
    instruction, or an op between p and the consumer writes one of p's inputs."""
    if consumer.kind != "elementwise":
        return None
    out = p.outputs[0]
    consumer_inputs, consumer_expr = list(consumer.inputs), consumer.attrs.expr
    if written_between(p, consumer, position, writes):
        return None
    if has_positional(p.attrs.expr) or has_positional(consumer_expr):  # built for their own op's indices
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
        replaced[i] = reindex(p.attrs.expr, mapping)
    if len(inputs) > MAX_INPUTS:
        return None
    return tuple(inputs), _substitute_each(consumer_expr, replaced, keep)


def _substitute_each(expr, replaced, keep):
    if expr[0] == "in":
        return replaced[expr[1]] if expr[1] in replaced else ("in", keep[expr[1]])
    if expr[0] == "win":  # shared loads are regrouped after (group_windows)
        return ("win", keep[expr[1]], *expr[2:6])
    if expr[0] in ("const", "idx"):
        return expr
    return expr[:3] + tuple(_substitute_each(a, replaced, keep) for a in expr[3:])


SCATTER_ROWS = 2  # a scatter instruction's args after its inputs: rows r0, r1


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
        if op.kind != "scatter" or op.attrs.expr is not None:
            continue
        values = op.inputs[0]
        p = producers.get(values.buffer)
        if p is None or values.buffer in outputs or len(p.inputs) + tail_size(op) + SCATTER_ROWS > NUM_ARGS:
            continue
        if has_positional(p.attrs.expr):
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
        op.attrs.expr = p.attrs.expr
        removed.add(id(p))
    graph.ops = [op for op in graph.ops if id(op) not in removed]
    return graph


def _same_view(a: View, b: View, strict: bool) -> bool:
    """Do a and b address the same elements in the same order (not strict: strides of size-1
    dims aside)?"""
    if strict:
        return a == b
    return (a.buffer, a.dtype, a.shape, a.offset) == (b.buffer, b.dtype, b.shape, b.offset) and all(
        sa == sb for n, sa, sb in zip(a.shape, a.strides, b.strides) if n != 1
    )


def cat_layouts(graph: Graph, buffer: int, pieces: list) -> list[tuple[tuple[int, ...], int, list]]:
    """The ways to see `pieces` (the ops writing `buffer`) as a cat, as (shape, dim, [(lo, hi,
    piece)]): each piece writes a slice [lo, hi) along dim of the whole buffer seen as a
    contiguous tensor of that shape, together all of it, in order (what ops/layout.lower_cat
    makes). Several when size-1 dims make it ambiguous ([1, 8] pieces of a [1, 16] cat are
    rows of a [2, 8] too): the ones whose strides match exactly first."""
    views = [p.outputs[0] for p in pieces]
    rank, numel = views[0].rank, graph.buffers[buffer].numel
    found = []
    for strict in (True, False):
        for d in range(rank):
            rest = views[0].shape[:d] + views[0].shape[d + 1 :]
            if any(v.rank != rank or v.shape[:d] + v.shape[d + 1 :] != rest for v in views):
                continue
            shape = views[0].shape[:d] + (sum(v.shape[d] for v in views),) + views[0].shape[d + 1 :]
            if math.prod(shape) != numel:
                continue
            full = View(buffer, views[0].dtype, shape, contiguous_strides(shape), 0)
            spans, lo = [], 0
            for v, p in sorted(zip(views, pieces), key=lambda vp: vp[0].offset):
                n = v.shape[d]
                if n == 0 or not _same_view(v, full.slice(d, lo, lo + n), strict):
                    break
                spans.append((lo, lo + n, p))
                lo += n
            else:
                if (shape, d) not in [(s, e) for s, e, _ in found]:
                    found.append((shape, d, spans))
    return found


def _run_walk(view: View, shape, d: int) -> tuple[list[int], list] | None:
    """window_dims for a read whose dims may each walk a run of neighbouring dims of the cat
    (shape) as one (whole: from index 0 to their end): a tuple of those dims in place of one
    dim (a KV-cache scatter walking batch and heads as one, passes/canon_rope.split_scatter).
    The cat's dim d is walked alone. None when some dim of `view` walks neither."""
    cs, start = contiguous_strides(shape), _first_index(view, tuple(shape))
    if start is None:
        return None
    dims, used = [], set()
    for size, st in zip(view.shape, view.strides):
        if size == 1 or st == 0:
            dims.append(None)
            continue
        found = [j for j, c in enumerate(cs) if c == st and shape[j] > 1]
        if len(found) != 1:
            return None
        run, n = [found[0]], shape[found[0]]
        while n < size and run[0] > 0:
            run.insert(0, run[0] - 1)
            n *= shape[run[0]]
        if n != size or used & set(run) or (d in run and len(run) > 1):
            return None
        if len(run) > 1 and any(start[j] for j in run):
            return None
        if len(run) == 1 and start[run[0]] + size > shape[run[0]]:
            return None
        used.update(run)
        dims.append(run[0] if len(run) == 1 else tuple(run))
    return start, dims


def _shifted(x: View, view: View, start: list[int], dims: list, d: int, lo: int) -> View | None:
    """The view of x (a piece's input, of the piece's shape) giving, at each element of `view` (a
    read of the cat, walking it as `start`, `dims` say), the input of the piece element that
    lands there, for a piece landing at lo along the cat's dim d. Only elements whose index
    along d falls in the piece address x; the others may point outside x's buffer. None when x
    does not walk a run of dims (_run_walk) as one."""
    strides = []
    for j in dims:
        if isinstance(j, tuple):
            if any(x.strides[i] != x.strides[i + 1] * x.shape[i + 1] for i in j[:-1]):
                return None
            j = j[-1]
        strides.append(0 if j is None else x.strides[j])
    offset = x.offset + sum((m - (lo if j == d else 0)) * st for j, (m, st) in enumerate(zip(start, x.strides)))
    return View(x.buffer, x.dtype, tuple(view.shape), tuple(strides), offset)


def _cat_read(view: View, layout, slot) -> tuple | None:
    """The expression of a read `view` of a cat (layout: one of cat_layouts') as a select among
    its pieces over their shifted inputs: where(index < hi_0, piece_0, where(index < hi_1,
    piece_1, ...)), the index being the reader's along the cat's dim; a piece's inputs are read
    through its window only. slot(view, window) gives an input's slot. None if `view` is no
    window of the cat."""
    shape, d, spans = layout
    walk = window_dims(view, shape) or _run_walk(view, shape, d)
    if walk is None:
        return None
    start, dims = walk
    walking = [e for e, j in enumerate(dims) if j == d]
    if walking:
        e = walking[0]
        inner, size = math.prod(view.shape[e + 1 :]), view.shape[e]
    else:  # every element of `view` sits at start[d]: one piece
        inner, size = 1, 1
    first = start[d]
    chosen = [(max(lo - first, 0), min(hi - first, size), p) for lo, hi, p in spans if lo < first + size and hi > first]
    values = []
    for a, b, p in chosen:
        win = None if (a, b) == (0, size) else (inner, size, a, b)
        lo = next(lo for lo, _, q in spans if q is p)
        mapping = {}
        for j, x in enumerate(p.inputs):
            if x.shape != p.outputs[0].shape:
                return None
            shifted = _shifted(x, view, start, dims, d, lo)
            if shifted is None:
                return None
            mapping[j] = slot(shifted, win)
        values.append(_windowed(p.attrs.expr, mapping, win))
    expr = values[-1]
    dtype = spans[0][2].outputs[0].dtype
    for (_, b, _), value in zip(reversed(chosen[:-1]), reversed(values[:-1])):
        below = ("op", "lt", torch.bool, ("idx", inner, size), ("const", float(b)))
        expr = ("op", "where", dtype, below, value, expr)
    return expr


def _windowed(expr, mapping, win):
    """A piece's expression over its inputs' slots, read through `win` (None: plainly)."""
    if expr[0] == "in":
        return ("in", mapping[expr[1]]) if win is None else ("win", mapping[expr[1]], *win)
    if expr[0] == "const":
        return expr
    return expr[:3] + tuple(_windowed(a, mapping, win) for a in expr[3:])


def _plan_cat(u, buffer: int, layout, position, writes):
    """(value inputs, expression) of reader u with each read of the cat in `buffer` replaced by a
    select among its pieces (_cat_read); None when u cannot take it: u is neither an elementwise
    op nor a scatter reading the cat as its values, u reads the cat through a window already, a
    read is no window of the cat, an op between a piece and u writes the piece's inputs, or the
    inputs would not fit u's instruction."""
    if u.kind == "elementwise":
        values, expr, most, shape = list(u.inputs), u.attrs.expr, MAX_INPUTS, u.outputs[0].shape
    elif u.kind == "scatter" and all(v.buffer != buffer for v in u.inputs[-tail_size(u) :]):
        values, expr = list(u.inputs[: -tail_size(u)]), Scatter.expr(u)
        most, shape = NUM_ARGS - tail_size(u) - SCATTER_ROWS, parts(u).update.shape
    else:
        return None
    if any(written_between(p, u, position, writes) or position[id(p)] >= position[id(u)] for _, _, p in layout[2]):
        return None
    try:
        windows = slot_windows(expr)
    except ValueError:
        return None
    reads = [i for i, v in enumerate(values) if v.buffer == buffer]
    if any(i in windows or values[i].shape != tuple(shape) for i in reads):
        return None
    others = [i for i, v in enumerate(values) if v.buffer != buffer]
    slots = _Slots([values[i] for i in others], [windows.get(i) for i in others])
    keep = {i: k for k, i in enumerate(others)}
    replaced = {}
    for i in reads:
        e = _cat_read(values[i], layout, slots.slot)
        if e is None:
            return None
        replaced[i] = e
    if len(slots.inputs) > most:
        return None
    return tuple(slots.inputs), group_windows(_substitute_each(expr, replaced, keep), slots.inputs)


class _Slots:
    """An expression's input slots, each a (view, window) pair: `slot` gives the slot of one,
    adding it when new (a view read through two windows takes two slots)."""

    def __init__(self, inputs: list, windows: list):
        self.inputs, self.windows = inputs, windows

    def slot(self, view: View, win) -> int:
        for k, (v, w) in enumerate(zip(self.inputs, self.windows)):
            if v == view and w == win:
                return k
        self.inputs.append(view)
        self.windows.append(win)
        return len(self.inputs) - 1


def _interleaved(layout) -> bool:
    """Do the cat's pieces alternate element by element (pieces of size 1 along its innermost
    non-trivial dim: a stack along the last dim, passes/canon_rope.stack_as_cat)?"""
    shape, d, spans = layout
    return all(hi - lo == 1 for lo, hi, _ in spans) and math.prod(shape[d + 1 :]) == 1


def _merged_cat(graph: Graph, buffer: int, layout) -> OpNode | None:
    """One elementwise op writing the whole cat, each element computed by the piece landing
    there (_cat_read of the cat by itself), or None when its inputs would not fit an instruction
    or a view would need more dims than an instruction row has."""
    shape, _, spans = layout
    first = spans[0][2]
    full = View(buffer, first.outputs[0].dtype, shape, contiguous_strides(shape), 0)
    slots = _Slots([], [])
    expr = _cat_read(full, layout, slots.slot)
    if expr is None or len(slots.inputs) > MAX_INPUTS:
        return None
    if any(v.coalesced().rank > MAX_RANK for v in [full, *slots.inputs]):  # encode's limit on each view
        return None
    attrs = ElementwiseAttrs(group_windows(expr, slots.inputs))
    return OpNode("elementwise", tuple(slots.inputs), (full,), attrs, name=first.name, source=first.source)


def fold_cats(graph: Graph) -> Graph:
    """Fold each cat whose pieces are elementwise ops (cat_layouts) into its readers: elementwise
    ops and scatters (their values) compute the piece landing at each of their elements
    themselves (_cat_read), and the pieces go. All readers or none: a cat some reader cannot
    take stays whole. Latest cats first: the ones nearest their readers' other inputs on the
    critical path (RoPE's rotate-half, rather than a rotary table built from the positions at
    the start) get the readers' instruction slots."""
    outputs = graph.output_buffers()
    position = {id(op): i for i, op in enumerate(graph.ops)}
    writes: dict[int, list[int]] = {}
    writers: dict[int, list] = {}
    for i, op in enumerate(graph.ops):
        for o in op.outputs:
            writes.setdefault(o.buffer, []).append(i)
            writers.setdefault(o.buffer, []).append(op)
    removed, replacing = set(), {}
    cats = [b for b, ws in writers.items() if len(ws) > 1 and b not in outputs]
    for b in sorted(cats, key=lambda b: max(position[id(p)] for p in writers[b]), reverse=True):
        pieces = writers[b]
        if any(p.kind != "elementwise" or len(p.outputs) != 1 or has_positional(p.attrs.expr) for p in pieces):
            continue
        users = [
            u for u in graph.ops if id(u) not in removed and any(v is not None and v.buffer == b for v in u.inputs)
        ]
        layouts = cat_layouts(graph, b, pieces) if users else []
        for layout in layouts:
            plans = [_plan_cat(u, b, layout, position, writes) for u in users]
            if all(plan is not None for plan in plans):
                break
        else:
            merged = [op for op in (_merged_cat(graph, b, la) for la in layouts if _interleaved(la)) if op]
            if merged:  # pieces writing every other element each: one op writing them all instead
                last = max(pieces, key=lambda p: position[id(p)])
                replacing[id(last)] = merged[0]
                removed.update(id(p) for p in pieces if p is not last)
            continue
        for u, (inputs, expr) in zip(users, plans):
            u.inputs = inputs + (tuple(u.inputs[-tail_size(u) :]) if u.kind == "scatter" else ())
            u.attrs.expr = expr
        removed.update(id(p) for p in pieces)
    graph.ops = [replacing.get(id(op), op) for op in graph.ops if id(op) not in removed]
    return graph
