"""LayerNorm and RMSNorm over the last dim, as single row ops.

These cover `aten.native_layer_norm` (what nn.LayerNorm exports to) and `aten.rms_norm` (capture
keeps it whole on every target). A norm written by hand (pow, mean, add, rsqrt, mul; mean,
sub, var, sqrt, div) lowers through elementwise + reduce, and passes/canonicalize.py turns it
into this op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from mkcompiler.ops.base import row_access, row_flags, tl_dtype, whole
from mkcompiler.ops.common import arg, load_view, store_view
from mkcompiler.ops.reduce import RowAttrs, RowFamily, row_shape
from mkcompiler.ops.registry import family, lowers

aten = torch.ops.aten


@triton.jit
def norm_rstd(var, EPS: tl.constexpr):
    """A normalised row's scale 1 / sqrt(var + eps); var is the row's variance (RMSNorm: its
    mean square)."""
    return 1.0 / tl.sqrt(var + EPS)


@triton.jit
def norm_scale(s1, s2, n, EPS: tl.constexpr, RMS: tl.constexpr):
    """(mean, rstd) of rows from one pass's sums over n elements: s1 = sum x (LayerNorm only),
    s2 = sum x^2. LayerNorm's variance E[x^2] - mean^2 is clamped at 0 against rounding."""
    mean = s1 / n
    if RMS:
        rstd = norm_rstd(s2 / n, EPS)
    else:
        rstd = norm_rstd(tl.maximum(s2 / n - mean * mean, 0.0), EPS)
    return mean, rstd


def norm_reference(x: torch.Tensor, rms: bool, eps: float, weight=None, bias=None) -> torch.Tensor:
    """The norm of x's rows in float64 (weight and bias tensors or None): what norm_rows and a
    matmul's folded norm (ops/matmul.py, split-K tiles) compute."""
    xs = x.double()
    if rms:
        y = xs * torch.rsqrt((xs * xs).mean(-1, keepdim=True) + eps)
    else:
        y = torch.nn.functional.layer_norm(xs, (xs.shape[-1],), eps=eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


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
    rstd = norm_rstd(var / C, EPS)
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


@dataclass(kw_only=True)
class NormAttrs(RowAttrs):
    rms: bool  # RMSNorm, else LayerNorm
    eps: float


class NormKey(NamedTuple):
    kind: str
    x: torch.dtype
    weight: torch.dtype | None
    bias: torch.dtype | None
    y: torch.dtype
    rms: bool
    eps: float
    tile: tuple[int, int]
    flat: tuple[int, ...]  # row_flags of x, weight, bias, y


def _check_last_dim(ctx, node, x, normalized_shape):
    if len(normalized_shape) != 1:
        ctx.unsupported(node, f"normalization over {len(normalized_shape)} dims (only the last dim)")


@lowers(aten.native_layer_norm.default)
def lower_layer_norm(ctx, node, x, normalized_shape, weight, bias, eps):
    _check_last_dim(ctx, node, x, normalized_shape)
    out = ctx.new_output(node, index=0)
    ctx.emit(node, "norm", (ctx.row_input(x), weight, bias), (out,), NormAttrs(rms=False, eps=float(eps)))
    # mean and rstd (training-only outputs) are refused if anything reads them.
    return (out, ctx.refused(node, "the mean output of layer_norm"), ctx.refused(node, "the rstd output of layer_norm"))


@lowers(aten.layer_norm.default)
def lower_layer_norm_whole(ctx, node, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    _check_last_dim(ctx, node, x, normalized_shape)
    out = ctx.new_output(node)
    ctx.emit(node, "norm", (ctx.row_input(x), weight, bias), (out,), NormAttrs(rms=False, eps=float(eps)))
    return out


@lowers(aten.rms_norm.default)
def lower_rms_norm(ctx, node, x, normalized_shape, weight=None, eps=None):
    _check_last_dim(ctx, node, x, normalized_shape)
    if eps is None:
        eps = torch.finfo(node.meta["val"].dtype).eps
    out = ctx.new_output(node)
    ctx.emit(node, "norm", (ctx.row_input(x), weight, None), (out,), NormAttrs(rms=True, eps=float(eps)))
    return out


@lowers(aten._fused_rms_norm.default)
def lower_fused_rms_norm(ctx, node, x, normalized_shape, weight=None, eps=None):
    """What nn.RMSNorm exports to on CUDA: (output, rstd)."""
    _check_last_dim(ctx, node, x, normalized_shape)
    if eps is None:
        eps = torch.finfo(node.meta["val"][0].dtype).eps
    out = ctx.new_output(node, index=0)
    ctx.emit(node, "norm", (ctx.row_input(x), weight, None), (out,), NormAttrs(rms=True, eps=float(eps)))
    return (out, ctx.refused(node, "the rstd output of rms_norm"))


@family
class Norm(RowFamily):
    kind = "norm"
    routines = ("norm_rows",)

    def key(self, node):
        x, w, b = node.inputs
        y = node.outputs[0]
        return NormKey(
            self.kind,
            x.dtype,
            w.dtype if w is not None else None,
            b.dtype if b is not None else None,
            y.dtype,
            node.attrs.rms,
            node.attrs.eps,
            node.attrs.tile,
            row_flags(x, w, b, y),
        )

    def label(self, key):
        return f"{self.kind}_{'rms' if key.rms else 'layer'}"

    def emit(self, key, name):
        wdt, bdt = key.weight, key.bias
        w = tl_dtype(wdt) if wdt is not None else "tl.float32"
        b = tl_dtype(bdt) if bdt is not None else "tl.float32"
        br, bc = key.tile
        return "", (
            f"norm_rows({{row}}, {{addrs}}, {{views}}, {tl_dtype(key.x)}, {w}, {b}, {tl_dtype(key.y)}, "
            f"{wdt is not None}, {bdt is not None}, {key.rms}, {key.eps!r}, {br}, {bc}, "
            f"{', '.join(map(str, key.flat))})"
        )

    def regions(self, node, coords):
        r0, r1 = self.row_range(node, coords)
        x, w, b = node.inputs
        reads = [row_access(x, r0, r1)] + [whole(v) for v in (w, b) if v is not None]
        return reads, [row_access(node.outputs[0], r0, r1)]

    def reference(self, node, coords, tensor_of):
        r0, r1 = self.row_range(node, coords)
        x, w, b = node.inputs
        c = x.shape[-1]
        w, b = (tensor_of(v) if v is not None else None for v in (w, b))
        y = norm_reference(tensor_of(x).reshape(-1, c)[r0:r1], node.attrs.rms, node.attrs.eps, w, b)
        tensor_of(node.outputs[0]).view(-1, c)[r0:r1] = y.to(node.outputs[0].dtype)
