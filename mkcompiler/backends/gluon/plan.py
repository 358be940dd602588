"""The Gluon decode backend's static plan: what each SM's loader streams and its compute consumes.

One CTA per SM runs its worker's static instruction list (Queue.worker_order) in two partitions
joined by a shared-memory ring (ring.py models it). The loader walks the list and TMA-loads
every matmul instruction's weight (B operand) blocks, in K-loop order; other instructions give
it nothing to load. Compute walks the same list and, for each instruction, takes the blocks that
instruction consumes from the ring. The ring is a FIFO, so both walks must be the same sequence
of (instruction, block): `WorkerPlan.check` compares them.

The two walks are derived independently on purpose, each from what its partition will read:
  - the loader's from the encoded queue (the instruction row, its opcode key and view rows),
    with matmul_tile's own K-chunk arithmetic: what a generated loader sees;
  - compute's from the tile DAG and the op (the matmul family's tile and k_range): what the
    op's tile routine computes.
A mismatch is a bug in one of them, and would hang or corrupt a kernel; here it is a PlanError.

Blocks are in weight coordinates: a matmul's B is a [K, N] view (linear's W^T read in place), its
weight the [N, K] matrix W that view reads; block rows [n0, n1) x cols [k0, k1). A TMA copy moves
the whole box (BN, BK) of the tile, zero-filling what lies past the tensor's edge.

Many weight tensors, few descriptors: a Gluon kernel cannot index a descriptor array at run time
(backends/gluon/stream.py takes at most MAX_W). `stack_weights` groups the weights that can share
a descriptor: whole row-major weights of one dtype and shape, stacked as one [L*N, K] buffer
(member l at rows [l*N, (l+1)*N)). A box that runs past a member's last row reads the next
member's first rows rather than zeros; those rows feed only output rows past N, which compute
masks. Which boxes a plan uses decides the descriptor count (DecodePlan.descriptors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from mkcompiler.ir.dag import TileDAG
from mkcompiler.ir.graph import Buffer, BufferKind, Graph, OpNode, View
from mkcompiler.ir.layout import NUM_ARGS, Field, ViewField
from mkcompiler.ir.queue import Queue
from mkcompiler.ops.base import cdiv
from mkcompiler.ops.matmul import DECODE_ROWS
from mkcompiler.ops.registry import FAMILIES

MATMUL = "matmul"
# Weights the loader may stream ahead of every wait: nothing in a launch writes them.
STREAMED_KINDS = (BufferKind.PARAM,)


class MatmulArg(IntEnum):
    """A matmul instruction's args (Matmul.view_args, then its tile coordinates), as matmul_tile reads them."""

    A = 0
    B = 1
    BIAS = 2
    C = 3
    TM = 4
    TN = 5
    KS = 6


class PlanError(RuntimeError):
    pass


# ---- what the plan reads of a matmul op and its opcode key: here only, so a change of either is one edit ----


def _matmul():
    return FAMILIES[MATMUL]


def op_tile(op: OpNode) -> tuple[int, int, int]:
    """(BM, BN, BK) of a tiled matmul op."""
    bm, bn, bk = op.attrs.tile
    return bm, bn, bk


def op_weight_view(op: OpNode) -> View:
    """The B operand [K, N] of a matmul op."""
    return _matmul().operands(op).b


def op_k_range(op: OpNode, split: int) -> tuple[int, int]:
    return _matmul().k_range(op, split)


def key_tile(key) -> tuple[int, int, int]:
    """(BM, BN, BK) of a matmul opcode key (MatmulKey)."""
    bm, bn, bk = key.tile
    return bm, bn, bk


def key_weight_dtype(key) -> torch.dtype:
    return key.b


# ---- weights and blocks ----


@dataclass(frozen=True)
class WeightTensor:
    """A weight as a TMA descriptor addresses it: the [N, K] matrix a matmul's B view [K, N] reads,
    at `offset` elements into buffer `buffer`. `whole`: it is all of its buffer, row-major (K
    contiguous), so its parameter can be re-bound as a view of a stacked buffer."""

    buffer: int
    offset: int
    n: int
    k: int
    n_stride: int
    k_stride: int
    dtype: torch.dtype
    whole: bool
    name: str = field(default="", compare=False)

    @property
    def nbytes(self) -> int:
        return self.n * self.k * self.dtype.itemsize


