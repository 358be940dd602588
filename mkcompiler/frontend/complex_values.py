"""Complex tensors at capture: lowered into real arithmetic on their components.

Kernels load and store real dtypes only. A complex value is carried as its two real components
(`Complex`: re and im, each a view of the value's shape): view_as_complex selects them from the
pair dim, a complex parameter is read in place through view_as_real, layout ops act on both, and
arithmetic is written out per component ((a + bi)(c + di) = (ac - bd) + (ad + bc)i: ordinary
elementwise ops). view_as_real puts them side by side again, free when they already are, else as
the two pieces of a stack along a new last dim: Llama-2's `view_as_real(view_as_complex(x) *
freqs_cis)` becomes the interleaved RoPE written out, which passes/canon_rope.py compiles like the
other RoPE spellings. What has no real form here (a complex model output, an op outside
COMPLEX_LOWERINGS) is refused with an UnsupportedOpError, as any op without a lowering is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mkcompiler.ir.graph import View

aten = torch.ops.aten


@dataclass(frozen=True)
class Complex:
    """A complex value as its two real components, each a view of the value's shape. Kept apart
    (rather than as one pair buffer) until view_as_real needs them side by side, so that each
    is an ordinary elementwise result the fuse pass can splice."""

    re: View
    im: View

    @staticmethod
    def of_pairs(x: View) -> Complex:
        """The complex value whose view_as_real is x (last dim of size 2)."""
        return Complex(x.select(-1, 0), x.select(-1, 1))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.re.shape

    @property
    def rank(self) -> int:
        return self.re.rank

    def map(self, f) -> Complex:
        """The same layout op applied to both components."""
        return Complex(f(self.re), f(self.im))


def involves_complex(fx_node, args, kwargs) -> bool:
    """Does the node read or make a complex value?"""
    val = fx_node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    if any(isinstance(v, torch.Tensor) and v.is_complex() for v in vals):
        return True
    leaves = [*args, *kwargs.values()]
    leaves += [x for a in leaves if isinstance(a, (list, tuple)) for x in a]
    return any(isinstance(a, Complex) for a in leaves)


def _dim(c: Complex, d: int) -> int:
    return d % max(c.rank, 1)


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.empty(0, dtype=dtype).real.dtype


def _as_real(ctx, fx_node, c: Complex) -> View:
    """view_as_real: the components side by side, in place when they already are (a complex
    input or parameter), else written into a new pair buffer (two pieces of a stack)."""
    re, im = c.re, c.im
    delta = im.offset - re.offset
    if (re.buffer, re.dtype, re.shape, re.strides) == (im.buffer, im.dtype, im.shape, im.strides) and delta > 0:
        pairs = View(re.buffer, re.dtype, (*re.shape, 2), (*re.strides, delta), re.offset)
        if Complex.of_pairs(pairs) == c:
            return pairs
    val = fx_node.meta["val"]
    out = ctx.graph.new_tensor(fx_node.name, tuple(val.shape), val.dtype)
    ctx.copy_into(re, out.select(-1, 0), fx_node)
    ctx.copy_into(im, out.select(-1, 1), fx_node)
    return out


def _mul(ctx, fx_node, a, b) -> Complex:
    if not isinstance(a, Complex):
        a, b = b, a
    e = ctx.elementwise
    if not isinstance(b, Complex):  # complex times real: both components scaled
        return Complex(e(None, "mul", a.re, b), e(None, "mul", a.im, b))
    re = e(None, "sub", e(None, "mul", a.re, b.re), e(None, "mul", a.im, b.im))
    im = e(None, "add", e(None, "mul", a.re, b.im), e(None, "mul", a.im, b.re))
    return Complex(re, im)


def _add_sub(name):
    def lower(ctx, fx_node, a, b, alpha=1):
        if alpha != 1 or not (isinstance(a, Complex) and isinstance(b, Complex)):
            ctx.unsupported(fx_node, f"{name} of a complex and a real value (or with alpha)")
        return Complex(ctx.elementwise(None, name, a.re, b.re), ctx.elementwise(None, name, a.im, b.im))

    return lower


def _polar(ctx, fx_node, magnitude: View, angle: View) -> Complex:
    e = ctx.elementwise
    return Complex(e(None, "mul", magnitude, e(None, "cos", angle)), e(None, "mul", magnitude, e(None, "sin", angle)))


def _view(ctx, fx_node, c: Complex, *args) -> Complex:
    shape = tuple(fx_node.meta["val"].shape)
    return c.map(lambda v: v.reshape(shape) or ctx.copy(v).reshape(shape))


def _permute(ctx, fx_node, c: Complex, dims) -> Complex:
    return c.map(lambda v: v.permute([_dim(c, d) for d in dims]))


def _transpose(ctx, fx_node, c: Complex, d0, d1) -> Complex:
    dims = list(range(c.rank))
    d0, d1 = _dim(c, d0), _dim(c, d1)
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return _permute(ctx, fx_node, c, dims)


def _slice(ctx, fx_node, c: Complex, dim=0, start=None, end=None, step=1) -> Complex:
    d = _dim(c, dim)
    return c.map(lambda v: v.slice(d, 0 if start is None else start, c.shape[d] if end is None else end, step))


def _select(ctx, fx_node, c: Complex, dim, index) -> Complex:
    return c.map(lambda v: v.select(_dim(c, dim), index))


def _unsqueeze(ctx, fx_node, c: Complex, dim) -> Complex:
    return c.map(lambda v: v.unsqueeze(dim % (c.rank + 1)))


def _expand(ctx, fx_node, c: Complex, shape, implicit=False) -> Complex:
    return c.map(lambda v: v.expand(tuple(fx_node.meta["val"].shape)))


def _same(ctx, fx_node, c: Complex, *args, **kwargs) -> Complex:
    val = fx_node.meta["val"]
    if not val.is_complex() or _real_dtype(val.dtype) != c.re.dtype:
        ctx.unsupported(fx_node, "a cast of a complex value")
    return c


COMPLEX_LOWERINGS = {
    aten.view_as_complex.default: lambda ctx, fx_node, x: Complex.of_pairs(x),
    aten.view_as_real.default: _as_real,
    aten.complex.default: lambda ctx, fx_node, re, im: Complex(
        re.expand(fx_node.meta["val"].shape), im.expand(fx_node.meta["val"].shape)
    ),
    aten.polar.default: _polar,
    aten.mul.Tensor: _mul,
    aten.add.Tensor: _add_sub("add"),
    aten.sub.Tensor: _add_sub("sub"),
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.reshape.default: _view,
    aten.squeeze.dim: _view,
    aten.squeeze.dims: _view,
    aten.squeeze.default: _view,
    aten.permute.default: _permute,
    aten.transpose.int: _transpose,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.unsqueeze.default: _unsqueeze,
    aten.expand.default: _expand,
    aten.alias.default: _same,
    aten.clone.default: _same,
    aten.contiguous.default: _same,
    aten._to_copy.default: _same,
}


def lower_complex(ctx, fx_node, args, kwargs):
    """Lower a node that reads or makes complex values (COMPLEX_LOWERINGS), or refuse it."""
    fn = COMPLEX_LOWERINGS.get(fx_node.target)
    if fn is None:
        ctx.unsupported(fx_node, f"the op {fx_node.target} on complex values")
    return fn(ctx, fx_node, *args, **kwargs)
