"""Op-graph canonicalisation of attention written out, and of views of more than MAX_RANK dims.

Attention written out (repeat_kv as `k[:, :, None].expand(b, hk, g, s, d).reshape(b, hk * g, s, d)`,
heads reshaped to [B, Hkv, G, S, D]) makes elementwise ops over rank-5 views: a broadcast copy, a
product over grouped heads. An instruction row holds MAX_RANK dims per view (ir/layout.py), so
every view an op reads or writes must coalesce (View.coalesced) into that many.
`collapse_high_rank` splits an elementwise op whose views do not into one op per index of the
dim that lets the rest coalesce, each on views with that dim selected (the ops write disjoint
slices of the same output, as a stack's pieces do). An elementwise op's inputs all have its
output's shape and each view is addressed by the row-major index of that shape, so selecting
the same dim of all of them keeps every element's inputs together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from mkcompiler.ops.attention import AttentionAttrs
from mkcompiler.ops.elementwise import ElementwiseAttrs, has_positional

from mkcompiler.ir.graph import BufferKind, Graph, OpNode, View
from mkcompiler.ir.layout import MAX_RANK


def _rank(v: View | None) -> int:
    return 0 if v is None else v.coalesced().rank


def _too_high(op: OpNode) -> bool:
    return any(_rank(v) > MAX_RANK for v in (*op.inputs, *op.outputs))


def _split_dim(op: OpNode) -> int:
    """The dim to split on: the smallest one whose selection leaves every view encodable, else
    the one that leaves the lowest rank (split again)."""
    out = op.outputs[0]

    def after(d: int) -> tuple[int, int]:
        views = [v.select(d, 0) for v in (*op.inputs, *op.outputs) if v is not None]
        worst = max(_rank(v) for v in views)
        return (max(worst, MAX_RANK), out.shape[d])

    return min(range(out.rank), key=after)


def _split(op: OpNode) -> list[OpNode]:
    if not _too_high(op):
        return [op]
    d = _split_dim(op)
    pieces = []
    for i in range(op.outputs[0].shape[d]):
        piece = OpNode(
            op.kind,
            tuple(None if v is None else v.select(d, i) for v in op.inputs),
            tuple(v.select(d, i) for v in op.outputs),
            replace(op.attrs),
            name=op.name,
            source=op.source,
        )
        pieces += _split(piece)
    return pieces


def collapse_high_rank(graph: Graph) -> Graph:
    """Split elementwise ops with views of more than MAX_RANK (coalesced) dims; other ops as they are."""
    ops = []
    for op in graph.ops:
        splittable = op.kind == "elementwise" and not has_positional(op.attrs.expr) and op.outputs[0].rank > 0
        ops += _split(op) if splittable else [op]
    graph.ops = ops
    return graph


# ---- attention written out -> the fused attention op ----
#
# `softmax(mask(q @ k^T * scale)) @ v` with 3-D or higher operands lowers (ops/elementwise.lower_bmm)
# to one matmul per batch entry, each copied into its slice of a [BS, M, N] buffer; the scale and
# masks are elementwise ops over that buffer, in its row-major order; softmax is a row op. The
# rule below recognises that shape of graph whatever the spelling that produced it (matmul,
# einsum, bmm, heads reshaped, repeat_kv materialised or broadcast, masked_fill or where or an
# additive mask, causal from tril or from comparing positions) by following element offsets:
# each operand of the products is a set of offsets into one buffer, and the rule asks whether
# those offsets are a strided [B, H, S, D] view, with kv heads broadcast over groups of G query
# heads (GQA). Nothing depends on how the views were spelt, only on which elements they read.

# Masked scores: a fill at or below this is excluded from the softmax (exp underflows to 0 in
# fp32 for any realistic row max). Rows with every key masked differ: eager gives uniform
# weights (finite fill) or NaN (-inf), the attention op 0.
MASK_FILL_MAX = -1e4
# Capture binds compile-time constants (masks built from shapes, scalar tensors) as buffers named
# so (frontend/capture.py, Const): their values may be read here; other buffers' values may change.
CONST_PREFIX = "const_"


@dataclass(frozen=True)
class _Mask:
    kind: str  # "keep": true where kept; "drop": true where masked; "add": added to the scores
    view: View  # in the shape of the elementwise op that applies it (the scores' row-major order)
    scale_after: float  # what the scores are multiplied by after the mask is applied


@dataclass
class _Chain:
    """The scores' way from the first product to softmax."""

    pieces: list[OpNode]  # the first product's per-batch matmuls, in batch order
    scale: float
    masks: list[_Mask]
    stage: tuple[int, ...]  # the highest-rank shape the scores take on the way (gives B)


