"""Elementwise ops with broadcasting, fused into one generated tile op per chain.

Capture lowers each ATen elementwise op to an `elementwise` node whose `expr` is a small
tree: ("in", k) | ("const", value) | ("op", name, dtype, *args). The fuse pass splices a
producer's tree into its consumer's, so a chain becomes one node; codegen emits one
@triton.jit routine per distinct tree (shared by every layer with the same chain). Every
input view is expanded to the output shape, so one linear index addresses them all.
Arithmetic is fp32; each node's result is rounded to its own dtype, as eager would store it.

Two positional leaves let a fused expression read a `cat` (passes/fuse.fold_cats): each piece
is computed where it lands, selected by the output index along the cat's dim.
  ("idx", inner, size): the output index along one dim, (lin // inner) % size, as a number.
  ("win", k, inner, size, lo, hi[, leader, delta]): input k where lo <= (lin // inner) % size
    < hi, 0 elsewhere. Input k's view is addressed only inside its window (a piece's input
    shifted to where the piece lands may point outside its buffer elsewhere): loads, regions
    and the reference mask it. With leader and delta, input k's view is input leader's moved
    by delta elements (same buffer and strides, disjoint windows): the routine loads both with
    one masked load (rotate-half: x's two halves, swapped, are one load of x).
A slot read through a window is read through that window only (`slot_windows`). lin is the
linear index of the routine's output (elementwise) or update (scatter) in row-major order, so
positional leaves are only meaningful in the op they were built for: fuse passes never splice
a positional expression into another op (`has_positional`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from mkcompiler.ops.base import (
    REGION_MEMO,
    Access,
    Intervals,
    OpFamily,
    Work,
    cdiv,
    elements,
    flat_flags,
    linear_access,
    offsets_intervals,
    shifted,
    tl_dtype,
)
from mkcompiler.ops.registry import family, lowers

from mkcompiler.ir.graph import View
from mkcompiler.ir.layout import MAX_RANK

aten = torch.ops.aten

# name -> (Triton template over "{0}", "{1}"...; torch function on fp32 tensors)
OPS = {
    "copy": ("{0}", lambda a: a),
    "add": ("({0} + {1})", torch.add),
    "sub": ("({0} - {1})", torch.sub),
    "mul": ("({0} * {1})", torch.mul),
    "div": ("({0} / {1})", torch.div),
    "neg": ("(-{0})", torch.neg),
    "exp": ("tl.exp({0})", torch.exp),
    "log": ("tl.log({0})", torch.log),
    "sqrt": ("tl.sqrt({0})", torch.sqrt),
    "rsqrt": ("(1.0 / tl.sqrt({0}))", torch.rsqrt),
    "reciprocal": ("(1.0 / {0})", torch.reciprocal),
    "abs": ("tl.abs({0})", torch.abs),
    "sigmoid": ("tl.sigmoid({0})", torch.sigmoid),
    "silu": ("({0} * tl.sigmoid({0}))", torch.nn.functional.silu),
    "relu": ("tl.maximum({0}, 0.0)", torch.relu),
    # |x| < 0.2: the odd series to x^9 (next term < 2e-10); else (1 - e) / (1 + e), e = exp(-2|x|),
    # whose cancellation costs at most ~2 ulp there (2 sigmoid(2x) - 1 lost ~1e-7 absolute near 0)
    "tanh": (
        "tl.where(tl.abs({0}) < 0.2, {0} + {0} * {0} * {0} * (-0.3333333333333333 + {0} * {0} * (0.13333333333333333"
        " + {0} * {0} * (-0.05396825396825397 + {0} * {0} * 0.021869488536155203))), tl.where({0} < 0.0, -1.0, 1.0)"
        " * (1.0 - tl.exp(-2.0 * tl.abs({0}))) / (1.0 + tl.exp(-2.0 * tl.abs({0}))))",
        torch.tanh,
    ),
    "gelu": ("(0.5 * {0} * (1.0 + tl.erf({0} * 0.7071067811865476)))", torch.nn.functional.gelu),
    "gelu_tanh": (
        "(0.5 * {0} * (2.0 * tl.sigmoid(1.5957691216057308 * ({0} + 0.044715 * {0} * {0} * {0}))))",
        lambda a: torch.nn.functional.gelu(a, approximate="tanh"),
    ),
    "maximum": ("tl.maximum({0}, {1})", torch.maximum),
    "minimum": ("tl.minimum({0}, {1})", torch.minimum),
    "pow": ("tl.exp2({1} * tl.log2({0}))", torch.pow),  # general exponent: base must be > 0
    "sin": ("tl.sin({0})", torch.sin),
    "cos": ("tl.cos({0})", torch.cos),
    "erf": ("tl.erf({0})", torch.erf),
    "exp2": ("tl.exp2({0})", torch.exp2),
    "log2": ("tl.log2({0})", torch.log2),
    "floor": ("tl.floor({0})", torch.floor),
    "ceil": ("tl.ceil({0})", torch.ceil),
    "trunc": ("tl.where({0} < 0.0, tl.ceil({0}), tl.floor({0}))", torch.trunc),
    "sign": ("(({0} > 0.0).to(tl.float32) - ({0} < 0.0).to(tl.float32))", torch.sign),
    "isnan": ("({0} != {0}).to(tl.float32)", lambda a: torch.isnan(a).float()),
    # log(1 + x) and exp(x) - 1 without the cancellation near 0 (Kahan's forms)
    "log1p": ("tl.where(1.0 + {0} == 1.0, {0}, tl.log(1.0 + {0}) * {0} / ((1.0 + {0}) - 1.0))", torch.log1p),
    "expm1": (
        "tl.where({0} > 80.0, tl.exp({0}), tl.where({0} < -20.0, -1.0, tl.where(tl.exp({0}) == 1.0, {0}, "
        "(tl.exp({0}) - 1.0) * {0} / tl.log(tl.exp({0})))))",
        torch.expm1,
    ),
    # division rounded in one op: an intermediate quotient would be stored in the operands'
    # (integer) dtype, truncated, before it is floored
    "floor_div": ("tl.floor({0} / {1})", lambda a, b: torch.div(a, b, rounding_mode="floor")),
    "trunc_div": (
        "tl.where({0} / {1} < 0.0, tl.ceil({0} / {1}), tl.floor({0} / {1}))",
        lambda a, b: torch.div(a, b, rounding_mode="trunc"),
    ),
    # Comparisons and logic yield 0.0 / 1.0 (stored as bool where the node is bool).
    "lt": ("({0} < {1}).to(tl.float32)", lambda a, b: (a < b).float()),
    "le": ("({0} <= {1}).to(tl.float32)", lambda a, b: (a <= b).float()),
    "gt": ("({0} > {1}).to(tl.float32)", lambda a, b: (a > b).float()),
    "ge": ("({0} >= {1}).to(tl.float32)", lambda a, b: (a >= b).float()),
    "eq": ("({0} == {1}).to(tl.float32)", lambda a, b: (a == b).float()),
    "ne": ("({0} != {1}).to(tl.float32)", lambda a, b: (a != b).float()),
    "logical_not": ("({0} == 0.0).to(tl.float32)", lambda a: (a == 0).float()),
    "logical_and": ("((({0} != 0.0) & ({1} != 0.0))).to(tl.float32)", lambda a, b: ((a != 0) & (b != 0)).float()),
    "logical_or": ("((({0} != 0.0) | ({1} != 0.0))).to(tl.float32)", lambda a, b: ((a != 0) | (b != 0)).float()),
    "where": ("tl.where({0} != 0.0, {1}, {2})", lambda c, a, b: torch.where(c != 0, a, b)),
}

# Ops compiled to long library code on a GPU (libdevice's precise sin / cos with their range
# reductions, erf, log): each element a thread holds inlines a copy. passes/fuse.py computes
# such a producer once rather than again in each of several readers (RoPE's cos and sin, read
# by every layer through a broadcast over heads, were evaluated per element of every reader).
LIBRARY_OPS = frozenset({"sin", "cos", "erf", "log", "log2", "log1p", "expm1", "pow", "gelu"})

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Integer and bool values are computed in fp32 too: exact for |x| < 2**24 (positions, indices,
# masks); what needs more range is refused at capture.
VALUE_DTYPES = FLOAT_DTYPES + (torch.bool, torch.int32, torch.int64)


def _lower_simple(name):
    def lower(ctx, node, *args, **kwargs):
        return ctx.elementwise(node, name, *args)

    return lower


for _name, _targets in {
    "add": [aten.add.Tensor, aten.add.Scalar],
    "sub": [aten.sub.Tensor, aten.sub.Scalar],
    "mul": [aten.mul.Tensor, aten.mul.Scalar],
    "div": [aten.div.Tensor, aten.div.Scalar],
    "neg": [aten.neg.default],
    "exp": [aten.exp.default],
    "log": [aten.log.default],
    "sqrt": [aten.sqrt.default],
    "rsqrt": [aten.rsqrt.default],
    "reciprocal": [aten.reciprocal.default],
    "abs": [aten.abs.default],
    "sigmoid": [aten.sigmoid.default],
    "silu": [aten.silu.default],
    "relu": [aten.relu.default],
    "tanh": [aten.tanh.default],
    "maximum": [aten.maximum.default],
    "minimum": [aten.minimum.default],
    "sin": [aten.sin.default],
    "cos": [aten.cos.default],
    "erf": [aten.erf.default],
    "exp2": [aten.exp2.default],
    "log2": [aten.log2.default],
    "floor": [aten.floor.default],
    "ceil": [aten.ceil.default],
    "trunc": [aten.trunc.default],
    "sign": [aten.sign.default],
    "isnan": [aten.isnan.default],
    "log1p": [aten.log1p.default],
    "expm1": [aten.expm1.default],
    "lt": [aten.lt.Tensor, aten.lt.Scalar],
    "le": [aten.le.Tensor, aten.le.Scalar],
    "gt": [aten.gt.Tensor, aten.gt.Scalar],
    "ge": [aten.ge.Tensor, aten.ge.Scalar],
    "eq": [aten.eq.Tensor, aten.eq.Scalar],
    "ne": [aten.ne.Tensor, aten.ne.Scalar],
    "logical_not": [aten.logical_not.default, aten.bitwise_not.default],
    "logical_and": [aten.logical_and.default, aten.bitwise_and.Tensor],
    "logical_or": [aten.logical_or.default, aten.bitwise_or.Tensor],
    "where": [aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar],
}.items():
    lowers(*_targets)(_lower_simple(_name))


@lowers(aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar)
def lower_add_sub(ctx, node, a, b, alpha=1):
    name = "add" if node.target in (aten.add.Tensor, aten.add.Scalar) else "sub"
    if alpha != 1:
        b = ctx.elementwise(None, "mul", b, alpha) if not isinstance(b, (int, float)) else b * alpha
    return ctx.elementwise(node, name, a, b)


@lowers(aten.div.Tensor_mode)
def lower_div_mode(ctx, node, a, b, rounding_mode=None):
    name = {None: "div", "floor": "floor_div", "trunc": "trunc_div"}.get(rounding_mode)
    if name is None:
        ctx.unsupported(node, f"div with rounding_mode={rounding_mode!r}")
    return ctx.elementwise(node, name, a, b)


@lowers(aten.gelu.default)
def lower_gelu(ctx, node, a, approximate="none"):
    return ctx.elementwise(node, "gelu" if approximate == "none" else "gelu_tanh", a)


@lowers(aten.pow.Tensor_Scalar)
def lower_pow(ctx, node, a, exponent):
    # Small integer exponents become products (exact, any sign of the base), like eager.
    if float(exponent) == int(exponent) and 1 <= int(exponent) <= 4:
        out = a
        for i in range(int(exponent) - 1):
            out = ctx.elementwise(node if i == int(exponent) - 2 else None, "mul", out, a)
        return out if int(exponent) > 1 else ctx.elementwise(node, "copy", a)
    if exponent == 0.5:
        return ctx.elementwise(node, "sqrt", a)
    if exponent == -0.5:
        return ctx.elementwise(node, "rsqrt", a)
    if exponent == -1:
        return ctx.elementwise(node, "reciprocal", a)
    return ctx.elementwise(node, "pow", a, float(exponent))


@lowers(aten._to_copy.default, aten.to.dtype, aten.clone.default)
def lower_to_copy(ctx, node, a, *args, **kwargs):
    out_dtype = node.meta["val"].dtype
    if out_dtype == a.dtype:
        return a  # values are never mutated in place, so a copy can alias its source
    return ctx.elementwise(node, "copy", a)


@lowers(aten.copy.default)
def lower_copy(ctx, node, dst, src, non_blocking=False):
    # Functional `dst.copy_(src)` (what export makes of an in-place copy into model state):
    # src broadcast to dst's shape, in dst's dtype. dst's old values are not read.
    return ctx.elementwise(node, "copy", src)


@lowers(aten.bmm.default)
def lower_bmm(ctx, node, a, b):
    # A batched product with K = 1 is an outer product (rotary tables: inv_freq @ positions):
    # one multiply per element, as exact as eager's. Otherwise one mm per batch entry.
    if a.shape[2] == 1:
        return ctx.elementwise(node, "mul", a, b)
    out = ctx.new_output(node)
    for i in range(a.shape[0]):
        ctx.copy_into(ctx.emit_matmul(node, a.select(0, i), b.select(0, i), None), out.select(0, i), node)
    return out


def _const_src(v: float) -> str:
    if math.isinf(v) or math.isnan(v):
        return f"float('{v}')"
    return repr(float(v))


def _round_src(dtype: torch.dtype) -> str:
    """Round an fp32 value as storing it in `dtype` would (integers truncate toward zero)."""
    if dtype == torch.float32 or dtype == torch.bool:
        return ""
    return f".to({tl_dtype(dtype)}).to(tl.float32)"


def op_names(expr):
    """The op names of `expr`'s nodes, depth first, a node before its arguments."""
    if expr[0] == "op":
        yield expr[1]
        for a in expr[3:]:
            yield from op_names(a)


