"""Weights streamed into L2 ahead of their instructions (Settings.prefetch_ahead_bytes).

A worker of the persistent kernel streams nothing while it waits for its inputs, and decode
spends about half of each worker's time waiting. Weights depend on nothing, so before each wait
the worker asks the copy engine (sm_90 `cp.async.bulk.prefetch.L2`, fire and forget) for the
weights of its NEXT matmul instructions; the tiles then read them from L2.

The plan is static, per position of each worker's list (Queue.worker_order): the regions whose
prefetch is issued when the worker reaches that position, before its wait. Invariants
(`check_plan`):
  - every decode matmul instruction's weight regions (its first LANES * ENTRIES rows) are asked
    for exactly once, at a position no later than the instruction's own;
  - per worker, the bytes asked for and not yet consumed (the instruction has not ended) stay
    within the budget, except a region asked for at its own position (it is read right away);
  - at most ENTRIES regions per position (the kernel reads a fixed-size row per position).

Only decode matmuls (at most DECODE_ROWS rows of A) whose weights are parameters (nothing in a
launch writes them) are prefetched, and only where the rows are 16-byte aligned (what the bulk
prefetch needs). Addresses are the runtime's: regions name a buffer and a byte offset in it, and
`PrefetchTable.rows` resolves them against the buffers' current addresses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mkcompiler.backends.gluon.plan import MatmulArg, queue_loader_blocks
from mkcompiler.ir.graph import Buffer
from mkcompiler.ir.layout import NUM_ARGS, Field, ViewField
from mkcompiler.ir.queue import Queue

ENTRIES = 4  # regions per position (the kernel's PREFETCH constexpr)
LANES = 64  # rows of one region (one thread each; a region of more rows is split)
FIELDS = 2  # per region: address, shape (pack_shape)
DECODE_ROWS = 16  # A rows at most for a matmul to count as decode (weight-streaming)
ALIGN = 16  # cp.async.bulk.prefetch: 16-byte aligned address and size
MAX_ROW_BYTES = (1 << 24) - ALIGN  # pack_shape's field widths
MAX_STRIDE = (1 << 31) - 1


def pack_shape(stride: int, rows: int, row_bytes: int) -> int:
    """One int64 for the kernel (kernel_lib.prefetch_issue unpacks it): stride << 32 | row_bytes
    << 8 | rows."""
    assert 0 < rows <= LANES and 0 < row_bytes <= MAX_ROW_BYTES and 0 <= stride <= MAX_STRIDE
    return stride << 32 | row_bytes << 8 | rows


@dataclass(frozen=True)
class Region:
    """`rows` rows of `row_bytes` bytes, `stride` bytes apart, at `offset` bytes into buffer `buffer`."""

    buffer: int
    offset: int
    stride: int
    rows: int
    row_bytes: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


def _a_rows(queue: Queue, i: int) -> int:
    va = int(queue.rows[i, Field.ARG0 + MatmulArg.A])
    return int(queue.views[va, ViewField.SIZE0 + 2])


def instruction_regions(queue: Queue, buffers: Sequence[Buffer]) -> dict[int, tuple[Region, ...]]:
    """Per decode matmul instruction whose weight is a parameter: the weight rows it reads (one
    region per LANES rows). Instructions with unaligned rows are left out."""
    assert Field.ARG0 + MatmulArg.KS < Field.ARG0 + NUM_ARGS
    blocks_of = queue_loader_blocks(queue, buffers)
    out: dict[int, tuple[Region, ...]] = {}
    for i in range(len(queue)):
        blocks = blocks_of(i)
        if not blocks or _a_rows(queue, i) > DECODE_ROWS:
            continue
        w = blocks[0].weight
        if w.k_stride != 1:  # a row of the tile is not contiguous
            continue
        esize = w.dtype.itemsize
        n0, n1 = blocks[0].n0, blocks[0].n1
        k0, k1 = blocks[0].k0, blocks[-1].k1
        start = (w.offset + n0 * w.n_stride + k0) * esize
        stride, row_bytes = w.n_stride * esize, (k1 - k0) * esize
        if n1 <= n0 or row_bytes <= 0 or start % ALIGN or (stride % ALIGN and n1 - n0 > 1) or row_bytes % ALIGN:
            continue
        if row_bytes > MAX_ROW_BYTES or stride > MAX_STRIDE:
            continue
        # at most ENTRIES regions (the first rows): a position holds them all, so the plan asks
        # for every region at the latest at its own instruction's position
        out[i] = tuple(
            Region(w.buffer, start + r * stride, stride, min(LANES, n1 - n0 - r), row_bytes)
            for r in range(0, min(n1 - n0, LANES * ENTRIES), LANES)
        )
    return out


@dataclass(frozen=True)
class PrefetchPlan:
    """positions[p]: the regions asked for at position p of Queue.worker_order (<= ENTRIES),
    with the instruction each belongs to."""

    positions: tuple[tuple[tuple[int, Region], ...], ...]
    budget: int

    @property
    def num_regions(self) -> int:
        return sum(len(p) for p in self.positions)


def plan_prefetch(queue: Queue, buffers: Sequence[Buffer], budget: int) -> PrefetchPlan:
    """Per worker, walk its list: at each position, first the position's own instruction's regions
    if not yet asked for, then the next matmul instructions' while the bytes in flight (asked for,
    instruction not yet ended) stay within `budget` and the position has entries left."""
    regions = instruction_regions(queue, buffers)
    order = queue.worker_order.tolist()
    positions: list[list[tuple[int, Region]]] = [[] for _ in order]
    begin = queue.worker_begin.tolist()
    for w in range(queue.num_workers):
        mine = range(begin[w], begin[w + 1])
        pending = [(p, r) for p in mine for r in regions.get(order[p], ())]  # in list order
        nxt = 0  # first region not yet asked for
        in_flight: dict[int, int] = {}  # position of the instruction -> bytes asked for
        for p in mine:
            in_flight.pop(p - 1, None)  # the previous instruction has ended
            slots = positions[p]
            while nxt < len(pending) and len(slots) < ENTRIES:
                q, region = pending[nxt]
                own = q == p
                if not own and sum(b for q2, b in in_flight.items() if q2 != p) + region.nbytes > budget:
                    break
                slots.append((order[q], region))
                in_flight[q] = in_flight.get(q, 0) + region.nbytes
                nxt += 1
    return PrefetchPlan(tuple(tuple(s) for s in positions), budget)


def check_plan(queue: Queue, buffers: Sequence[Buffer], plan: PrefetchPlan) -> None:
    """The module docstring's invariants; AssertionError names the first broken one."""
    regions = instruction_regions(queue, buffers)
    order = queue.worker_order.tolist()
    where = {i: p for p, i in enumerate(order)}
    asked: dict[int, list[Region]] = {}
    for p, slots in enumerate(plan.positions):
        assert len(slots) <= ENTRIES, f"position {p}: {len(slots)} regions"
        for i, region in slots:
            assert where[i] >= p, f"instruction {i} at position {where[i]} asked for later, at {p}"
            asked.setdefault(i, []).append(region)
    for i, rs in regions.items():
        assert tuple(asked.get(i, ())) == rs, f"instruction {i}: regions asked for {asked.get(i)} != {rs}"
    assert set(asked) <= set(regions), "a region of an instruction that reads no streamed weight"
    begin = queue.worker_begin.tolist()
    for w in range(queue.num_workers):
        in_flight: dict[int, int] = {}
        for p in range(begin[w], begin[w + 1]):
            in_flight.pop(order[p - 1] if p > begin[w] else -1, None)
            for i, region in plan.positions[p]:
                in_flight[i] = in_flight.get(i, 0) + region.nbytes
            ahead = sum(b for i, b in in_flight.items() if i != order[p])
            assert ahead <= plan.budget, f"worker {w} position {p}: {ahead} bytes ahead > {plan.budget}"