def _writers(graph: Graph) -> dict[int, list[OpNode]]:
    found: dict[int, list[OpNode]] = {}
    for op in graph.ops:
        for o in op.outputs:
            found.setdefault(o.buffer, []).append(op)
    return found


def _readers(graph: Graph) -> dict[int, list[OpNode]]:
    """buffer -> the ops reading it, each once."""
    found: dict[int, dict[int, OpNode]] = {}
    for op in graph.ops:
        for v in op.inputs:
            if v is not None:
                found.setdefault(v.buffer, {})[id(op)] = op
    return {b: list(ops.values()) for b, ops in found.items()}


def _is_identity(graph: Graph, v: View) -> bool:
    """Does v read all of its buffer, in row-major order?"""
    return v.offset == 0 and v.is_contiguous() and v.numel == graph.buffers[v.buffer].numel


def _is_copy(op: OpNode) -> bool:
    return op.kind == "elementwise" and op.attrs.expr[1:2] == ("copy",) and op.attrs.expr[3:] == (("in", 0),)


def const_value(graph: Graph, v: View) -> torch.Tensor | None:
    buf = graph.buffers[v.buffer]
    t = graph.params.get(v.buffer)
    if t is None or not buf.name.startswith(CONST_PREFIX):
        return None
    return torch.as_strided(t, v.shape, v.strides, t.storage_offset() + v.offset)


def _scalar(graph: Graph, op: OpNode, e) -> float | None:
    """The value of a leaf that is one number: a literal, or a constant input all of whose elements are one."""
    if e[0] == "const":
        return float(e[1])
    if e[0] == "in" and all(st == 0 for st in op.inputs[e[1]].strides):
        t = const_value(graph, op.inputs[e[1]])
        return None if t is None else float(t.reshape(-1)[0]) if t.numel() else None
    return None


def _reads(e, k: int) -> bool:
    return e == ("in", k) or (e[0] == "op" and any(_reads(a, k) for a in e[3:]))


def _terms(graph: Graph, op: OpNode, e, k: int) -> tuple[float, list[tuple[str, int, float]]] | None:
    """Expression e of op as scale x (input k) under masks: (scale, [(kind, slot, scale after)]), or None."""
    if e == ("in", k):
        return 1.0, []
    if e[0] != "op":
        return None
    name, args = e[1], e[3:]
    if name == "copy":
        return _terms(graph, op, args[0], k)
    if name in ("mul", "div") and len(args) == 2:
        inner, c = (
            (args[0], _scalar(graph, op, args[1])) if _reads(args[0], k) else (args[1], _scalar(graph, op, args[0]))
        )
        if c is None or c <= 0 or (name == "div" and not _reads(args[0], k)):
            return None
        c = c if name == "mul" else 1.0 / c
        found = _terms(graph, op, inner, k)
        return None if found is None else (found[0] * c, [(m, j, s * c) for m, j, s in found[1]])
    if name == "where" and args[0][0] == "in" and args[0][1] != k:
        fill_true, fill_false = _scalar(graph, op, args[1]), _scalar(graph, op, args[2])
        if fill_true is not None and fill_true <= MASK_FILL_MAX:
            kind, inner = "drop", args[2]
        elif fill_false is not None and fill_false <= MASK_FILL_MAX:
            kind, inner = "keep", args[1]
        else:
            return None
        found = _terms(graph, op, inner, k)
        return None if found is None else (found[0], found[1] + [(kind, args[0][1], 1.0)])
    if name == "add" and len(args) == 2:
        inner, other = (args[0], args[1]) if _reads(args[0], k) else (args[1], args[0])
        found = _terms(graph, op, inner, k)
        if found is None:
            return None
        if _scalar(graph, op, other) is not None:  # softmax does not see a constant shift
            return found
        if other[0] == "in" and other[1] != k:
            return found[0], found[1] + [("add", other[1], 1.0)]
    return None


