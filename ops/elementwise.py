"""Elementwise ops with broadcasting, fused into one generated tile op per chain.

Capture lowers each ATen elementwise op to an `elementwise` node whose `expr` is a small
tree: ("in", k) | ("const", value) | ("op", name, dtype, *args). The fuse pass splices a
producer's tree into its consumer's, so a chain becomes one node; codegen emits one
@triton.jit routine per distinct tree (shared by every layer with the same chain). Every
input view is expanded to the output shape, so one linear index addresses them all.
Arithmetic is fp32; each node's result is rounded to its own dtype, as eager would store it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from mkcompiler.ops.base import OpFamily, bytes_cost, cdiv, flat_flags, linear_access, tl_dtype
from mkcompiler.ops.registry import family, lowers

from mkcompiler.layout import MAX_RANK

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
    "tanh": ("(2.0 * tl.sigmoid(2.0 * {0}) - 1.0)", torch.tanh),
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
    if rounding_mode is not None:
        ctx.unsupported(node, f"div with rounding_mode={rounding_mode!r}")
    return ctx.elementwise(node, "div", a, b)


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


def expr_source(expr, n_inputs: int) -> tuple[list[str], str]:
    """SSA lines computing `expr` from x0..x{n-1}; returns (lines, name of the result)."""
    lines: list[str] = []
    memo: dict = {}

    def visit(e):
        if e in memo:
            return memo[e]
        if e[0] == "in":
            out = f"x{e[1]}"
        elif e[0] == "const":
            out = _const_src(e[1])
        else:
            _, name, dtype, *args = e
            code = OPS[name][0].format(*(visit(a) for a in args))
            out = f"t{len(lines)}"
            lines.append(f"{out} = ({code}){_round_src(dtype)}")
        memo[e] = out
        return out

    result = visit(expr)
    if expr[0] != "op":  # a bare input/const: give it a tensor name
        lines.append(f"t{len(lines)} = {result} + tl.zeros([BLOCK], tl.float32)")
        result = f"t{len(lines) - 1}"
    return lines, result


def expr_torch(expr, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The same expression evaluated with torch (fp32 arithmetic, per-node rounding)."""
    memo: dict = {}

    def visit(e):
        if e in memo:
            return memo[e]
        if e[0] == "in":
            out = inputs[e[1]].float()
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


@family
class Elementwise(OpFamily):
    kind = "elementwise"

    def key(self, node):
        return (
            self.kind,
            node.attrs["expr"],  # nested tuples of literals and dtypes: hashable as is
            tuple(v.dtype for v in node.inputs),
            node.outputs[0].dtype,
            node.attrs["block"],
            flat_flags(*self.view_args(node)),
            node.outputs[0].numel % 8 == 0,
            self.index_shape(node),
        )

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
        _, expr, in_dtypes, out_dtype, block, flat, numel_div, shape = key
        vec = numel_div and all(f == 2 for f in flat)  # 16-byte accesses need uniform masks too
        lines, result = expr_source(expr, len(in_dtypes))
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
        for k, dt in enumerate(in_dtypes):
            v = f"arg(row_ptr, {k + 1})"
            if flat[k + 1] == 0 and shape is not None:
                src.append(
                    f"        x{k} = load_strided(addrs_ptr, views_ptr, {v}, i0, i1, i2, i3, mask, {tl_dtype(dt)})"
                )
            else:
                src.append(
                    f"        x{k} = load_view(addrs_ptr, views_ptr, {v}, lin, mask, {tl_dtype(dt)}, {flat[k + 1]})"
                )
        src += [f"        {line}" for line in lines]
        if flat[0] == 0 and shape is not None:
            src.append(
                f"        store_strided(addrs_ptr, views_ptr, out_v, i0, i1, i2, i3, mask, {result}, {tl_dtype(out_dtype)})"
            )
        else:
            src.append(
                f"        store_view(addrs_ptr, views_ptr, out_v, lin, mask, {result}, {tl_dtype(out_dtype)}, {flat[0]})"
            )
        return "\n".join(src) + "\n", f"{name}({{row}}, {{addrs}}, {{views}}, {block})"

    def tiles(self, node):
        """(first block, number of blocks): big tensors get several blocks per tile (passes/tile)."""
        blocks = cdiv(node.outputs[0].numel, node.attrs["block"])
        per = node.attrs.get("blocks_per_tile", 1)
        return [(b, min(per, blocks - b)) for b in range(0, blocks, per)]

    def span(self, node, coords) -> tuple[int, int]:
        block = node.attrs["block"]
        return coords[0] * block, min((coords[0] + coords[1]) * block, node.outputs[0].numel)

    def regions(self, node, coords):
        lo, hi = self.span(node, coords)
        reads = [linear_access(v, lo, hi) for v in node.inputs]
        return reads, [linear_access(node.outputs[0], lo, hi)]

    def cost(self, node, coords):
        lo, hi = self.span(node, coords)
        return bytes_cost((hi - lo) * sum(v.dtype.itemsize for v in (*node.inputs, node.outputs[0])))

    def describe(self, node, coords):
        lo, hi = self.span(node, coords)
        return f"{node.name}[{lo}:{hi}]"

    def reference(self, node, coords, tensor_of):
        sl = slice(*self.span(node, coords))
        ins = [tensor_of(v).reshape(-1)[sl] for v in node.inputs]
        out = expr_torch(node.attrs["expr"], ins)
        dst = tensor_of(node.outputs[0])
        idx = torch.unravel_index(torch.arange(sl.start, sl.stop), dst.shape)
        dst[idx] = out.to(dst.dtype)
