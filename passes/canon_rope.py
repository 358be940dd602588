"""Op-graph canonicalisation of rotary embeddings (RoPE) written in interleaved pairs.

The canonical RoPE, `x * cos + cat((-x2, x1), -1) * sin` (rotate-half), compiles to one
elementwise op: its cat folds into the product (passes/fuse.fold_cats), and the product into its
reader. The interleaved spellings pair x[2i] with x[2i+1] instead: `stack((-x_odd, x_even),
-1).flatten(-2)`, `stack((x0 * c - x1 * s, x1 * c + x0 * s), -1).flatten(-2)` over
`x.reshape(..., d/2, 2)` or x[..., ::2] / x[..., 1::2], and Llama-2's complex product, which
capture writes out as the same stack (frontend/complex_values.py). Two things kept those from the
canonical structure:

- a stack writes each piece into `out.select(-1, i)`, which fold_cats does not take for a cat's
  piece: `stack_as_cat` makes it the cat it is, piece i writing `out.slice(-1, i, i + 1)` over its
  inputs unsqueezed there (the same elements, in the same order);
- the stack's readers see its last two dims (d/2, 2) merged into one (the `flatten(-2)`), and a
  rotary table read once per pair (stride 0 along the pair) has no view in the merged dim, so
  neither the cat nor the product could go into a reader. `pair_frame` splits that dim into (d/2,
  2) in every elementwise op the merged dim runs through (the stack's readers, the ops reading
  theirs, the producers feeding them along it): splitting a dim of an elementwise op changes
  nothing it computes (all of its views share its output's shape and are addressed by its
  row-major index), and codegen merges the two dims again wherever every view allows
  (ops/elementwise.joint_coalesce).

Where the pairs end up outside elementwise ops:
- a KV-cache append storing rotated k: `split_scatter` splits the scatter's (d/2, 2) dim as
  pair_frame does an elementwise op's, so fuse.fold_cats folds the pieces into it (rotate-half's
  structure);
- attention reading rotated q: fuse.fold_cats merges interleaved pieces no reader can take into
  one op writing the whole stack;
- torch.polar's magnitude (`ones_like`) is a constant of one value: `uniform_constants` makes it
  a literal, so a complex product's pieces fit the scatter's input slots.

RULES lists the rewrites in order; passes/canonicalize.py runs them with its own.
"""

from __future__ import annotations

import math
from dataclasses import replace

from mkcompiler.ops.elementwise import has_positional
from mkcompiler.ops.scatter import parts
from mkcompiler.passes.canon_attention import const_value
from mkcompiler.passes.fuse import cat_layouts

from mkcompiler.ir.graph import Graph, OpNode, View, contiguous_strides
from mkcompiler.ir.layout import MAX_RANK


def _full_view(graph: Graph, buffer: int, shape: tuple[int, ...]) -> View | None:
    buf = graph.buffers[buffer]
    if buf.numel != math.prod(shape):
        return None
    return View(buffer, buf.dtype, shape, contiguous_strides(shape), 0)


def _writers(graph: Graph) -> dict[int, list[OpNode]]:
    found: dict[int, list[OpNode]] = {}
    for op in graph.ops:
        for o in op.outputs:
            found.setdefault(o.buffer, []).append(op)
    return found


def _stack_layout(graph: Graph, buffer: int, pieces: list[OpNode]) -> tuple[View, int] | None:
    """(the whole buffer as the stack's contiguous output, the stacked dim) when `pieces` (the ops
    writing `buffer`) are elementwise ops writing out.select(dim, i) for every i, else None."""
    if len(pieces) < 2 or any(p.kind != "elementwise" or len(p.outputs) != 1 for p in pieces):
        return None
    views = [p.outputs[0] for p in pieces]
    shape = views[0].shape
    if any(v.shape != shape for v in views):
        return None
    for d in range(len(shape) + 1):
        full = _full_view(graph, buffer, shape[:d] + (len(pieces),) + shape[d:])
        if full is not None and sorted(views, key=lambda v: v.offset) == [
            full.select(d, i) for i in range(len(pieces))
        ]:
            return full, d
    return None


def stack_as_cat(graph: Graph) -> Graph:
    """Each stack of elementwise pieces becomes a cat along a dim of size-1 pieces (module doc)."""
    for buffer, pieces in _writers(graph).items():
        layout = _stack_layout(graph, buffer, pieces)
        if layout is None:
            continue
        full, d = layout
        for p in pieces:
            i = next(i for i in range(full.shape[d]) if full.select(d, i) == p.outputs[0])
            p.outputs = (full.slice(d, i, i + 1),)
            p.inputs = tuple(None if v is None else v.unsqueeze(d) for v in p.inputs)
    return graph


