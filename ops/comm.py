"""Communication between the ranks of a tensor-parallel group: all_reduce, all_gather, all_to_all.

The ops are torch custom ops, `mkcompiler::all_reduce(Tensor x, int world) -> Tensor`,
`mkcompiler::all_gather(Tensor x, int dim, int world) -> Tensor` and
`mkcompiler::all_to_all(Tensor x, int world) -> Tensor`, which mkcompiler.tp.plan puts after
row-parallel and vocab-parallel Linears and around exchanged ones (tp.ExchangeParallel).
torch.export records them as single nodes (their fake implementations give the shapes); here
they lower to the op families below.

Every rank runs the same program, so a buffer has the same id on every rank: a tile reads the
SAME view on a peer rank (`peer_tensor_of(rank, view)` in the reference VM; a peer address
table on the GPU). all_reduce tiles are element blocks of the output: each reads its block
from every rank and sums in rank order 0..world-1 (fp32), so every rank holds the same bits.
all_gather tiles are (source rank, element block): the block of rank k's input goes into slice
k of the output along `dim`. all_to_all tiles are all_gather's, reading rank k's row block r
(r: the reading rank, known to the tile at run time, so that every rank runs the same program)
into column block k. passes/ranks.py makes each tile wait, on every rank it reads, for the tiles
producing what it reads there (the same tasks as its local predecessors).

GPU (and the interpreter): the tile routines below read a peer's buffer through the rank's
table of peer addresses (the kernel's `tp_ptr`, layout.TPField: buffer b of rank k at
PEER_ADDRS + k * N_BUFFERS + b; symmetric memory on GPUs, mkcompiler/tp/runtime.py), with
the same view ids as locally. Their remote waits are in the dispatcher (kernel_tp.wait_all_tp).

Eager (outside mkcompiler): with a torch.distributed process group of `world` ranks the ops run
the real collective (e.g. gloo on CPUs under torchrun); without one they raise, never
returning a silently wrong local value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from mkcompiler.ops.base import (
    Access,
    OpFamily,
    Work,
    cdiv,
    flat_flags,
    linear_access,
    merge_intervals,
    next_pow2,
    tl_dtype,
)
from mkcompiler.ops.common import ARG0, arg, load_view_through, store_view, view_numel
from mkcompiler.ops.elementwise import FLOAT_DTYPES
from mkcompiler.ops.registry import family, lowers

from mkcompiler.ir.layout import MAX_WORLD, NUM_ARGS, TPField

DEFAULT_BLOCK = 1024  # elements per tile when passes/ranks.choose_comm_tiles has not chosen


@dataclass
class CommAttrs:
    world: int  # ranks of the group
    dim: int | None = None  # all_gather, all_to_all: the dim the ranks' parts are placed along
    block: int = DEFAULT_BLOCK  # elements per block (passes/ranks.choose_comm_tiles)
    blocks_per_tile: int = 1


class CommKey(NamedTuple):
    kind: str
    x: torch.dtype
    out: torch.dtype
    world: int
    dim: int | None
    block: int
    flat: tuple[int, int]  # _Comm.flat


def _process_group_size() -> int | None:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else None


def _no_group(name: str, world: int):
    return RuntimeError(
        f"mkcompiler::{name} ran eagerly without a torch.distributed process group of {world} ranks "
        f"(found {_process_group_size()}). A tensor-parallel shard computes its rank's part only: run it "
        "under torchrun with an initialised process group, or simulate every rank with mkcompiler.tp.plan.run_tp."
    )


@torch.library.custom_op("mkcompiler::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, world: int) -> torch.Tensor:
    """Sum of x over the `world` ranks of the tensor-parallel group (every rank gets the sum)."""
    if _process_group_size() != world:
        raise _no_group("all_reduce", world)
    import torch.distributed as dist

    y = x.clone()
    dist.all_reduce(y)
    return y


@all_reduce.register_fake
def _all_reduce_fake(x, world):
    return torch.empty_like(x)


@torch.library.custom_op("mkcompiler::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, dim: int, world: int) -> torch.Tensor:
    """The ranks' x concatenated along `dim` in rank order (every rank gets all of it)."""
    if _process_group_size() != world:
        raise _no_group("all_gather", world)
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim)


@all_gather.register_fake
def _all_gather_fake(x, dim, world):
    shape = list(x.shape)
    shape[dim] *= world
    return x.new_empty(shape)