def has_positional(expr) -> bool:
    """Does `expr` use positional leaves ("idx", "win": valid only in the op they were built for)?"""
    if expr[0] in ("idx", "win"):
        return True
    return expr[0] == "op" and any(has_positional(a) for a in expr[3:])


def slot_windows(expr) -> dict[int, tuple[int, int, int, int]]:
    """{input slot: (inner, size, lo, hi)} for the slots `expr` reads through a window; raises
    ValueError when a slot is read through two windows, or through a window and plainly."""
    found: dict[int, tuple | None] = {}

    def visit(e):
        if e[0] in ("in", "win"):
            w = tuple(e[2:6]) if e[0] == "win" else None
            if found.setdefault(e[1], w) != w:
                raise ValueError(f"input {e[1]} is read through different windows")
        elif e[0] == "op":
            for a in e[3:]:
                visit(a)

    visit(expr)
    return {k: w for k, w in found.items() if w is not None}


def index_src(inner: int, size: int, lin: str = "lin") -> str:
    """Triton expression: the index along a dim, (lin // inner) % size."""
    return f"({lin} % {size})" if inner == 1 else f"(({lin} // {inner}) % {size})"


def window_src(win, lin: str = "lin") -> str:
    """Triton condition: `lin` inside the window (inner, size, lo, hi)."""
    inner, size, lo, hi = win
    r = index_src(inner, size, lin)
    terms = ([f"({r} >= {lo})"] if lo > 0 else []) + ([f"({r} < {hi})"] if hi < size else [])
    return " & ".join(terms) or "True"


