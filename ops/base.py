"""What every op family provides, and the region arithmetic tile dependencies are built on.

A family (one module in ops/) says how one of its ops:
  - tiles:      `tiles(node)` -> list of tile coordinates (tuples of ints),
  - is encoded: `view_args(node)` -> views whose ids lead the instruction args (coords follow),
  - touches memory: `regions(node, coords)` -> (reads, writes) as buffer intervals,
  - does work:  `work(node, coords)` -> Work(bytes, flops, peer_bytes) the tile moves and computes
                (default: the bytes of `regions`); profiles report it, and `cost(node, coords)`
                (estimated ns, for scheduling) is tile_ns of it for every family,
  - generates:  `key(node)` -> specialization key (one opcode per key: a NamedTuple whose first
                field `kind` is the family's) and `emit(key, name)`,
  - computes:   `reference(node, coords, tensor_of)` -> the tile in torch (the VM's spec).
A family's ops carry its own dataclass of attributes (OpNode.attrs, defined in its module: set at
capture, completed by passes); inputs whose meaning depends on the variant are named there too
(matmul.MatmulInputs, scatter.ScatterInputs).
Communication families (tensor parallelism, ops/comm.py) also read their peers' memory:
`peer_access` is True, `peer_ranks(node, coords)` lists the ranks a tile reads from, and
`reference` takes `peer_tensor_of(rank, view)` (the same view on another rank) as well.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from mkcompiler.ir.graph import OpNode, View

# Region of one buffer: sorted, disjoint half-open element intervals.
Intervals = tuple[tuple[int, int], ...]
# More than this collapses to one bounding interval (conservative). At least the rows of the
# tallest tile (256): a tile's output box is one interval per row, and a bounding interval would
# make every tile of the same rows wait for the tiles before it.
MAX_INTERVALS = 256

# Cost model (scheduling only): one tile runs on one SM, so rates are per SM. Measured on an
# H100/H200 (1B decode profile, 2026-11-27): weight-streaming tiles move ~18-31 GB/s per SM
# (HBM ~3-4 TB/s over 132 SMs) and every tile pays ~3.5 us of fetch, wait, setup, pipeline
# fill and release however small it is. (The old whole-GPU rates made a 256 KB matmul tile
# look as cheap as a 1 KB elementwise one, and the static lists unbalanced.)
BYTES_PER_NS = 24.0  # bytes/ns streamed by one SM
FLOPS_PER_NS = 3000.0  # dense bf16 flop/ns of one SM (~400 TFLOP/s over 132 SMs)
TILE_OVERHEAD_NS = 3500.0
PEER_BYTES_PER_NS = 4.0  # NVLink bytes/ns per SM (H100: ~450 GB/s a direction over 132 SMs)


class Work(NamedTuple):
    """What one tile does: bytes through its own GPU's memory, FLOPs (matmul and attention count
    theirs; others 0), and bytes read from other ranks' memory (communication tiles)."""

    bytes: float
    flops: float = 0.0
    peer_bytes: float = 0.0


def tile_ns(work: Work) -> float:
    """The cost model: fixed overhead, then the slower of streaming and computing (roofline),
    then the peer reads (a link of its own)."""
    local = max(work.bytes / BYTES_PER_NS, work.flops / FLOPS_PER_NS)
    return TILE_OVERHEAD_NS + local + work.peer_bytes / PEER_BYTES_PER_NS


@dataclass(frozen=True)
class Access:
    buffer: int
    intervals: Intervals


def merge_intervals(pairs) -> Intervals:
    pairs = sorted(pairs)
    out: list[list[int]] = []
    for lo, hi in pairs:
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    if len(out) > MAX_INTERVALS:
        return ((out[0][0], out[-1][1]),)
    return tuple((a, b) for a, b in out)