# ---- constants of one value: literals ----


def _literal(graph: Graph, v: View | None) -> float | None:
    """The value of every element of `v`, when v reads a compile-time constant (capture's Const
    buffers: torch.polar's magnitude `ones_like(angles)`) whose elements are all one number."""
    t = None if v is None else const_value(graph, v)
    if t is None or t.numel() == 0 or t.dtype.is_complex:
        return None
    first = t.reshape(-1)[0]
    return float(first) if bool((t == first).all()) and math.isfinite(float(first)) else None


def _with_literals(expr, literal: dict[int, float], slot: dict[int, int]):
    if expr[0] == "in":
        return ("const", literal[expr[1]]) if expr[1] in literal else ("in", slot[expr[1]])
    if expr[0] == "op":
        return expr[:3] + tuple(_with_literals(a, literal, slot) for a in expr[3:])
    return expr


def uniform_constants(graph: Graph) -> Graph:
    """An elementwise op's input that is a constant of one value becomes a literal in its
    expression: one load less, and one instruction slot (a complex product's pieces then fit the
    KV-cache scatter's slots as rotate-half's do). Elementwise arithmetic is fp32 whatever the
    input's dtype, so the literal is the value the load would give."""
    for op in graph.ops:
        if op.kind != "elementwise" or has_positional(op.attrs.expr):
            continue
        literal = {k: c for k, v in enumerate(op.inputs) if (c := _literal(graph, v)) is not None}
        if not literal:
            continue
        kept = [k for k in range(len(op.inputs)) if k not in literal]
        op.attrs = replace(op.attrs, expr=_with_literals(op.attrs.expr, literal, {k: i for i, k in enumerate(kept)}))
        op.inputs = tuple(op.inputs[k] for k in kept)
    return graph


# ---- interleaved pairs: the merged (d/2, 2) dim split in the ops it runs through ----