def shared_loads(expr) -> dict[int, tuple[int, int]]:
    """{windowed slot: (leader slot, delta)} from the leaves (group_windows)."""
    found = {}

    def visit(e):
        if e[0] == "win" and len(e) > 6:
            found[e[1]] = (e[6], e[7])
        elif e[0] == "op":
            for a in e[3:]:
                visit(a)

    visit(expr)
    return found


def group_windows(expr, inputs) -> tuple:
    """`expr` with its windowed leaves grouped for shared loads: a windowed slot whose view is an
    earlier windowed slot's moved by some elements (same buffer, dtype, shape and strides), in
    a window of the same index disjoint from the group's, is loaded with it."""
    windows = slot_windows(expr)
    groups: dict[int, list[tuple[int, int, int]]] = {}  # leader -> [(member, window lo, hi)]
    lead: dict[int, tuple[int, int]] = {}
    for k in sorted(windows):
        v, (inner, size, lo, hi) = inputs[k], windows[k]
        for g, members in groups.items():
            u = inputs[g]
            same = (u.buffer, u.dtype, u.shape, u.strides) == (v.buffer, v.dtype, v.shape, v.strides)
            if same and windows[g][:2] == (inner, size) and all(hi <= a or lo >= b for _, a, b in members):
                members.append((k, lo, hi))
                lead[k] = (g, v.offset - u.offset)
                break
        else:
            groups[k] = [(k, lo, hi)]
            lead[k] = (k, 0)
    shared = {k: lg for k, lg in lead.items() if len(groups[lg[0]]) > 1}

    def visit(e):
        if e[0] == "win":
            return e[:6] + (shared[e[1]] if e[1] in shared else ())
        if e[0] == "op":
            return e[:3] + tuple(visit(a) for a in e[3:])
        return e

    return visit(expr)