def offsets_intervals(offsets: np.ndarray) -> Intervals:
    """Exact intervals covering a set of element offsets."""
    if offsets.size == 0:
        return ()
    u = np.unique(offsets)
    breaks = np.nonzero(np.diff(u) != 1)[0]
    starts = np.concatenate([[u[0]], u[breaks + 1]])
    ends = np.concatenate([u[breaks], [u[-1]]]) + 1
    return merge_intervals(zip(starts.tolist(), ends.tolist()))


def runs_intervals(lo: np.ndarray, hi: np.ndarray) -> Intervals:
    """merge_intervals(zip(lo, hi)) for arrays of non-empty intervals, vectorized."""
    if lo.size == 0:
        return ()
    order = np.lexsort((hi, lo))
    lo, hi = lo[order], hi[order]
    reach = np.maximum.accumulate(hi)  # a new interval starts where lo passes everything before it
    breaks = np.nonzero(lo[1:] > reach[:-1])[0]
    if len(breaks) >= MAX_INTERVALS:
        return ((int(lo[0]), int(reach[-1])),)
    starts = np.concatenate([lo[:1], lo[breaks + 1]])
    ends = np.concatenate([reach[breaks], reach[-1:]])
    return tuple(zip(starts.tolist(), ends.tolist()))


def _is_contiguous(shape, strides) -> bool:
    """View.is_contiguous() on plain shape/strides (with an early exit)."""
    expected = 1
    for sz, st in zip(reversed(shape), reversed(strides)):
        if sz != 1 and st != expected:
            return False
        expected *= max(sz, 1)
    return True


def _coalesce(shape, strides) -> tuple[list[int], list[int]]:
    """View.coalesced() on plain shape/strides: drop size-1 dims, merge contiguous neighbours."""
    sizes: list[int] = []
    steps: list[int] = []
    for sz, st in zip(shape, strides):
        if sz == 1:
            continue
        if sizes and steps[-1] == st * sz:
            sizes[-1] *= sz
            steps[-1] = st
        else:
            sizes.append(sz)
            steps.append(st)
    if not sizes:
        return [1], [1]
    return sizes, steps


# Regions are memoized relative to the view's offset (the interval arithmetic below is the same
# for every offset): a model's layers repeat the same view shapes and tiles, so build_dag computes
# each tile shape's intervals once instead of once per layer. Bounded: per process, never stale
# (a pure function of its arguments).
REGION_MEMO = 1 << 14


def shifted(intervals: Intervals, offset: int) -> Intervals:
    """`intervals` moved by `offset` elements."""
    if not offset:
        return intervals
    return tuple((lo + offset, hi + offset) for lo, hi in intervals)


def box_access(view: View, box: tuple[tuple[int, int], ...]) -> Access:
    """Elements of `view` with index d in [box[d][0], box[d][1]) for every dim."""
    try:
        intervals = _box_intervals(view.shape, view.strides, box)
    except TypeError:  # a box of lists (unhashable)
        intervals = _box_intervals(view.shape, view.strides, tuple((lo, hi) for lo, hi in box))
    return Access(view.buffer, shifted(intervals, view.offset))


@functools.lru_cache(maxsize=REGION_MEMO)
def _box_intervals(shape, strides, box) -> Intervals:
    """box_access's intervals for a view at offset 0."""
    # Arithmetic of View.slice per dim, then View.coalesced (no intermediate View objects:
    # build_dag calls this for every tile).
    sizes = list(shape)
    offset = 0
    rank = len(sizes)
    for d, (lo, hi) in enumerate(box):
        d %= rank
        start, end, _ = slice(lo, hi).indices(sizes[d])
        offset += start * strides[d]
        sizes[d] = end - start if end > start else 0
    if 0 in sizes:
        return ()
    shape, steps = _coalesce(sizes, strides)
    # Innermost contiguous run stays one interval; enumerate the outer index space.
    if steps[-1] == 1:
        run = shape[-1]
        outer_shape, outer_steps = shape[:-1] or [1], steps[:-1] or [0]
    else:
        run, outer_shape, outer_steps = 1, shape, steps
    if math.prod(outer_shape) > 4 * MAX_INTERVALS:  # View.span of the coalesced view
        lo = offset + sum((sz - 1) * st for sz, st in zip(shape, steps) if st < 0)
        hi = offset + sum((sz - 1) * st for sz, st in zip(shape, steps) if st > 0)
        return ((lo, hi + 1),)
    if len(outer_shape) == 1 and outer_steps[0] > run:  # disjoint rows in increasing order
        n, st = outer_shape[0], outer_steps[0]
        if n > MAX_INTERVALS:
            return ((offset, offset + (n - 1) * st + run),)
        end = offset + n * st
        return tuple(zip(range(offset, end, st), range(offset + run, end + run, st)))
    starts = [offset]
    for sz, st in zip(outer_shape, outer_steps):
        starts = [s + i * st for s in starts for i in range(sz)]
    return merge_intervals((s, s + run) for s in starts)