@torch.library.custom_op("mkcompiler::all_to_all", mutates_args=())
def all_to_all(x: torch.Tensor, world: int) -> torch.Tensor:
    """x [R, F] on every rank -> [R / world, world * F] on rank r: row block r of every rank's x,
    side by side in rank order (the ranks exchange row blocks: rows sharded, columns gathered)."""
    if _process_group_size() != world:
        raise _no_group("all_to_all", world)
    import torch.distributed as dist

    out = torch.empty_like(x)  # [world x R / world, F]: block k from rank k
    dist.all_to_all_single(out, x.contiguous())
    rows, f = x.shape[0] // world, x.shape[1]
    return out.view(world, rows, f).permute(1, 0, 2).reshape(rows, world * f)


@all_to_all.register_fake
def _all_to_all_fake(x, world):
    return x.new_empty(x.shape[0] // world, world * x.shape[1])


# ---- lowering ----


def _check(ctx, node, x, world, name):
    if x.dtype not in FLOAT_DTYPES:
        ctx.unsupported(node, f"{name} of {x.dtype} (floating point only)")
    if not isinstance(world, int) or world < 1:
        ctx.unsupported(node, f"{name} over {world!r} ranks")


@lowers(torch.ops.mkcompiler.all_reduce.default)
def lower_all_reduce(ctx, node, x, world):
    _check(ctx, node, x, world, "all_reduce")
    out = ctx.new_output(node)
    ctx.emit(node, "all_reduce", (x,), (out,), CommAttrs(world))
    return out


@lowers(torch.ops.mkcompiler.all_gather.default)
def lower_all_gather(ctx, node, x, dim, world):
    _check(ctx, node, x, world, "all_gather")
    if x.rank == 0:
        ctx.unsupported(node, "all_gather of a 0-d tensor")
    out = ctx.new_output(node)
    ctx.emit(node, "all_gather", (x,), (out,), CommAttrs(world, dim=dim % x.rank))
    return out


@lowers(torch.ops.mkcompiler.all_to_all.default)
def lower_all_to_all(ctx, node, x, world):
    _check(ctx, node, x, world, "all_to_all")
    if x.rank != 2 or x.shape[0] % world:
        ctx.unsupported(node, f"all_to_all of a {list(x.shape)} tensor over {world} ranks (2-D, rows divisible)")
    if not x.is_contiguous():  # a tile finds its row block at the rank's offset in x's elements
        x = ctx.copy(x)
    out = ctx.new_output(node)
    ctx.emit(node, "all_to_all", (x,), (out,), CommAttrs(world, dim=1))
    return out


# ---- families ----


def _store_linear(dst: torch.Tensor, lo: int, hi: int, values: torch.Tensor) -> None:
    """dst (any strides) elements [lo, hi) in row-major order = values."""
    if dst.dim() == 0:
        dst.fill_(values.reshape(()).item())
        return
    idx = torch.unravel_index(torch.arange(lo, hi), dst.shape)
    dst[idx] = values.to(dst.dtype)


class _Comm(OpFamily):
    peer_access = True
    ROUTINE_FLAGS = ""  # constexpr arguments after the routine's common ones (AllToAll's OWN_ROWS)

    def elements(self, node) -> int:
        """Elements of the input one rank sends (all of it; AllToAll: one row block)."""
        return node.inputs[0].numel

    def blocks(self, node) -> list[tuple[int, int]]:
        """(first block, number of blocks) per tile, over the elements a rank sends."""
        block, per = node.attrs.block, node.attrs.blocks_per_tile
        n = cdiv(max(self.elements(node), 1), block)
        return [(b, min(per, n - b)) for b in range(0, n, per)]

    def span(self, node, first: int, count: int) -> tuple[int, int]:
        block = node.attrs.block
        return first * block, min((first + count) * block, self.elements(node))

    def key(self, node):
        x, out = node.inputs[0], node.outputs[0]
        world = node.attrs.world
        if world > MAX_WORLD:
            raise NotImplementedError(f"{node.name}: {world} ranks (at most {MAX_WORLD} in a kernel)")
        return CommKey(self.kind, x.dtype, out.dtype, world, node.attrs.dim, node.attrs.block, self.flat(node))

    def flat(self, node) -> tuple[int, int]:
        """ops/common.offsets_of flags of the input and of what the tile writes."""
        return flat_flags(node.inputs[0], node.outputs[0])

    def emit(self, key, name):
        x_flat, out_flat = key.flat
        call = (
            f"{self.routines[0]}({{row}}, {{addrs}}, {{views}}, tp_ptr, {key.world}, {tl_dtype(key.x)}, "
            f"{tl_dtype(key.out)}, {key.block}, {next_pow2(key.block)}, {x_flat}, {out_flat}{self.ROUTINE_FLAGS})"
        )
        return "", call


@family
class AllReduce(_Comm):
    kind = "all_reduce"
    routines = ("all_reduce_tile",)

    def tiles(self, node):
        return self.blocks(node)

    def peer_ranks(self, node, coords):
        return list(range(node.attrs.world))

    def regions(self, node, coords):
        lo, hi = self.span(node, *coords)
        return [linear_access(node.inputs[0], lo, hi)], [linear_access(node.outputs[0], lo, hi)]

    def work(self, node, coords):
        """Its own input span in and the sum out locally; every other rank's span over the link."""
        lo, hi = self.span(node, *coords)
        x, out = node.inputs[0], node.outputs[0]
        peer = (hi - lo) * x.dtype.itemsize * (node.attrs.world - 1)
        return Work(float((hi - lo) * (x.dtype.itemsize + out.dtype.itemsize)), peer_bytes=float(peer))

    def describe(self, node, coords):
        lo, hi = self.span(node, *coords)
        return f"{node.name}[{lo}:{hi}] sum of {node.attrs.world} ranks"

    def reference(self, node, coords, tensor_of, peer_tensor_of=None, rank=None):
        if peer_tensor_of is None:
            raise NotImplementedError("all_reduce reads every rank's input: run it with mkcompiler.vm.run_ranks")
        lo, hi = self.span(node, *coords)
        x = node.inputs[0]
        acc = None
        for k in range(node.attrs.world):  # rank order: every rank adds in the same order
            part = peer_tensor_of(k, x).reshape(-1)[lo:hi].float()
            acc = part if acc is None else acc + part
        _store_linear(tensor_of(node.outputs[0]), lo, hi, acc)


@family
class AllGather(_Comm):
    kind = "all_gather"
    routines = ("all_gather_tile",)

    def tiles(self, node):
        return [(k, b, n) for k in range(node.attrs.world) for b, n in self.blocks(node)]

    def instruction_tail(self, node):
        """Every rank's slice of the output (the tile picks slice k: arg GATHER_PARTS + k)."""
        assert 5 + node.attrs.world <= NUM_ARGS, node.attrs.world
        return [self.part(node, k) for k in range(node.attrs.world)]

    def flat(self, node):
        parts = flat_flags(*(self.part(node, k) for k in range(node.attrs.world)))
        return flat_flags(node.inputs[0])[0], min(parts)  # one routine writes every slice

    def peer_ranks(self, node, coords):
        return [coords[0]]

    def part(self, node, k: int):
        """Slice k of the output: where rank k's input goes."""
        dim = node.attrs.dim
        size = node.inputs[0].shape[dim]
        return node.outputs[0].slice(dim, k * size, (k + 1) * size)

    def regions(self, node, coords):
        k, first, count = coords
        lo, hi = self.span(node, first, count)
        return [linear_access(node.inputs[0], lo, hi)], [linear_access(self.part(node, k), lo, hi)]

    def work(self, node, coords):
        """Rank k's span over the link, written into its slice locally."""
        k, first, count = coords
        lo, hi = self.span(node, first, count)
        nbytes = float((hi - lo) * node.inputs[0].dtype.itemsize)
        return Work(nbytes, peer_bytes=nbytes)

    def describe(self, node, coords):
        k, first, count = coords
        lo, hi = self.span(node, first, count)
        return f"{node.name}[rank {k}: {lo}:{hi}]"

    def reference(self, node, coords, tensor_of, peer_tensor_of=None, rank=None):
        if peer_tensor_of is None:
            raise NotImplementedError("all_gather reads every rank's input: run it with mkcompiler.vm.run_ranks")
        k, first, count = coords
        lo, hi = self.span(node, first, count)
        src = peer_tensor_of(k, node.inputs[0]).reshape(-1)[lo:hi]
        _store_linear(tensor_of(self.part(node, k)), lo, hi, src)


@family
class AllToAll(AllGather):
    """all_gather's tiles and output slices, over one row block of x: rank k's row block r."""

    kind = "all_to_all"
    routines = ("all_gather_tile",)
    ROUTINE_FLAGS = ", True"  # all_gather_tile's OWN_ROWS

    def elements(self, node) -> int:
        """One row block of x (what each rank sends each rank)."""
        return node.inputs[0].numel // node.attrs.world

    def part(self, node, k: int):
        f = node.inputs[0].shape[1]
        return node.outputs[0].slice(1, k * f, (k + 1) * f)

    def regions(self, node, coords):
        # Which row block a tile reads depends on the rank running it (rank r: block r), and the
        # queue is every rank's: the same span of every row block. The tile then waits only for
        # the tiles writing those rows (e.g. their attention row blocks), not for all of x.
        k, first, count = coords
        lo, hi = self.span(node, first, count)
        x, e = node.inputs[0], self.elements(node)
        pairs = [p for r in range(node.attrs.world) for p in linear_access(x, r * e + lo, r * e + hi).intervals]
        return [Access(x.buffer, merge_intervals(pairs))], [linear_access(self.part(node, k), lo, hi)]

    def describe(self, node, coords):
        k, first, count = coords
        lo, hi = self.span(node, first, count)
        return f"{node.name}[rank {k}'s rows for this rank: {lo}:{hi}]"

    def reference(self, node, coords, tensor_of, peer_tensor_of=None, rank=None):
        if peer_tensor_of is None or rank is None:
            raise NotImplementedError("all_to_all reads every rank's input: run it with mkcompiler.vm.run_ranks")
        k, first, count = coords
        lo, hi = self.span(node, first, count)
        at = rank * self.elements(node)
        src = peer_tensor_of(k, node.inputs[0]).reshape(-1)[at + lo : at + hi]
        _store_linear(tensor_of(self.part(node, k)), lo, hi, src)


# ---- tile routines (instruction args: x view, out view, tile coordinates, [AllGather: slices]) ----

TP_N_BUFFERS: tl.constexpr = tl.constexpr(int(TPField.N_BUFFERS))
TP_PEER_ADDRS: tl.constexpr = tl.constexpr(int(TPField.PEER_ADDRS))
TP_RANK: tl.constexpr = tl.constexpr(int(TPField.RANK))
GATHER_PARTS: tl.constexpr = tl.constexpr(5)  # AllGather: arg of rank 0's output slice


@triton.jit
def peer_addrs(tp_ptr, k):
    """Rank k's address table (layout.TPField: a [world, n_buffers] table of buffer addresses)."""
    return tp_ptr + TP_PEER_ADDRS + k * tl.load(tp_ptr + TP_N_BUFFERS)


@triton.jit
def all_reduce_tile(
    row_ptr,
    addrs_ptr,
    views_ptr,
    tp_ptr,
    WORLD: tl.constexpr,
    X_DT: tl.constexpr,
    OUT_DT: tl.constexpr,
    BLOCK: tl.constexpr,
    P2: tl.constexpr,
    X_FLAT: tl.constexpr,
    OUT_FLAT: tl.constexpr,
):
    """Blocks [first, first + count) of x summed over the ranks in rank order (fp32), as the
    reference does: every rank computes the same bits."""
    x_v = arg(row_ptr, 0)
    out_v = arg(row_ptr, 1)
    first = arg(row_ptr, 2)
    n = view_numel(views_ptr, x_v)
    for blk in range(first, first + arg(row_ptr, 3)):
        offs = tl.arange(0, P2)
        lin = blk * BLOCK + offs
        mask = (offs < BLOCK) & (lin < n)
        acc = tl.zeros([P2], tl.float32)
        for k in tl.static_range(WORLD):
            acc += load_view_through(peer_addrs(tp_ptr, k), views_ptr, x_v, lin, mask, X_DT, X_FLAT)
        store_view(addrs_ptr, views_ptr, out_v, lin, mask, acc, OUT_DT, OUT_FLAT)


@triton.jit
def all_gather_tile(
    row_ptr,
    addrs_ptr,
    views_ptr,
    tp_ptr,
    WORLD: tl.constexpr,
    X_DT: tl.constexpr,
    OUT_DT: tl.constexpr,
    BLOCK: tl.constexpr,
    P2: tl.constexpr,
    X_FLAT: tl.constexpr,
    OUT_FLAT: tl.constexpr,
    OWN_ROWS: tl.constexpr = False,
):
    """Blocks [first, first + count) of rank k's x into slice k of the output. OWN_ROWS (the
    all_to_all): of rank k's row block r, r this rank (x contiguous: the block starts at element
    r x x's elements / WORLD)."""
    x_v = arg(row_ptr, 0)
    k = arg(row_ptr, 2)
    first = arg(row_ptr, 3)
    part_v = tl.load(row_ptr[0] + ARG0 + GATHER_PARTS + k)  # row_ptr: (pointer, preloaded args)
    n = view_numel(views_ptr, x_v)
    at = 0
    if OWN_ROWS:
        n = n // WORLD
        at = tl.load(tp_ptr + TP_RANK) * n
    peer = peer_addrs(tp_ptr, k)
    for blk in range(first, first + arg(row_ptr, 4)):
        offs = tl.arange(0, P2)
        lin = blk * BLOCK + offs
        mask = (offs < BLOCK) & (lin < n)
        values = load_view_through(peer, views_ptr, x_v, at + lin, mask, X_DT, X_FLAT)
        store_view(addrs_ptr, views_ptr, part_v, lin, mask, values, OUT_DT, OUT_FLAT)