def input_loads(expr, in_dtypes, flat, arg, split: bool, mask: str = "mask", lin: str = "lin") -> list[str]:
    """Lines loading inputs x0.. of a routine with linear index `lin`: plain inputs under `mask`,
    windowed ones under their window (one mask per distinct window), shared loads (group_windows)
    once per group. arg(k) is input k's view id; flat[k] its flat flag; `split`: i0..i3 (the
    index split over a shared shape) are defined, which strided views need."""
    lines, names, masks = [], {}, {}
    windows = slot_windows(expr)
    for k, w in sorted(windows.items()):
        if w not in names:
            names[w] = f"wmask{len(names)}"
            lines.append(f"{names[w]} = {mask} & {window_src(w, lin)}")
        masks[k] = names[w]
    shared = shared_loads(expr) if all(flat[k] != 0 or split for k in windows) else {}
    for k, dt in enumerate(in_dtypes):
        leader, _ = shared.get(k, (k, 0))
        if leader != k:
            lines.append(f"x{k} = x{leader}  # loaded with x{leader}")
        elif k in shared:
            members = [m for m, (g, _) in shared.items() if g == k]
            m = " | ".join(masks[j] for j in members)
            delta = " + ".join(f"tl.where({masks[j]}, {shared[j][1]}, 0)" for j in members if shared[j][1])
            offs = f"{lin}.to(tl.int64)" if flat[k] != 0 else f"strided_offsets(views_ptr, {arg(k)}, i0, i1, i2, i3)"
            p = f"view_base(addrs_ptr, views_ptr, {arg(k)}, {tl_dtype(dt)}) + {offs} + ({delta or 0})"
            lines.append(f"x{k} = tl.load({p}, mask={m}, other=0.0).to(tl.float32)")
        elif flat[k] == 0 and split:
            lines.append(
                f"x{k} = load_strided(addrs_ptr, views_ptr, {arg(k)}, i0, i1, i2, i3, {masks.get(k, mask)}, {tl_dtype(dt)})"
            )
        else:
            lines.append(
                f"x{k} = load_view(addrs_ptr, views_ptr, {arg(k)}, {lin}, {masks.get(k, mask)}, {tl_dtype(dt)}, {flat[k]})"
            )
    return lines