def linear_access(view: View, start: int, end: int) -> Access:
    """Elements [start, end) of `view` in row-major order."""
    n = view.numel
    end = min(end, n)
    if _is_contiguous(view.shape, view.strides):
        return Access(view.buffer, ((view.offset + start, view.offset + end),))
    if start >= end:
        return Access(view.buffer, ())
    return Access(view.buffer, shifted(_linear_intervals(view.shape, view.strides, start, end), view.offset))


@functools.lru_cache(maxsize=REGION_MEMO)
def _linear_intervals(shape, strides, start: int, end: int) -> Intervals:
    """linear_access's intervals for a strided view at offset 0 (start < end)."""
    coalesced, steps = _coalesce(shape, strides)
    if start < 0 or steps[-1] != 1:  # element by element
        return offsets_intervals(_linear_offsets(0, shape, strides, start, end))
    # Rows of the coalesced view (its innermost dim is contiguous) instead of single elements.
    inner = coalesced[-1]
    r0, r1 = start // inner, -(-end // inner)
    lo = _linear_offsets(0, coalesced[:-1], steps[:-1], r0, r1)
    hi = lo + inner
    lo[0] += start - r0 * inner
    hi[-1] -= r1 * inner - end
    return runs_intervals(lo, hi)


def _linear_offsets(offset: int, shape, strides, start: int, end: int) -> np.ndarray:
    """Element offsets of linear indices [start, end) of a strided view, in order."""
    idx = np.arange(start, end, dtype=np.int64)
    off = np.full_like(idx, offset)
    for size, stride in zip(reversed(shape), reversed(strides)):
        off += (idx % size) * stride
        idx //= size
    return off


def row_access(view: View, r0: int, r1: int) -> Access:
    cols = view.shape[-1] if view.rank else 1
    return linear_access(view, r0 * cols, r1 * cols)


def elements(access: Access) -> int:
    """Elements in an access's intervals (a bound: MAX_INTERVALS can merge them into one)."""
    return sum(hi - lo for lo, hi in access.intervals)


def whole(view: View) -> Access:
    return box_access(view, tuple((0, s) for s in view.shape))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


TL_DTYPE = {
    torch.float32: "tl.float32",
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.int64: "tl.int64",
    torch.int32: "tl.int32",
    torch.bool: "tl.int1",
}


ALIGN_BYTES = 16  # buffers start 16-byte aligned (allocations are; runtime/capture enforce it)


def aligned(view: View) -> bool:
    """Does every row of `view` start on a 16-byte boundary (offset and outer strides)?"""
    size = view.dtype.itemsize
    if (view.offset * size) % ALIGN_BYTES:
        return False
    inner = [st for sz, st in zip(view.shape, view.strides) if sz != 1 and st != 1]
    return all((st * size) % ALIGN_BYTES == 0 for st in inner)


def flat_flags(*views) -> tuple[int, ...]:
    """Per view, how its offsets are computed (ops/common.offsets_of): 0 strided (view table),
    1 contiguous (offset = linear index), 2 contiguous and 16-byte aligned (wide accesses).
    None (an absent operand) counts as 1."""
    return tuple(1 if v is None else (0 if not v.is_contiguous() else (2 if aligned(v) else 1)) for v in views)


