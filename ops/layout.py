"""Layout ops: new views of the same buffer, no kernels. A copy (an elementwise identity)
is made only where strides cannot express the result (reshape of a permuted tensor) or
where the op builds a new tensor (cat: each piece is written into its slice; the fuse pass
then lets the piece's producer write there directly)."""

from __future__ import annotations

import torch
from mkcompiler.ops.registry import lowers

aten = torch.ops.aten


@lowers(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def lower_view(ctx, node, x, shape):
    v = x.reshape(tuple(shape))
    return v if v is not None else ctx.copy(x).reshape(tuple(shape))


@lowers(aten.permute.default)
def lower_permute(ctx, node, x, dims):
    return x.permute(dims)


@lowers(aten.transpose.int)
def lower_transpose(ctx, node, x, d0, d1):
    dims = list(range(x.rank))
    dims[d0 % x.rank], dims[d1 % x.rank] = dims[d1 % x.rank], dims[d0 % x.rank]
    return x.permute(dims)


@lowers(aten.t.default)
def lower_t(ctx, node, x):
    return x.permute((1, 0)) if x.rank == 2 else x


@lowers(aten.slice.Tensor)
def lower_slice(ctx, node, x, dim=0, start=None, end=None, step=1):
    return x.slice(dim, 0 if start is None else start, x.shape[dim] if end is None else end, step)


@lowers(aten.select.int)
def lower_select(ctx, node, x, dim, index):
    return x.select(dim, index)


@lowers(aten.unsqueeze.default)
def lower_unsqueeze(ctx, node, x, dim):
    return x.unsqueeze(dim)


@lowers(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def lower_squeeze(ctx, node, x, dims=None):
    return x.reshape(tuple(node.meta["val"].shape))


@lowers(aten.expand.default)
def lower_expand(ctx, node, x, shape, implicit=False):
    shape = [x.shape[i - (len(shape) - x.rank)] if s == -1 else s for i, s in enumerate(shape)]
    return x.expand(tuple(shape))


@lowers(aten.alias.default, aten.contiguous.default, aten.lift_fresh_copy.default, aten.detach.default)
def lower_alias(ctx, node, x, *args, **kwargs):
    return x  # values are immutable once written: an alias is the same view


@lowers(aten.cat.default)
def lower_cat(ctx, node, tensors, dim=0):
    out = ctx.new_output(node)
    dim %= out.rank
    start = 0
    for t in tensors:
        if t.numel == 0:
            continue
        n = t.shape[dim]
        ctx.copy_into(t, out.slice(dim, start, start + n), node)
        start += n
    return out


@lowers(aten.split_with_sizes.default)
def lower_split_with_sizes(ctx, node, x, sizes, dim=0):
    out, start = [], 0
    for n in sizes:
        out.append(x.slice(dim, start, start + n))
        start += n
    return tuple(out)


@lowers(aten.split.Tensor)
def lower_split(ctx, node, x, size, dim=0):
    total = x.shape[dim % x.rank]
    return tuple(x.slice(dim, s, min(s + size, total)) for s in range(0, total, size))


@lowers(aten.unbind.int)
def lower_unbind(ctx, node, x, dim=0):
    return tuple(x.select(dim, i) for i in range(x.shape[dim % x.rank]))


@lowers(aten.stack.default)
def lower_stack(ctx, node, tensors, dim=0):
    out = ctx.new_output(node)
    dim %= out.rank
    for i, t in enumerate(tensors):
        ctx.copy_into(t, out.select(dim, i), node)
    return out