def _product_pieces(graph: Graph, buf: int, writers) -> list[OpNode] | None:
    """The matmuls of a batched product (lower_bmm): `buf` is written, in row-major order, by one
    copy per batch entry, each of the whole output of a plain matmul."""
    pieces, at = [], 0
    for c in writers.get(buf, []):
        src = writers.get(c.inputs[0].buffer, []) if _is_copy(c) else []
        if len(src) != 1 or src[0].kind != "matmul" or not _is_identity(graph, c.inputs[0]):
            return None
        mm = src[0]
        if mm.inputs[2] is not None or mm.attrs.norm is not None:
            return None
        out = c.outputs[0]
        if out.offset != at or not out.is_contiguous():
            return None
        at += out.numel
        pieces.append(mm)
    return pieces if pieces and at == graph.buffers[buf].numel else None


def _scores_chain(graph: Graph, buf: int, writers, depth: int = 0) -> _Chain | None:
    """How the values of `buf` (read whole, row-major) come from a batched product."""
    pieces = _product_pieces(graph, buf, writers)
    if pieces is not None:
        return _Chain(pieces, 1.0, [], ())
    ws = writers.get(buf, [])
    if depth > 8 or len(ws) != 1 or ws[0].kind != "elementwise" or not _is_identity(graph, ws[0].outputs[0]):
        return None
    op = ws[0]
    for k, v in enumerate(op.inputs):
        if v is None or not _is_identity(graph, v):
            continue
        terms = _terms(graph, op, op.attrs.expr, k)
        chain = _scores_chain(graph, v.buffer, writers, depth + 1) if terms is not None else None
        if chain is None:
            continue
        scale, masks = terms
        chain.masks = [replace(m, scale_after=m.scale_after * scale) for m in chain.masks]
        chain.masks += [_Mask(kind, op.inputs[j], after) for kind, j, after in masks]
        chain.scale *= scale
        if len(op.outputs[0].shape) > len(chain.stage):
            chain.stage = op.outputs[0].shape
        return chain
    return None


def _fit(buffer: int, dtype: torch.dtype, offs: np.ndarray) -> View | None:
    """The strided view whose element offsets are `offs` (in its row-major order), or None."""
    base = int(offs.flat[0])
    strides = []
    for d, n in enumerate(offs.shape):
        unit = tuple(1 if i == d and n > 1 else 0 for i in range(offs.ndim))
        strides.append(int(offs[unit]) - base)
    grid = sum(
        np.arange(n).reshape([-1 if i == d else 1 for i in range(offs.ndim)]) * st
        for d, (n, st) in enumerate(zip(offs.shape, strides))
    )
    if base < 0 or not np.array_equal(base + grid, offs):
        return None
    return View(buffer, dtype, tuple(offs.shape), tuple(strides), base)


def _sources(graph: Graph, buffer: int, offs: np.ndarray, writers) -> list[tuple[int, np.ndarray]]:
    """(buffer, offsets) of the same elements: in `buffer`, and, when `buffer` is a plain copy
    (repeat_kv materialised, a layout copy), in the copy's source (preferred: the copy may then die)."""
    found = [(buffer, offs)]
    ws = writers.get(buffer, [])
    if len(ws) == 1 and _is_copy(ws[0]) and _is_identity(graph, ws[0].outputs[0]):
        src = ws[0].inputs[0]
        if src.dtype == ws[0].outputs[0].dtype:
            found.insert(0, (src.buffer, src.offsets()[offs]))
    return found


