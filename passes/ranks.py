"""Tensor parallelism in the passes: tiles of communication ops and their waits on peer ranks.

Every rank of a tensor-parallel group runs the same program on its own shard: the ranks' op
graphs, DAGs, counters and queues are identical (same shapes, same passes), only the tensors
differ (mkcompiler.tp.plan asserts it). A communication tile (a family with `peer_access`,
ops/comm.py) reads its input on the ranks `peer_ranks(op, coords)`; on each such rank k it
must wait for k's tiles producing what it reads there. Those are k's copies of the tile's own
local predecessors, which signal the same counter groups on k: the tile waits, for each rank
k it reads, on each of its local wait groups on rank k's counters (wait rows (counter, count,
k), layout.WaitField.RANK). Single-rank graphs have no communication ops: nothing changes.

No deadlock across ranks: a remote wait mirrors a local DAG edge p -> t (p < t) onto rank k.
With dynamic fetch every rank takes the same queue order (a topological order of the DAG), so
the lowest held instruction over all ranks always has its local and remote predecessors done.
With static lists, every cross-rank edge maps onto an edge of the one-rank wait graph, which
verify_schedule checks is acyclic; a cycle across ranks would map onto a cycle there.

Within a launch, a rank reads a peer's buffer while that peer runs on: nothing may write
a buffer that peers read after the communication op that reads it (checked here). Across
launches a rank's next launch must not start writing before its peers' reads of the previous
one are done (the VM runs launches one after another on every rank; the GPU kernel starts each
launch with kernel_tp.launch_barrier).
"""

from __future__ import annotations

from mkcompiler.ops.registry import FAMILIES
from mkcompiler.passes.tile import elementwise_block

from mkcompiler.ir.dag import TileDAG
from mkcompiler.ir.graph import Graph
from mkcompiler.ir.settings import Settings


def communication_ops(graph: Graph) -> list[int]:
    return [i for i, op in enumerate(graph.ops) if FAMILIES[op.kind].peer_access]


def choose_comm_tiles(graph: Graph, settings: Settings, num_workers: int) -> Graph:
    """Element blocks for communication ops: the producer's tiles where they are element blocks
    of the same elements (then each communication tile waits for one producer tile only, and
    moves data while the rest of the producer runs), else sized like elementwise tiles."""
    for i in communication_ops(graph):
        op = graph.ops[i]
        numel = max(op.inputs[0].numel, 1)
        tiling = _producer_blocks(graph, i)
        if tiling is not None:
            op.attrs.block, op.attrs.blocks_per_tile = tiling
            continue
        op.attrs.block = elementwise_block(numel, settings, num_workers)
        if settings.elementwise_block is None:
            blocks = -(-numel // op.attrs.block)
            op.attrs.blocks_per_tile = max(1, -(-blocks // num_workers))
    return graph


def _producer_blocks(graph: Graph, index: int) -> tuple[int, int] | None:
    """(block, blocks per tile) of the op writing op `index`'s input, when its tiles are element
    blocks of that input in the same order: an elementwise op (a split-K sum), or a one-row matmul
    (decode: tile j is elements [j BN, (j + 1) BN))."""
    x = graph.ops[index].inputs[0]
    producer = next((p for p in reversed(graph.ops[:index]) if any(o.buffer == x.buffer for o in p.outputs)), None)
    if producer is None or len(producer.outputs) != 1:
        return None
    out = producer.outputs[0]
    same = out.offset == x.offset and out.numel == x.numel and out.is_contiguous() and x.is_contiguous()
    if not same:
        return None
    if producer.kind == "elementwise" and producer.attrs.block is not None:
        return producer.attrs.block, producer.attrs.blocks_per_tile
    if producer.kind == "matmul" and out.rank == 2 and out.shape[0] == 1 and producer.attrs.tile is not None:
        return producer.attrs.tile[1], 1
    return None


def world_of(graph: Graph) -> int:
    """Ranks the graph's communication ops span (1 without any); all ops must agree."""
    worlds = {graph.ops[i].attrs.world for i in communication_ops(graph)}
    if len(worlds) > 1:
        raise NotImplementedError(f"communication ops over different rank counts {sorted(worlds)} in one graph")
    return worlds.pop() if worlds else 1


def check_peer_reads(graph: Graph) -> None:
    """No op writes a buffer that peers read after the communication op reading it."""
    for i in communication_ops(graph):
        op = graph.ops[i]
        read = {v.buffer for v in op.inputs if v is not None}
        for later in graph.ops[i + 1 :]:
            hit = read & {o.buffer for o in later.outputs}
            if hit:
                raise NotImplementedError(
                    f"{later.name} writes buffer {graph.buffers[hit.pop()].name!r} after {op.name} reads it from "
                    "peer ranks: a peer could still be reading it (cross-rank write-after-read is not tracked)"
                )


def add_remote_waits(graph: Graph, dag: TileDAG) -> TileDAG:
    """Give each communication tile its waits on the ranks it reads (TileTask.remote_waits)."""
    comm = set(communication_ops(graph))
    if not comm:
        return dag
    check_peer_reads(graph)
    world = world_of(graph)
    for task in dag.tasks:
        if task.op not in comm:
            continue
        op = graph.ops[task.op]
        ranks = FAMILIES[op.kind].peer_ranks(op, task.coords)
        assert all(0 <= k < world for k in ranks), (op.name, ranks, world)
        task.remote_waits = tuple((c, n, k) for k in ranks for c, n in task.waits)
    return dag


def check_remote_waits(graph: Graph, dag: TileDAG) -> None:
    """Every remote wait is one of the task's local wait groups, on a rank of the group."""
    sizes = dag.counter_sizes
    world = world_of(graph)
    for t, task in enumerate(dag.tasks):
        local = set(task.waits)
        for c, n, k in task.remote_waits:
            assert (c, n) in local and n == sizes[c], f"task {t}: remote wait on counter {c} is not a local wait group"
            assert 0 <= k < world, f"task {t} waits on rank {k} of {world}"
