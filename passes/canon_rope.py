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

RULES lists the rewrites in order; passes/canonicalize.py runs them with its own.
"""

from __future__ import annotations

import math
from dataclasses import replace

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


RULES = [("rope_stack_as_cat", stack_as_cat), ("rope_pair_frame", pair_frame)]