def _stacked(views: list[View]) -> np.ndarray:
    return np.stack([v.offsets().reshape(v.shape) for v in views])


def _heads(graph, views: list[View], b: int, h: int, writers) -> dict[int, View]:
    """{G: [B, H / G, S, D] view} for each group size G at which the per-batch [D, S] or [S, D]
    operands (batch entry b * H + h) read the same elements for the G heads of a group."""
    offs = _stacked(views)
    found = {}
    for buffer, o in _sources(graph, views[0].buffer, offs, writers):
        o = o.reshape((b, h) + o.shape[1:])
        for g in (g for g in range(h, 0, -1) if h % g == 0 and g not in found):
            grouped = o.reshape((b, h // g, g) + o.shape[2:])
            if (grouped == grouped[:, :, :1]).all():
                view = _fit(buffer, views[0].dtype, np.ascontiguousarray(grouped[:, :, 0]))
                if view is not None:
                    found[g] = view
    return found


def _batch_splits(chain: _Chain, batch: int) -> list[tuple[int, int]]:
    """Candidate (B, H) of the scores' B * H batch entries: B from a stage of 4 or more dims
    first, then every divisor (the split decides only how the output lands, not the values)."""
    first = [chain.stage[0]] if len(chain.stage) >= 4 and batch % chain.stage[0] == 0 else []
    rest = [b for b in range(batch, 0, -1) if batch % b == 0 and b not in first]
    return [(b, batch // b) for b in first + rest]


@dataclass
class _Match:
    softmax: OpNode
    chain: _Chain
    pv: list[OpNode]  # the second product's matmuls and the copies of their outputs
    q: View
    k: View
    v: View
    group: int
    out: View  # [B, H, M, Dv] of the second product's [BS, M, Dv] output buffer


def _match(graph: Graph, sm: OpNode, writers, readers) -> _Match | None:
    if not _is_identity(graph, sm.inputs[0]) or not _is_identity(graph, sm.outputs[0]):
        return None
    chain = _scores_chain(graph, sm.inputs[0].buffer, writers)
    if chain is None:
        return None
    # Forward from the probabilities, through casts, to the second product's matmuls.
    p = sm.outputs[0].buffer
    while len(readers.get(p, [])) == 1 and _is_copy(readers[p][0]) and _is_identity(graph, readers[p][0].inputs[0]):
        p = readers[p][0].outputs[0].buffer
    pv_mm = readers.get(p, [])
    if len(pv_mm) != len(chain.pieces) or any(op.kind != "matmul" or op.inputs[0].buffer != p for op in pv_mm):
        return None
    if any(op.inputs[1].buffer == p or op.inputs[2] is not None or op.attrs.norm is not None for op in pv_mm):
        return None
    m, n = pv_mm[0].inputs[0].shape
    at = [op.inputs[0].offset for op in pv_mm]
    if graph.buffers[p].numel != len(pv_mm) * m * n or at != list(range(0, len(pv_mm) * m * n, m * n)):
        return None
    if not all(op.inputs[0].is_contiguous() and op.inputs[0].shape == (m, n) for op in pv_mm):
        return None
    copies = [readers.get(op.outputs[0].buffer, []) for op in pv_mm]
    if any(len(c) != 1 or not _is_copy(c[0]) for c in copies):
        return None
    copies = [c[0] for c in copies]
    out_buf = copies[0].outputs[0].buffer
    found = _product_pieces(graph, out_buf, writers)
    if found is None or [id(op) for op in found] != [id(op) for op in pv_mm]:
        return None
    qk = chain.pieces
    m, dv = qk[0].inputs[0].shape[0], pv_mm[0].inputs[1].shape[1]
    fallback = None
    for b, h in _batch_splits(chain, len(qk)):
        qs = _heads(graph, [op.inputs[0] for op in qk], b, h, writers).get(1)
        ks = _heads(graph, [op.inputs[1].permute((1, 0)) for op in qk], b, h, writers)
        vs = _heads(graph, [op.inputs[1] for op in pv_mm], b, h, writers)
        groups = sorted(set(ks) & set(vs), reverse=True)
        if qs is None or not groups:
            continue
        g = groups[0]
        out = View.full(graph.buffers[out_buf], (b, h, m, dv))
        match = _Match(sm, chain, pv_mm + copies, qs, ks[g], vs[g], g, out)
        if _fold_output_copy(graph, out, readers)[1] is not None:
            return match
        fallback = fallback or match
    return fallback


@dataclass
class _Masks:
    causal: bool
    mask: View | None  # [B, H, M, N]: bool (keep where true) or added to the scores
    negate: bool  # mask is a drop mask: the attention op needs its negation


def _resolve_masks(graph: Graph, match: _Match) -> _Masks | None:
    """The masks as the attention op takes them: a constant causal pattern becomes `causal`; at
    most one other mask is left."""
    b, h, m, _ = match.q.shape
    n = match.k.shape[2]
    keep = torch.ones(1, m, n, dtype=torch.bool)  # [batch entries or 1 for all, M, N]
    runtime = []
    for mk in match.chain.masks:
        flat = mk.view.reshape((b * h, m, n))
        if flat is not None and flat.strides[0] == 0:
            flat = flat.slice(0, 0, 1)  # the same for every batch entry: one copy of it
        value = const_value(graph, flat) if flat is not None else None
        if value is None:
            runtime.append(mk)
        elif mk.kind == "add":
            value = value.double() * mk.scale_after
            if not ((value == 0) | (value <= MASK_FILL_MAX)).all():
                return None
            keep = keep & (value == 0)
        else:
            keep = keep & ((value != 0) == (mk.kind == "keep"))
    causal = torch.ones(m, n, dtype=torch.bool).tril()
    if (keep == causal).all():
        is_causal = True
    elif keep.all():
        is_causal = False
    else:
        return None  # a constant mask other than causal: left unfused
    if not runtime:
        return _Masks(is_causal, None, False)
    if len(runtime) > 1 or (runtime[0].kind == "add" and runtime[0].scale_after != 1.0):
        return None
    view = runtime[0].view.reshape((b, h, m, n))
    if view is None:
        return None
    return _Masks(is_causal, view, runtime[0].kind == "drop")


def _double_negation(graph: Graph, masks: _Masks, writers) -> _Masks:
    """A drop mask that is the negation of a keep mask (`masked_fill(~keep, -inf)`) -> that keep
    mask, read where the negation reads it: no negation op for the attention op (per layer, as the
    model computes `~keep` per layer), the same mask read as F.scaled_dot_product_attention's."""
    if masks.mask is None or not masks.negate:
        return masks
    ws = writers.get(masks.mask.buffer, [])
    if len(ws) != 1 or ws[0].kind != "elementwise" or not _is_identity(graph, ws[0].outputs[0]):
        return masks
    (op,) = ws
    if op.attrs.expr[:3] not in (("op", "logical_not", torch.bool), ("op", "bitwise_not", torch.bool)):
        return masks
    if op.attrs.expr[3:] != (("in", 0),) or op.inputs[0].dtype != torch.bool:
        return masks
    src = op.inputs[0]
    keep = _fit(src.buffer, src.dtype, src.offsets()[masks.mask.offsets()].reshape(masks.mask.shape))
    return masks if keep is None else replace(masks, mask=keep, negate=False)


def _fold_output_copy(graph: Graph, out: View, readers) -> tuple[View, OpNode | None]:
    """If the one reader of the attention output is a plain copy of all of it (the transpose and
    reshape back to [B, S, H * D]), the attention op writes where the copy would (as
    F.scaled_dot_product_attention's lowering lays its output out): (where to write, the copy)."""
    rs = readers.get(out.buffer, [])
    if len(rs) != 1 or not _is_copy(rs[0]) or rs[0].inputs[0].dtype != rs[0].outputs[0].dtype:
        return out, None
    src, dst = rs[0].inputs[0].offsets(), rs[0].outputs[0].offsets()
    if len(np.unique(src)) != out.numel or len(src) != out.numel:
        return out, None
    where = np.empty(out.numel, dtype=np.int64)
    where[src] = dst
    view = _fit(rs[0].outputs[0].buffer, out.dtype, where.reshape(out.shape))
    return (out, None) if view is None else (view, rs[0])


def _rewrite(graph: Graph, match: _Match, masks: _Masks, readers, kept: dict[View, View]) -> None:
    """The attention op in place of the second product; the first product, the masks and softmax
    are left for the dead-op pass (canonicalize runs it after each rule; something else may read them).
    A drop mask gets one negation per mask view (`kept`: drop view -> keep view, shared by the
    attention ops of every layer reading that mask), placed before the first of them; not a mask
    in model state (ops between the layers may write it)."""
    first = next(i for i, op in enumerate(graph.ops) if op is match.pv[0])
    new_ops = []
    mask = masks.mask
    if mask is not None and masks.negate and mask not in kept:
        once = mask  # broadcast dims (stride 0) negated once, then broadcast again
        for d in (d for d, st in enumerate(mask.strides) if st == 0):
            once = once.slice(d, 0, 1)
        keep = graph.new_tensor(f"{match.softmax.name}_keep", once.shape, torch.bool)
        expr = ("op", "logical_not", torch.bool, ("in", 0))
        new_ops.append(OpNode("elementwise", (once,), (keep,), ElementwiseAttrs(expr), name=match.softmax.name))
        kept[mask] = keep.expand(mask.shape)
    if mask is not None and masks.negate:
        mask = kept[mask] if graph.buffers[mask.buffer].kind != BufferKind.STATE else kept.pop(mask)
    out, folded = _fold_output_copy(graph, match.out, readers)
    d = match.q.shape[3]
    scale = match.chain.scale
    if math.isclose(scale, 1.0 / math.sqrt(d), rel_tol=1e-6):
        scale = 1.0 / math.sqrt(d)  # the default scale, as F.scaled_dot_product_attention computes it
    attrs = AttentionAttrs(scale=scale, causal=masks.causal, group=match.group)
    source = match.pv[0].source
    new_ops.append(
        OpNode("attention", (match.q, match.k, match.v, mask), (out,), attrs, name=match.softmax.name, source=source)
    )
    gone = {id(op) for op in match.pv} | ({id(folded)} if folded is not None else set())
    old = graph.ops
    graph.ops = [op for op in old[:first] if id(op) not in gone] + new_ops
    graph.ops += [op for op in old[first:] if id(op) not in gone]


def fuse_written_attention(graph: Graph) -> Graph:
    """Attention written out (module docstring) -> the fused attention op (ops/attention.py)."""
    kept: dict[View, View] = {}
    for sm in [op for op in graph.ops if op.kind == "softmax"]:
        writers, readers = _writers(graph), _readers(graph)
        match = _match(graph, sm, writers, readers)
        masks = _resolve_masks(graph, match) if match is not None else None
        if masks is not None:
            masks = _double_negation(graph, masks, writers)
            _rewrite(graph, match, masks, readers, kept)
    return graph


# The rules of this module, for passes/canonicalize.RULES: attention after softmax written out is
# canonicalised (it then finds the softmax op); views last, over whatever the rules left.
RULES = [("attention", fuse_written_attention), ("high_rank_views", collapse_high_rank)]