def weight_tensor(
    buf: Buffer, dtype: torch.dtype, offset: int, kn: tuple[int, int], strides: tuple[int, int]
) -> WeightTensor:
    """The WeightTensor of a B view of `buf`: sizes (K, N), strides (K stride, N stride)."""
    (k, n), (sk, sn) = kn, strides
    whole = offset == 0 and n * k == buf.numel and (sk == 1 or k == 1) and (sn == k or n == 1)
    return WeightTensor(buf.id, offset, n, k, sn, sk, dtype, whole, buf.name)


@dataclass(frozen=True)
class WeightBlock:
    """Rows [n0, n1) x cols [k0, k1) of `weight` (the part inside it), loaded as one TMA box
    `box` = (BN, BK) of the instruction's tile."""

    weight: WeightTensor
    n0: int
    n1: int
    k0: int
    k1: int
    box: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Bytes read from memory."""
        return (self.n1 - self.n0) * (self.k1 - self.k0) * self.weight.dtype.itemsize

    @property
    def box_bytes(self) -> int:
        """Bytes a TMA copy of the box delivers (what a ring slot holds and its barrier expects)."""
        return self.box[0] * self.box[1] * self.weight.dtype.itemsize


def k_blocks(weight: WeightTensor, n0: int, n1: int, k0: int, k1: int, bk: int, bn: int) -> tuple[WeightBlock, ...]:
    """A tile's K loop over [k0, k1) in steps of BK (empty when k0 >= k1, as the kernel's loop)."""
    return tuple(WeightBlock(weight, n0, n1, k, min(k + bk, k1), (bn, bk)) for k in range(k0, k1, bk))


# ---- the two walks ----


@dataclass(frozen=True)
class LoaderStep:
    """One TMA load of the loader: a block of instruction `instruction`'s weight."""

    instruction: int
    block: WeightBlock


@dataclass(frozen=True)
class ComputeStep:
    """One instruction of the compute walk and the blocks it takes from the ring, in order."""

    instruction: int
    blocks: tuple[WeightBlock, ...]