def row_flags(x: View, *others) -> tuple[int, ...]:
    """flat_flags for a row op whose first view holds the rows: it keeps 2 (aligned) only if
    every row starts 16-byte aligned, i.e. the row length is a multiple of 16 bytes too."""
    flags = flat_flags(x, *others)
    if flags[0] == 2 and (x.shape[-1] * x.dtype.itemsize) % ALIGN_BYTES:
        flags = (1,) + flags[1:]
    return flags


def tl_dtype(dtype: torch.dtype) -> str:
    if dtype not in TL_DTYPE:
        raise NotImplementedError(f"dtype {dtype} is not supported in kernels")
    return TL_DTYPE[dtype]


class OpFamily:
    """Base of every family; see the module docstring for the contract."""

    kind: str = ""
    routines: tuple[str, ...] = ()  # @triton.jit tile routines in this module the kernel calls
    peer_access: bool = False  # tiles read other ranks' buffers (communication: ops/comm.py)

    def peer_ranks(self, node: OpNode, coords) -> list[int]:
        """Ranks whose copy of the op's inputs the tile reads (peer_access families only)."""
        return []

    def key(self, node: OpNode) -> tuple:
        raise NotImplementedError

    def label(self, key: tuple) -> str:
        """A readable name for the opcode of `key` (passes/encode.py numbers it)."""
        return self.kind

    def view_args(self, node: OpNode) -> list[View | None]:
        return list(node.inputs) + list(node.outputs)

    def instruction_tail(self, node: OpNode) -> list[View | None]:
        """Views whose ids follow the tile coordinates in the instruction (rarely needed)."""
        return []

    def tiles(self, node: OpNode) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def regions(self, node: OpNode, coords) -> tuple[list[Access], list[Access]]:
        raise NotImplementedError

    def work(self, node: OpNode, coords) -> Work:
        """Bytes the tile reads and writes, from `regions` (a family whose routine moves other
        bytes than its regions say, e.g. where they are bounding intervals of strided views, or
        computes FLOPs worth counting, overrides this or region_work)."""
        return self.region_work(node, coords, *self.regions(node, coords))

    def region_work(self, node: OpNode, coords, reads: list[Access], writes: list[Access]) -> Work:
        """The default work, from the tile's regions (given: computed once by `tile`)."""
        size = {v.buffer: v.dtype.itemsize for v in (*node.inputs, *node.outputs) if v is not None}
        return Work(float(sum(elements(a) * size[a.buffer] for a in (*reads, *writes))))

    def cost(self, node: OpNode, coords) -> float:
        return tile_ns(self.work(node, coords))

    def tile(self, node: OpNode, coords) -> tuple[list[Access], list[Access], float]:
        """(reads, writes, cost) of one tile, what build_dag asks of every tile: the regions
        once, where the cost comes from them (work not overridden), not a second time."""
        reads, writes = self.regions(node, coords)
        if type(self).work is OpFamily.work and type(self).cost is OpFamily.cost:
            return reads, writes, tile_ns(self.region_work(node, coords, reads, writes))
        return reads, writes, self.cost(node, coords)

    def emit(self, key: tuple, name: str) -> tuple[str, str]:
        """(source defining helpers or '', call expression with {row},{addrs},{views})."""
        raise NotImplementedError

    def early_wait(self, key: tuple) -> bool:
        """Can this opcode's tile wait for its inputs itself (Settings.early_weights)? Then its
        call (from emit) takes a `{wait}` argument: kernel_lib.wait_in_tile's tuple, or None
        when the dispatcher waits; with a tuple the routine returns wait_in_tile's (ok, stamp)
        and runs none of its stores unless ok."""
        return False

    def describe(self, node: OpNode, coords) -> str:
        return f"{node.name}{list(coords)}"

    def reference(self, node: OpNode, coords, tensor_of) -> None:
        """Compute this tile with torch; `tensor_of(view)` gives a writable strided tensor."""
        raise NotImplementedError