class PrefetchTable:
    """The kernel's table, int64 [positions, ENTRIES, FIELDS] (address, pack_shape; shape 0: no
    entry), its addresses resolved against the buffers' current addresses."""

    def __init__(self, plan: PrefetchPlan):
        n = len(plan.positions)
        self.buffer = np.zeros((n, ENTRIES), dtype=np.int64)
        self.offset = np.zeros((n, ENTRIES), dtype=np.int64)
        self.fields = np.zeros((n, ENTRIES, FIELDS), dtype=np.int64)
        for p, slots in enumerate(plan.positions):
            for e, (_, r) in enumerate(slots):
                self.buffer[p, e], self.offset[p, e] = r.buffer, r.offset
                self.fields[p, e, 1] = pack_shape(r.stride, r.rows, r.row_bytes)
        self.used = np.unique(self.buffer[self.fields[:, :, 1] > 0])

    def rows(self, addrs: np.ndarray) -> np.ndarray:
        """The table for buffer addresses `addrs` (int64 per buffer id). A region whose address is
        not 16-byte aligned (a parameter bound as an odd view) is dropped (shape 0)."""
        out = self.fields.copy()
        addr = addrs[self.buffer] + self.offset
        out[:, :, 0] = addr
        out[:, :, 1] = np.where(addr % ALIGN == 0, out[:, :, 1], 0)
        return out