@dataclass(frozen=True)
class WorkerPlan:
    worker: int
    instructions: tuple[int, ...]  # the static list
    loads: tuple[LoaderStep, ...]  # the loader's walk
    computes: tuple[ComputeStep, ...]  # the compute walk, one per instruction of the list

    def consumed(self) -> tuple[LoaderStep, ...]:
        """The compute walk as the sequence of ring entries it takes."""
        return tuple(LoaderStep(c.instruction, b) for c in self.computes for b in c.blocks)

    def check(self) -> None:
        """The ring is a FIFO: the loader must put exactly what compute takes, in its order."""
        want, got = self.consumed(), self.loads
        if want == got:
            return
        at = next((p for p, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        raise PlanError(
            f"worker {self.worker}: the loader's walk and the compute walk differ at ring entry {at} "
            f"(loader {got[at] if at < len(got) else 'ends'}, compute {want[at] if at < len(want) else 'ends'}; "
            f"{len(got)} loads, {len(want)} consumed)"
        )


def worker_lists(queue: Queue) -> list[tuple[int, ...]]:
    b = queue.worker_begin.tolist()
    order = queue.worker_order.tolist()
    return [tuple(order[b[w] : b[w + 1]]) for w in range(queue.num_workers)]


def worker_plans(
    queue: Queue,
    loader_blocks: Callable[[int], Sequence[WeightBlock]],
    compute_blocks: Callable[[int], Sequence[WeightBlock]],
) -> tuple[WorkerPlan, ...]:
    """Per worker: the loader's walk (loader_blocks(i) for each instruction i of its list, in list
    order) and the compute walk (compute_blocks(i) per instruction)."""
    plans = []
    for w, mine in enumerate(worker_lists(queue)):
        loads = tuple(LoaderStep(i, b) for i in mine for b in loader_blocks(i))
        computes = tuple(ComputeStep(i, tuple(compute_blocks(i))) for i in mine)
        plans.append(WorkerPlan(w, mine, loads, computes))
    return tuple(plans)


def is_large(bm: int) -> bool:
    """A BM-row matmul tile is large-M (prefill, large batch: prefill.py's A/B ring), else decode
    (the weight ring): each walk takes only its own kind of matmul."""
    return bm > DECODE_ROWS


def queue_loader_blocks(
    queue: Queue, buffers: Sequence[Buffer], large: bool = False
) -> Callable[[int], tuple[WeightBlock, ...]]:
    """The loader's view: instruction i's blocks from its encoded row, as matmul_tile addresses
    its weight (B view row, the K chunk of split KS of S, columns TN*BN of N). `large`: the walk
    of large-M matmuls (prefill.py's B loader), else of decode ones."""
    views = queue.views

    def size(v: int, d: int) -> int:
        return int(views[v, ViewField.SIZE0 + d])

    def blocks(i: int) -> tuple[WeightBlock, ...]:
        key = queue.opcode_keys[int(queue.rows[i, Field.OPCODE])]
        if key[0] != MATMUL or is_large(key_tile(key)[0]) != large:
            return ()
        args = queue.rows[i, Field.ARG0 : Field.ARG0 + NUM_ARGS].tolist()
        va, vb, vc = args[MatmulArg.A], args[MatmulArg.B], args[MatmulArg.C]
        buf = buffers[int(views[vb, ViewField.BUFFER])]
        if buf.kind not in STREAMED_KINDS:
            return ()
        _, bn, bk = key_tile(key)
        # Views are padded to 4 dims, outermost first: A [1, 1, M, K], B [1, 1, K, N], C [1, S, M, N].
        k, n, splits = size(va, 3), size(vb, 3), size(vc, 1)
        kn = (size(vb, 2), n)
        strides = (int(views[vb, ViewField.STRIDE0 + 2]), int(views[vb, ViewField.STRIDE0 + 3]))
        weight = weight_tensor(buf, key_weight_dtype(key), int(views[vb, ViewField.OFFSET]), kn, strides)
        k_chunk = cdiv(cdiv(k, splits), bk) * bk
        k_lo = args[MatmulArg.KS] * k_chunk
        k_hi = min(k, k_lo + k_chunk)
        n0 = args[MatmulArg.TN] * bn
        return k_blocks(weight, n0, min(n0 + bn, n), k_lo, k_hi, bk, bn)

    return blocks


def dag_compute_blocks(
    graph: Graph, dag: TileDAG, queue: Queue, large: bool = False
) -> Callable[[int], tuple[WeightBlock, ...]]:
    """Compute's view: instruction i's blocks from its tile task and op (the matmul family's tile
    and K range); `large` as queue_loader_blocks."""

    def blocks(i: int) -> tuple[WeightBlock, ...]:
        task = dag.tasks[int(queue.rows[i, Field.TASK])]
        op = graph.ops[task.op]
        if op.kind != MATMUL or is_large(op_tile(op)[0]) != large:
            return ()
        b = op_weight_view(op)
        buf = graph.buffers[b.buffer]
        if buf.kind not in STREAMED_KINDS:
            return ()
        weight = weight_tensor(buf, b.dtype, b.offset, b.shape, b.strides)
        _, bn, bk = op_tile(op)
        _, j, s = task.coords
        k0, k1 = op_k_range(op, s)
        n0 = j * bn
        return k_blocks(weight, n0, min(n0 + bn, weight.n), k0, k1, bk, bn)

    return blocks


# ---- stacking: many weights, few descriptors ----


@dataclass(frozen=True)
class StackKey:
    """What weights sharing one stacked [L*N, K] buffer (one descriptor) have in common."""

    dtype: torch.dtype
    n: int
    k: int


def stack_key(w: WeightTensor) -> StackKey | None:
    """None: the weight cannot be stacked (a strided or partial view of its buffer) and keeps a
    descriptor of its own."""
    return StackKey(w.dtype, w.n, w.k) if w.whole else None


@dataclass(frozen=True)
class StackGroup:
    key: StackKey | None  # None: one weight that is not stacked
    members: tuple[WeightTensor, ...]  # member l at rows [l*N, (l+1)*N) of the stacked buffer

    @property
    def rows(self) -> int:
        return sum(m.n for m in self.members)


@dataclass(frozen=True)
class StackSlot:
    group: int
    index: int  # the member's position (a layer, for per-layer weights)
    row0: int  # its first row in the stacked buffer


@dataclass(frozen=True)
class StackLayout:
    groups: tuple[StackGroup, ...]
    slots: dict[WeightTensor, StackSlot]

    def locate(self, block: WeightBlock) -> tuple[int, int, int]:
        """(group, first row in the stacked buffer, first column) of a block: a TMA coordinate."""
        slot = self.slots[block.weight]
        return slot.group, slot.row0 + block.n0, block.k0


def stack_weights(weights: Iterable[WeightTensor]) -> StackLayout:
    """Group distinct weights by stack_key, members in buffer order (per-layer weights come layer
    by layer, whatever the schedule); each unstackable weight is a group of its own. Groups come
    in the order of their first member."""
    distinct = sorted(set(weights), key=lambda w: (w.buffer, w.offset, w.n, w.k, w.n_stride, w.k_stride))
    members: dict[object, list[WeightTensor]] = {}
    for w in distinct:
        key = stack_key(w)
        members.setdefault(key if key is not None else ("alone", w), []).append(w)
    groups, slots = [], {}
    for key, ws in members.items():
        g = len(groups)
        groups.append(StackGroup(key if isinstance(key, StackKey) else None, tuple(ws)))
        row = 0
        for index, w in enumerate(ws):
            slots[w] = StackSlot(g, index, row)
            row += w.n
    return StackLayout(tuple(groups), slots)


# ---- the plan ----


@dataclass(frozen=True)
class DecodePlan:
    workers: tuple[WorkerPlan, ...]
    stacks: StackLayout

    @property
    def weights(self) -> tuple[WeightTensor, ...]:
        return tuple(w for g in self.stacks.groups for w in g.members)

    def blocks(self) -> Iterable[LoaderStep]:
        return (s for p in self.workers for s in p.loads)

    def descriptors(self) -> list[tuple[int, tuple[int, int]]]:
        """The TMA descriptors a launch needs: one per (stack group, box) the loads use."""
        return sorted({(self.stacks.slots[s.block.weight].group, s.block.box) for s in self.blocks()})

    def check(self) -> None:
        for p in self.workers:
            p.check()


def build_plan(
    queue: Queue,
    loader_blocks: Callable[[int], Sequence[WeightBlock]],
    compute_blocks: Callable[[int], Sequence[WeightBlock]],
    stacks: StackLayout | None = None,
) -> DecodePlan:
    """`stacks`: a layout shared with another plan of the same kernel (one stacked buffer per
    weight group, whichever ring streams it); None: stack this plan's weights."""
    workers = worker_plans(queue, loader_blocks, compute_blocks)
    if stacks is None:
        stacks = stack_weights(s.block.weight for p in workers for s in p.loads)
    return DecodePlan(workers, stacks)


def decode_plan(
    graph: Graph, dag: TileDAG, queue: Queue, check: bool = True, large: bool = False, stacks: StackLayout | None = None
) -> DecodePlan:
    """The plan of a compiled queue (its static worker lists); `check`: the two walks agree.
    `large`: the plan of its large-M matmuls (prefill.py), else of its decode ones."""
    plan = build_plan(
        queue,
        queue_loader_blocks(queue, graph.buffers, large),
        dag_compute_blocks(graph, dag, queue, large),
        stacks,
    )
    if check:
        plan.check()
    return plan


def kernel_stacks(graph: Graph, dag: TileDAG, queue: Queue) -> StackLayout:
    """One stack layout for every streamed weight of a kernel, decode and large-M alike (a
    weight both read, as a mixed prefill + decode step's, is stacked once)."""
    weights = []
    for large in (False, True):
        blocks = queue_loader_blocks(queue, graph.buffers, large)
        weights += [b.weight for i in range(len(queue)) for b in blocks(i)]
    return stack_weights(weights)
