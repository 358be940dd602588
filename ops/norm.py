"""LayerNorm and RMSNorm over the last dim, as single row ops.

RMSNorm written by hand (pow, mean, add, rsqrt, mul) needs no pattern: it lowers through
elementwise + reduce. These cover `aten.native_layer_norm` (what nn.LayerNorm exports to)
and `aten.rms_norm` where a graph keeps it whole.

A norm's inputs are (x, weight, bias). A fused norm (passes/fuse.py: the elementwise op
producing x, e.g. the residual add, spliced in) has inputs (x0, .., x{k-1}, weight, bias) and
attrs["expr"]: x is that elementwise expression of x0.. (each a view of x's shape), computed
wherever x would be loaded (every sweep over the row); its tile routine is generated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mkcompiler.ops.base import bytes_cost, flat_flags, row_access, row_flags, tl_dtype, whole
from mkcompiler.ops.common import arg, load_view, store_view
from mkcompiler.ops.reduce import RowFamily, row_shape
from mkcompiler.ops.registry import family, lowers

aten = torch.ops.aten


@triton.jit
def norm_rows(
    row_ptr,
    addrs_ptr,
    views_ptr,
    X_DT: tl.constexpr,
    W_DT: tl.constexpr,
    B_DT: tl.constexpr,
    Y_DT: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RMS: tl.constexpr,
    EPS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    X_FLAT: tl.constexpr,
    W_FLAT: tl.constexpr,
    B_FLAT: tl.constexpr,
    Y_FLAT: tl.constexpr,
):
    vx = arg(row_ptr, 0)
    vw = arg(row_ptr, 1)
    vb = arg(row_ptr, 2)
    vy = arg(row_ptr, 3)
    C, R = row_shape(views_ptr, vx, X_DT, X_FLAT)
    rows = arg(row_ptr, 4) * BR + tl.arange(0, BR)
    row_ok = rows < R
    mean = tl.zeros([BR], tl.float32)
    if not RMS:
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            mask = row_ok[:, None] & (cols[None, :] < C)
            mean += tl.sum(
                load_view(addrs_ptr, views_ptr, vx, rows[:, None] * C + cols[None, :], mask, X_DT, X_FLAT), axis=1
            )
        mean = mean / C
    var = tl.zeros([BR], tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        mask = row_ok[:, None] & (cols[None, :] < C)
        x = load_view(addrs_ptr, views_ptr, vx, rows[:, None] * C + cols[None, :], mask, X_DT, X_FLAT)
        d = tl.where(mask, x - mean[:, None], 0.0)
        var += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(var / C + EPS)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        lin = rows[:, None] * C + cols[None, :]
        y = (load_view(addrs_ptr, views_ptr, vx, lin, mask, X_DT, X_FLAT) - mean[:, None]) * rstd[:, None]
        if HAS_W:
            y = y * load_view(addrs_ptr, views_ptr, vw, cols, col_ok, W_DT, W_FLAT)[None, :]
        if HAS_B:
            y = y + load_view(addrs_ptr, views_ptr, vb, cols, col_ok, B_DT, B_FLAT)[None, :]
        store_view(addrs_ptr, views_ptr, vy, lin, mask, y, Y_DT, Y_FLAT)


def _check_last_dim(ctx, node, x, normalized_shape):
    if len(normalized_shape) != 1:
        ctx.unsupported(node, f"normalization over {len(normalized_shape)} dims (only the last dim)")


@lowers(aten.native_layer_norm.default)
def lower_layer_norm(ctx, node, x, normalized_shape, weight, bias, eps):
    _check_last_dim(ctx, node, x, normalized_shape)
    out = ctx.new_output(node, index=0)
    ctx.emit(node, "norm", (ctx.row_input(x), weight, bias), (out,), rms=False, eps=float(eps))
    # mean and rstd (training-only outputs) are refused if anything reads them.
    return (out, ctx.refused(node, "the mean output of layer_norm"), ctx.refused(node, "the rstd output of layer_norm"))


@lowers(aten.layer_norm.default)
def lower_layer_norm_whole(ctx, node, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    _check_last_dim(ctx, node, x, normalized_shape)
    out = ctx.new_output(node)
    ctx.emit(node, "norm", (ctx.row_input(x), weight, bias), (out,), rms=False, eps=float(eps))
    return out


@lowers(aten.rms_norm.default)
def lower_rms_norm(ctx, node, x, normalized_shape, weight=None, eps=None):
    _check_last_dim(ctx, node, x, normalized_shape)
    if eps is None:
        eps = torch.finfo(node.meta["val"].dtype).eps
    out = ctx.new_output(node)
    ctx.emit(node, "norm", (ctx.row_input(x), weight, None), (out,), rms=True, eps=float(eps))
    return out


@lowers(aten._fused_rms_norm.default)
def lower_fused_rms_norm(ctx, node, x, normalized_shape, weight=None, eps=None):
    """What nn.RMSNorm exports to on CUDA: (output, rstd)."""
    _check_last_dim(ctx, node, x, normalized_shape)
    if eps is None:
        eps = torch.finfo(node.meta["val"][0].dtype).eps
    out = ctx.new_output(node, index=0)
    ctx.emit(node, "norm", (ctx.row_input(x), weight, None), (out,), rms=True, eps=float(eps))
    return (out, ctx.refused(node, "the rstd output of rms_norm"))


NORM_TAIL = 4  # a norm instruction's args after its x inputs: weight, bias, output, row block


@family
class Norm(RowFamily):
    kind = "norm"
    routines = ("norm_rows",)

    @staticmethod
    def x_inputs(node) -> list:
        """The views x is computed from: x itself, or (fused) the inputs of attrs["expr"]."""
        return list(node.inputs[:-2])

    @staticmethod
    def expr(node):
        return node.attrs.get("expr", ("in", 0))

    def key(self, node):
        *xs, w, b = node.inputs
        y = node.outputs[0]
        if "expr" not in node.attrs:
            (x,) = xs
            xdesc, flags = x.dtype, row_flags(x, w, b, y)
        else:  # each input holds x's rows: row_flags per input
            xdesc = (node.attrs["expr"], tuple(v.dtype for v in xs))
            flags = tuple(row_flags(v)[0] for v in xs) + flat_flags(w, b, y)
        return (
            self.kind,
            xdesc,
            w.dtype if w is not None else None,
            b.dtype if b is not None else None,
            y.dtype,
            node.attrs["rms"],
            node.attrs["eps"],
            node.attrs["tile"],
            flags,
        )

    def emit(self, key, name):
        if isinstance(key[1], tuple):
            return _emit_fused(key, name)
        _, xdt, wdt, bdt, ydt, rms, eps, (br, bc), flat = key
        w = tl_dtype(wdt) if wdt is not None else "tl.float32"
        b = tl_dtype(bdt) if bdt is not None else "tl.float32"
        return "", (
            f"norm_rows({{row}}, {{addrs}}, {{views}}, {tl_dtype(xdt)}, {w}, {b}, {tl_dtype(ydt)}, "
            f"{wdt is not None}, {bdt is not None}, {rms}, {eps!r}, {br}, {bc}, {', '.join(map(str, flat))})"
        )

    def regions(self, node, coords):
        r0, r1 = self.row_range(node, coords)
        reads = [row_access(v, r0, r1) for v in self.x_inputs(node)]
        reads += [whole(v) for v in node.inputs[-2:] if v is not None]  # weight and bias
        return reads, [row_access(node.outputs[0], r0, r1)]

    def cost(self, node, coords):
        r0, r1 = self.row_range(node, coords)
        itemsize = sum(v.dtype.itemsize for v in self.x_inputs(node)) + node.outputs[0].dtype.itemsize
        return bytes_cost((r1 - r0) * node.outputs[0].shape[-1] * itemsize)

    def reference(self, node, coords, tensor_of):
        from mkcompiler.ops.elementwise import expr_torch

        r0, r1 = self.row_range(node, coords)
        *xs, w, b = node.inputs
        c = xs[0].shape[-1]
        # x as the norm would load it: the stored x, or the expression rounded to x's dtype
        xs = expr_torch(self.expr(node), [tensor_of(v).reshape(-1, c)[r0:r1] for v in xs]).double()
        if node.attrs["rms"]:
            y = xs * torch.rsqrt((xs * xs).mean(-1, keepdim=True) + node.attrs["eps"])
        else:
            y = torch.nn.functional.layer_norm(xs, (c,), eps=node.attrs["eps"])
        if w is not None:
            y = y * tensor_of(w).double()
        if b is not None:
            y = y + tensor_of(b).double()
        tensor_of(node.outputs[0]).view(-1, c)[r0:r1] = y.to(node.outputs[0].dtype)


def _emit_fused(key, name: str) -> tuple[str, str]:
    """The tile routine of a fused norm: norm_rows with each load of x replaced by the
    expression over its inputs (loaded at the same row/column indices; lanes outside the row
    read as 0). Constants of the key (dtypes, tile, flags, eps) are written in."""
    from mkcompiler.ops.elementwise import expr_source

    _, (expr, in_dtypes), wdt, bdt, ydt, rms, eps, (br, bc), flat = key
    k = len(in_dtypes)
    assert k >= 1 and expr[0] != "const", "a fused norm computes x from at least one input"
    if expr[0] == "op":
        lines, result = expr_source(expr, k)
    else:  # a bare input
        lines, result = [], f"x{expr[1]}"
    load_x = [
        f"x{i} = load_view(addrs_ptr, views_ptr, v{i}, lin, mask, {tl_dtype(dt)}, {flat[i]})"
        for i, dt in enumerate(in_dtypes)
    ]
    load_x += lines + [f"x = tl.where(mask, {result}, 0.0)"]
    fw, fb, fy = flat[k:]
    # Rows of inputs flagged 2 start 16-byte aligned: C is a multiple of each one's vector width.
    vec = max([16 // dt.itemsize for dt, f in zip(in_dtypes, flat) if f == 2], default=1)

    def sweep(body):
        return [
            f"    for c0 in range(0, C, {bc}):",
            f"        cols = c0 + tl.arange(0, {bc})",
            "        col_ok = cols < C",
            "        mask = row_ok[:, None] & col_ok[None, :]",
            "        lin = rows[:, None] * C + cols[None, :]",
            *(f"        {line}" for line in load_x + body),
        ]

    src = [
        "@triton.jit",
        f"def {name}(row_ptr, addrs_ptr, views_ptr):",
        *(f"    v{i} = arg(row_ptr, {i})" for i in range(k)),
        f"    vw = arg(row_ptr, {k})",
        f"    vb = arg(row_ptr, {k + 1})",
        f"    vy = arg(row_ptr, {k + 2})",
        "    C = view_size(views_ptr, v0, 3)",
    ]
    if vec > 1:
        src.append(f"    C = aligned_stride(C, {vec})")
    src += [
        "    R = view_numel(views_ptr, v0) // C",
        f"    rows = arg(row_ptr, {k + 3}) * {br} + tl.arange(0, {br})",
        "    row_ok = rows < R",
    ]
    if not rms:
        src += [f"    mean = tl.zeros([{br}], tl.float32)"]
        src += sweep(["mean += tl.sum(x, axis=1)"])
        src += ["    mean = mean / C"]
        centred = ["d = tl.where(mask, x - mean[:, None], 0.0)"]
        y = "y = (x - mean[:, None]) * rstd[:, None]"
    else:  # x - 0.0 as norm_rows computes it: the same values
        centred = ["d = x"]
        y = "y = x * rstd[:, None]"
    src += [f"    var = tl.zeros([{br}], tl.float32)"]
    src += sweep(centred + ["var += tl.sum(d * d, axis=1)"])
    src += [f"    rstd = 1.0 / tl.sqrt(var / C + {eps!r})"]
    last = [y]
    if wdt is not None:
        last.append(f"y = y * load_view(addrs_ptr, views_ptr, vw, cols, col_ok, {tl_dtype(wdt)}, {fw})[None, :]")
    if bdt is not None:
        last.append(f"y = y + load_view(addrs_ptr, views_ptr, vb, cols, col_ok, {tl_dtype(bdt)}, {fb})[None, :]")
    last.append(f"store_view(addrs_ptr, views_ptr, vy, lin, mask, y, {tl_dtype(ydt)}, {fy})")
    src += sweep(last)
    return "\n".join(src) + "\n", f"{name}({{row}}, {{addrs}}, {{views}})"