def _split_view(v: View, dim: int, pair: int) -> View:
    size, st = v.shape[dim], v.strides[dim]
    return replace(
        v,
        shape=v.shape[:dim] + (size // pair, pair) + v.shape[dim + 1 :],
        strides=v.strides[:dim] + (st * pair, st) + v.strides[dim + 1 :],
    )


def _fits(out: View, dim: int, pair: int) -> bool:
    """Does the split output keep at most MAX_RANK dims of size > 1? Then every view the op reads
    after fusion (a rotary table broadcast over batch and heads, stride 0 along the pair) still
    has an instruction row's dims; otherwise the op stays as it is (unfused, but encodable)."""
    return sum(s > 1 for s in _split_view(out, dim, pair).shape) <= MAX_RANK


def _merged_dim(v: View, row: int) -> int | None:
    """The dim of v that walks a whole contiguous row of `row` elements of its buffer (the
    merged pair dims), or None."""
    for e, (size, st) in enumerate(zip(v.shape, v.strides)):
        if size == row and st == 1 and v.offset % row == 0:
            return e
    return None


def _pair_cats(graph: Graph, writers) -> list[tuple[int, int, int]]:
    """(buffer, pair count, row) of the cats of size-1 pieces along their innermost non-trivial
    dim (fuse.cat_layouts; interleaved pairs, a stack along the last dim), whose readers may see
    that dim merged with the one before into rows of `row` elements."""
    found = []
    for buffer, pieces in writers.items():
        if len(pieces) < 2 or any(p.kind != "elementwise" or len(p.outputs) != 1 for p in pieces):
            continue
        for shape, d, spans in cat_layouts(graph, buffer, pieces):
            if d > 0 and math.prod(shape[d + 1 :]) == 1 and all(hi - lo == 1 for lo, hi, _ in spans):
                found.append((buffer, shape[d], shape[d - 1] * shape[d]))
                break
    return found


def pair_frame(graph: Graph) -> Graph:
    """Split the merged pair dim of the elementwise ops reading an interleaved cat, and of the
    elementwise ops connected to them along that dim (module doc)."""
    writers = _writers(graph)
    readers = graph.readers()
    split: set[int] = set()
    work: list[tuple[OpNode, int, int]] = []  # (op, dim of its output, pair count)

    def framed(op: OpNode) -> bool:
        """Does op write all of its output (its readers then see its dims)?"""
        out = op.outputs[0]
        return len(writers.get(out.buffer, [])) == 1 and out.offset == 0 and out.is_contiguous()

    def reached(buffer: int, row: int, pair: int, skip: OpNode | None) -> None:
        """Enqueue the elementwise readers of `buffer` reading whole rows of it merged; go on
        through those reading it in the pair frame already."""
        for u in readers.get(buffer, []):
            if u.kind == "scatter" and id(u) not in split and split_scatter(u, buffer, row, pair):
                split.add(id(u))
            if u is skip or u.kind != "elementwise" or id(u) in split:
                continue
            dims = [_merged_dim(v, row) for v in u.inputs if v is not None and v.buffer == buffer]
            out = u.outputs[0]
            if any(e is not None for e in dims):
                work.append((u, next(e for e in dims if e is not None), pair))
            elif out.rank > 1 and out.shape[-2:] == (row // pair, pair) and framed(u):
                split.add(id(u))
                reached(out.buffer, row, pair, u)

    for buffer, pair, row in _pair_cats(graph, writers):
        reached(buffer, row, pair, None)
    while work:
        op, e, pair = work.pop()
        if id(op) in split or op.outputs[0].shape[e] % pair or not _fits(op.outputs[0], e, pair):
            continue
        split.add(id(op))
        row = op.outputs[0].shape[e]
        ins = op.inputs
        op.inputs = tuple(None if v is None else _split_view(v, e, pair) for v in ins)
        op.outputs = tuple(_split_view(o, e, pair) for o in op.outputs)
        if framed(op):
            reached(op.outputs[0].buffer, row, pair, op)  # the ops reading its rows
        for v in ins:  # the elementwise producers feeding it along the dim
            ws = writers.get(v.buffer, []) if v is not None else []
            if len(ws) == 1 and ws[0].kind == "elementwise" and v.strides[e] == 1 and v.shape[e] == row:
                w = ws[0].outputs[0]
                if w.rank and w.shape[-1] == row and w.is_contiguous():
                    work.append((ws[0], w.rank - 1, pair))
    return graph


# ---- a KV-cache append storing the pairs: the scatter in the pair frame too ----


def _drop_dim(views: list[View], k: int) -> list[View]:
    return [v.select(k, 0) for v in views]


def _merge_dims(views: list[View], k: int) -> list[View] | None:
    """The views with dims k and k + 1 merged, when every view walks them as one dim."""
    if any(v.strides[k] != v.strides[k + 1] * v.shape[k + 1] for v in views):
        return None
    return [
        replace(
            v,
            shape=v.shape[:k] + (v.shape[k] * v.shape[k + 1],) + v.shape[k + 2 :],
            strides=v.strides[:k] + (v.strides[k + 1],) + v.strides[k + 2 :],
        )
        for v in views
    ]


def split_scatter(op: OpNode, buffer: int, row: int, pair: int) -> bool:
    """Split the dim along which scatter `op` (a KV-cache append) reads whole rows of `buffer` as
    its values into (row / pair, pair), in its values, update and base alike (the same elements
    written in the same order: the scatter's row-major update index is unchanged). Then the
    values can be the interleaved cat's pieces, read in their own frame (fuse.fold_cats), as the
    rotate-half cat is. The update keeps at most MAX_RANK dims (ops/scatter.py): size-1 dims
    other than the indexed ones are dropped, then neighbours every view walks as one are merged;
    if that is not enough, nothing changes. Returns whether it split."""
    values, _, update, base = parts(op)
    if op.attrs.expr is not None or any(v.buffer == buffer for v in op.inputs[len(values) :]):
        return False
    dims = [e for v in values if v.buffer == buffer for e in [_merged_dim(v, row)]]
    indexed = [op.attrs.dim] + ([op.attrs.dim2] if op.attrs.dim2 is not None else [])
    if not dims or None in dims or len(set(dims)) != 1 or dims[0] in indexed:
        return False
    e = dims[0]
    views = [_split_view(v, e, pair) for v in (*values, update, base)]
    indexed = [d + (d > e) for d in indexed]
    for k in reversed(range(views[-2].rank)):  # size-1 dims: no index walks them
        if len(views[0].shape) > MAX_RANK and views[-2].shape[k] == 1 and k not in indexed:
            views, indexed = _drop_dim(views, k), [d - (d > k) for d in indexed]
    for k in reversed(range(e)):  # neighbours before the pair dims, unindexed: one dim
        merged = _merge_dims(views, k) if views[0].rank > MAX_RANK and {k, k + 1}.isdisjoint(indexed) else None
        if merged is not None:
            views, indexed = merged, [d - (d > k) for d in indexed]
    if views[0].rank > MAX_RANK:
        return False
    n = len(values)
    op.inputs = (*views[:n], *op.inputs[n:-2], views[n], views[n + 1])
    op.outputs = (views[n + 1],)
    op.attrs = replace(op.attrs, dim=indexed[0], dim2=indexed[1] if len(indexed) > 1 else None)
    return True


RULES = [
    ("uniform_constants", uniform_constants),
    ("rope_stack_as_cat", stack_as_cat),
    ("rope_pair_frame", pair_frame),
]