def in_window(lin: torch.Tensor, win) -> torch.Tensor:
    inner, size, lo, hi = win
    r = (lin // inner) % size
    return (r >= lo) & (r < hi)


def linear_offsets(v, lin: torch.Tensor) -> torch.Tensor:
    """Element offsets of view v at row-major linear indices `lin` (int64 tensor)."""
    off = torch.full_like(lin, v.offset)
    idx = lin.clone()
    for size, stride in zip(reversed(v.shape), reversed(v.strides)):
        off += (idx % size) * stride
        idx //= size
    return off


def window_values(v, win, lin: torch.Tensor, tensor_of) -> torch.Tensor:
    """Values of view v at linear indices `lin` inside window `win`, 0 outside (the reference of a
    windowed load: only elements inside the window are read, as in the kernel)."""
    ok = in_window(lin, win)
    out = torch.zeros(lin.shape, dtype=v.dtype)
    if ok.any():
        offs = linear_offsets(v, lin[ok])
        lo, hi = int(offs.min()), int(offs.max()) + 1
        span = tensor_of(View(v.buffer, v.dtype, (hi - lo,), (1,), lo))
        out[ok] = span[offs - lo]
    return out


# Above this many elements a windowed tile's region is the whole range's (a superset: regions may
# over-approximate, passes/dependencies.py then adds waits, never misses one): element by element,
# an 8B prefill's KV-cache scatters took minutes of build_dag.
WINDOW_EXACT_MAX = 1 << 12  # decode tiles (a head's rows) stay exact


def window_access(v, start: int, end: int, win) -> Access:
    """The elements view v gives linear indices [start, end) inside window `win` (regions)."""
    if min(end, v.numel) - start > WINDOW_EXACT_MAX:
        return linear_access(v, start, end)
    return Access(v.buffer, shifted(_window_intervals(v.shape, v.strides, start, min(end, v.numel), win), v.offset))


@functools.lru_cache(maxsize=REGION_MEMO)
def _window_intervals(shape, strides, start: int, end: int, win) -> Intervals:
    """window_access's intervals for a view at offset 0 (memoized as ops/base.py's regions are)."""
    lin = torch.arange(start, end, dtype=torch.int64)
    offs = linear_offsets(View(0, torch.float32, shape, strides, 0), lin[in_window(lin, win)])
    return offsets_intervals(offs.numpy())


def expr_source(expr, n_inputs: int, lin: str | None = None) -> tuple[list[str], str]:
    """SSA lines computing `expr` from x0..x{n-1}; returns (lines, name of the result). `lin`
    names the routine's linear index, for positional leaves (None: the routine has none)."""
    lines: list[str] = []
    memo: dict = {}

    def visit(e):
        if e in memo:
            return memo[e]
        if e[0] in ("in", "win"):  # a windowed input's load is masked (window_masks): 0 outside
            out = f"x{e[1]}"
        elif e[0] == "idx":
            if lin is None:
                raise NotImplementedError("a positional expression in a routine without a linear index")
            out = f"t{len(lines)}"
            lines.append(f"{out} = {index_src(e[1], e[2], lin)}.to(tl.float32)")
        elif e[0] == "const":
            out = _const_src(e[1])
        else:
            _, name, dtype, *args = e
            code = OPS[name][0].format(*(visit(a) for a in args))
            if all(a[0] == "const" for a in args):  # a constant-only node (a fill): still a [BLOCK] tensor
                code = f"({code}) + tl.zeros([BLOCK], tl.float32)"
            out = f"t{len(lines)}"
            lines.append(f"{out} = ({code}){_round_src(dtype)}")
        memo[e] = out
        return out

    result = visit(expr)
    if expr[0] != "op":  # a bare input/const: give it a tensor name
        lines.append(f"t{len(lines)} = {result} + tl.zeros([BLOCK], tl.float32)")
        result = f"t{len(lines) - 1}"
    return lines, result


def expr_torch(expr, inputs: list[torch.Tensor], lin: torch.Tensor | None = None) -> torch.Tensor:
    """The same expression evaluated with torch (fp32 arithmetic, per-node rounding). `lin`: the
    linear indices of the elements (positional leaves); windowed inputs come masked
    (window_values)."""
    memo: dict = {}

    def visit(e):
        if e in memo:
            return memo[e]
        if e[0] in ("in", "win"):
            out = inputs[e[1]].float()
        elif e[0] == "idx":
            out = ((lin // e[1]) % e[2]).float()
        elif e[0] == "const":
            out = torch.tensor(e[1], dtype=torch.float32)
        else:
            _, name, dtype, *args = e
            out = OPS[name][1](*(visit(a) for a in args)).to(dtype).float()
        memo[e] = out
        return out

    return visit(expr)


def joint_coalesce(views):
    """Drop size-1 dims and merge dims contiguous in every view (all views share one shape)."""
    keep = [i for i, s in enumerate(views[0].shape) if s != 1]
    shape = [views[0].shape[i] for i in keep]
    strides = [[v.strides[i] for i in keep] for v in views]
    for d in range(len(shape) - 1, 0, -1):
        if all(st[d - 1] == st[d] * shape[d] for st in strides):
            shape[d - 1] *= shape.pop(d)
            for st in strides:
                st[d - 1] = st.pop(d)
    if not shape:
        shape, strides = [1], [[1] for _ in views]
    return [replace(v, shape=tuple(shape), strides=tuple(st)) for v, st in zip(views, strides)]


@dataclass
class ElementwiseAttrs:
    expr: tuple  # the expression tree (module docstring)
    block: int | None = None  # elements per block (passes/tile.py)
    blocks_per_tile: int = 1


class ElementwiseKey(NamedTuple):
    kind: str
    expr: tuple  # nested tuples of literals and dtypes: hashable as is
    in_dtypes: tuple
    out_dtype: torch.dtype
    block: int
    flat: tuple[int, ...]  # flat_flags of the output, then the inputs
    numel_div: bool  # the output's numel is a multiple of 8
    shape: tuple[int, ...] | None  # index_shape


@family
class Elementwise(OpFamily):
    kind = "elementwise"

    def key(self, node):
        return ElementwiseKey(
            self.kind,
            node.attrs.expr,
            tuple(v.dtype for v in node.inputs),
            node.outputs[0].dtype,
            node.attrs.block,
            flat_flags(*self.view_args(node)),
            node.outputs[0].numel % 8 == 0,
            self.index_shape(node),
        )

    def label(self, key):
        return "ew_" + "_".join(dict.fromkeys(reversed(list(op_names(key.expr)))))[:24]

    def index_shape(self, node) -> tuple[int, ...] | None:
        """The padded shape all views share, when some view is strided: the kernel then splits
        linear indices once, with this shape as compile-time constants (ops/common.split_index).
        None when every view is contiguous (no split needed) or a view needs more than MAX_RANK
        dims (encode coalesces such a view on its own: the views would not share a shape)."""
        views = self.view_args(node)
        if all(f != 0 for f in flat_flags(*views)) or any(v.rank > MAX_RANK for v in views):
            return None
        return views[0].padded(MAX_RANK)[0]

    def view_args(self, node):
        return joint_coalesce([node.outputs[0], *node.inputs])

    def emit(self, key, name):
        expr, in_dtypes, out_dtype, flat, shape = key.expr, key.in_dtypes, key.out_dtype, key.flat, key.shape
        vec = key.numel_div and all(f == 2 for f in flat)  # 16-byte accesses need uniform masks too
        lines, result = expr_source(expr, len(in_dtypes), "lin")
        n = len(in_dtypes)
        src = [
            "@triton.jit",
            f"def {name}(row_ptr, addrs_ptr, views_ptr, BLOCK: tl.constexpr):",
            "    out_v = arg(row_ptr, 0)",
            f"    first = arg(row_ptr, {n + 1})",
            f"    n = {'aligned_stride(view_numel(views_ptr, out_v), 8)' if vec else 'view_numel(views_ptr, out_v)'}",
            f"    for blk in range(first, first + arg(row_ptr, {n + 2})):  # the tile's blocks",
            "        lin = blk * BLOCK + tl.arange(0, BLOCK)",
            "        mask = lin < n",
        ]
        if shape is not None:  # once for every strided view: they share the shape
            src.append(f"        i0, i1, i2, i3 = split_index(lin, {shape[1]}, {shape[2]}, {shape[3]})")
        loads = input_loads(expr, in_dtypes, flat[1:], lambda k: f"arg(row_ptr, {k + 1})", shape is not None)
        src += [f"        {line}" for line in loads]
        src += [f"        {line}" for line in lines]
        if flat[0] == 0 and shape is not None:
            src.append(
                f"        store_strided(addrs_ptr, views_ptr, out_v, i0, i1, i2, i3, mask, {result}, {tl_dtype(out_dtype)})"
            )
        else:
            src.append(
                f"        store_view(addrs_ptr, views_ptr, out_v, lin, mask, {result}, {tl_dtype(out_dtype)}, {flat[0]})"
            )
        return "\n".join(src) + "\n", f"{name}({{row}}, {{addrs}}, {{views}}, {key.block})"

    def tiles(self, node):
        """(first block, number of blocks): big tensors get several blocks per tile (passes/tile)."""
        blocks = cdiv(node.outputs[0].numel, node.attrs.block)
        per = node.attrs.blocks_per_tile
        return [(b, min(per, blocks - b)) for b in range(0, blocks, per)]

    def span(self, node, coords) -> tuple[int, int]:
        block = node.attrs.block
        return coords[0] * block, min((coords[0] + coords[1]) * block, node.outputs[0].numel)

    def regions(self, node, coords):
        lo, hi = self.span(node, coords)
        windows = slot_windows(node.attrs.expr)
        reads = [
            window_access(v, lo, hi, windows[k]) if k in windows else linear_access(v, lo, hi)
            for k, v in enumerate(node.inputs)
        ]
        return reads, [linear_access(node.outputs[0], lo, hi)]

    def region_work(self, node, coords, reads, writes):
        """Each view's distinct elements (a broadcast input reads few), at most one per element of
        the span: a strided view's region can collapse to its bounding interval (ops/base.py
        MAX_INTERVALS), which bounds dependencies but would count elements never read."""
        lo, hi = self.span(node, coords)
        views = (*node.inputs, node.outputs[0])
        return Work(float(sum(min(elements(a), hi - lo) * v.dtype.itemsize for a, v in zip((*reads, *writes), views))))

    def describe(self, node, coords):
        lo, hi = self.span(node, coords)
        return f"{node.name}[{lo}:{hi}]"

    def reference(self, node, coords, tensor_of):
        sl = slice(*self.span(node, coords))
        lin = torch.arange(sl.start, sl.stop, dtype=torch.int64)
        windows = slot_windows(node.attrs.expr)
        ins = [
            window_values(v, windows[k], lin, tensor_of) if k in windows else tensor_of(v).reshape(-1)[sl]
            for k, v in enumerate(node.inputs)
        ]
        out = expr_torch(node.attrs.expr, ins, lin)
        dst = tensor_of(node.outputs[0])
        idx = torch.unravel_index(torch.arange(sl.start, sl.stop), dst.shape)
        dst[idx] = out.to(dst.dtype)
