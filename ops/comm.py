"""Communication between the ranks of a tensor-parallel group: all_reduce and all_gather.

The ops are torch custom ops, `mkcompiler::all_reduce(Tensor x, int world) -> Tensor` and
`mkcompiler::all_gather(Tensor x, int dim, int world) -> Tensor`, which mkcompiler.tp puts
after row-parallel and vocab-parallel Linears. torch.export records them as single nodes (their
fake implementations give the shapes); here they lower to the op families below.

Every rank runs the same program, so a buffer has the same id on every rank: a tile reads the
SAME view on a peer rank (`peer_tensor_of(rank, view)` in the reference VM; a peer address
table on the GPU). all_reduce tiles are element blocks of the output: each reads its block
from every rank and sums in rank order 0..world-1 (fp32), so every rank holds the same bits.
all_gather tiles are (source rank, element block): the block of rank k's input goes into slice
k of the output along `dim`. passes/ranks.py makes each tile wait, on every rank it reads, for
the tiles producing what it reads there (the same tasks as its local predecessors).

GPU: not implemented yet. `emit` raises NotImplementedError, so compiling a tensor-parallel
graph into a kernel fails clearly; the reference VM (mkcompiler.tp) runs it on the CPU.

Eager (outside mkcompiler): with a torch.distributed process group of `world` ranks the ops run
the real collective (e.g. gloo on CPUs under torchrun); without one they raise, never
returning a silently wrong local value.
"""

from __future__ import annotations

import torch
from mkcompiler.ops.base import BYTES_PER_NS, TILE_OVERHEAD_NS, OpFamily, cdiv, linear_access
from mkcompiler.ops.elementwise import FLOAT_DTYPES
from mkcompiler.ops.registry import family, lowers

PEER_BYTES_PER_NS = 4.0  # NVLink bytes/ns per SM (H100: ~450 GB/s a direction over 132 SMs), cost model only
DEFAULT_BLOCK = 1024  # elements per tile when passes/ranks.choose_comm_tiles has not chosen


def _process_group_size() -> int | None:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else None


def _no_group(name: str, world: int):
    return RuntimeError(
        f"mkcompiler::{name} ran eagerly without a torch.distributed process group of {world} ranks "
        f"(found {_process_group_size()}). A tensor-parallel shard computes its rank's part only: run it "
        "under torchrun with an initialised process group, or simulate every rank with mkcompiler.tp.run_tp."
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
    ctx.emit(node, "all_reduce", (x,), (out,), world=world)
    return out


@lowers(torch.ops.mkcompiler.all_gather.default)
def lower_all_gather(ctx, node, x, dim, world):
    _check(ctx, node, x, world, "all_gather")
    if x.rank == 0:
        ctx.unsupported(node, "all_gather of a 0-d tensor")
    out = ctx.new_output(node)
    ctx.emit(node, "all_gather", (x,), (out,), world=world, dim=dim % x.rank)
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

    def blocks(self, node) -> list[tuple[int, int]]:
        """(first block, number of blocks) per tile, over the input's elements."""
        block = node.attrs.get("block", DEFAULT_BLOCK)
        per = node.attrs.get("blocks_per_tile", 1)
        n = cdiv(max(node.inputs[0].numel, 1), block)
        return [(b, min(per, n - b)) for b in range(0, n, per)]

    def span(self, node, first: int, count: int) -> tuple[int, int]:
        block = node.attrs.get("block", DEFAULT_BLOCK)
        return first * block, min((first + count) * block, node.inputs[0].numel)

    def key(self, node):
        x, out = node.inputs[0], node.outputs[0]
        return (self.kind, x.dtype, out.dtype, node.attrs["world"], node.attrs.get("dim"), node.attrs.get("block"))

    def emit(self, key, name):
        raise NotImplementedError(
            f"{key[0]}: communication tiles need the multi-GPU runtime (peer buffers from PyTorch symmetric "
            "memory, an address table per rank, system-scope release/acquire flags), which is not implemented "
            "yet. Tensor-parallel graphs run in the reference VM only: mkcompiler.tp.run_tp / compile_tp."
        )


@family
class AllReduce(_Comm):
    kind = "all_reduce"

    def tiles(self, node):
        return self.blocks(node)

    def peer_ranks(self, node, coords):
        return list(range(node.attrs["world"]))

    def regions(self, node, coords):
        lo, hi = self.span(node, *coords)
        return [linear_access(node.inputs[0], lo, hi)], [linear_access(node.outputs[0], lo, hi)]

    def cost(self, node, coords):
        lo, hi = self.span(node, *coords)
        x, out = node.inputs[0], node.outputs[0]
        peer = (hi - lo) * x.dtype.itemsize * (node.attrs["world"] - 1)
        local = (hi - lo) * (x.dtype.itemsize + out.dtype.itemsize)
        return TILE_OVERHEAD_NS + local / BYTES_PER_NS + peer / PEER_BYTES_PER_NS

    def describe(self, node, coords):
        lo, hi = self.span(node, *coords)
        return f"{node.name}[{lo}:{hi}] sum of {node.attrs['world']} ranks"

    def reference(self, node, coords, tensor_of, peer_tensor_of=None):
        if peer_tensor_of is None:
            raise NotImplementedError("all_reduce reads every rank's input: run it with mkcompiler.vm.run_ranks")
        lo, hi = self.span(node, *coords)
        x = node.inputs[0]
        acc = None
        for k in range(node.attrs["world"]):  # rank order: every rank adds in the same order
            part = peer_tensor_of(k, x).reshape(-1)[lo:hi].float()
            acc = part if acc is None else acc + part
        _store_linear(tensor_of(node.outputs[0]), lo, hi, acc)


@family
class AllGather(_Comm):
    kind = "all_gather"

    def tiles(self, node):
        return [(k, b, n) for k in range(node.attrs["world"]) for b, n in self.blocks(node)]

    def peer_ranks(self, node, coords):
        return [coords[0]]

    def part(self, node, k: int):
        """Slice k of the output: where rank k's input goes."""
        dim, size = node.attrs["dim"], node.inputs[0].shape[node.attrs["dim"]]
        return node.outputs[0].slice(dim, k * size, (k + 1) * size)

    def regions(self, node, coords):
        k, first, count = coords
        lo, hi = self.span(node, first, count)
        return [linear_access(node.inputs[0], lo, hi)], [linear_access(self.part(node, k), lo, hi)]

    def cost(self, node, coords):
        k, first, count = coords
        lo, hi = self.span(node, first, count)
        x = node.inputs[0]
        return TILE_OVERHEAD_NS + (hi - lo) * x.dtype.itemsize * (1 / PEER_BYTES_PER_NS + 1 / BYTES_PER_NS)

    def describe(self, node, coords):
        k, first, count = coords
        lo, hi = self.span(node, first, count)
        return f"{node.name}[rank {k}: {lo}:{hi}]"

    def reference(self, node, coords, tensor_of, peer_tensor_of=None):
        if peer_tensor_of is None:
            raise NotImplementedError("all_gather reads every rank's input: run it with mkcompiler.vm.run_ranks")
        k, first, count = coords
        lo, hi = self.span(node, first, count)
        src = peer_tensor_of(k, node.inputs[0]).reshape(-1)[lo:hi]
        _store_linear(tensor_of(self.part(node, k)), lo, hi, src)
