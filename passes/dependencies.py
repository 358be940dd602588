"""Tile tasks and their dependencies, derived from the buffer regions each tile touches.

Every op is split into its family's tiles; a task records the intervals it reads and
writes. Edges: read-after-write, write-after-write and write-after-read between tasks
whose intervals overlap, in program order. Buffers nobody writes (parameters, inputs) need
no tracking. The result is a TileDAG (mkcompiler/ir/dag.py): per task its op, coords, cost
and description, and the edges.

Equivalently: tasks u < v get the edge u -> v when some access of u and some access of v
to the same buffer overlap and at least one of the two is a write (reads of buffers no op
outputs are not tracked). An access's intervals are sorted and disjoint (ops/base.py), so
two accesses overlap exactly when two of their intervals do. build_dag finds those interval
pairs for the whole graph at once with sorted arrays (numpy), not task by task: a prefill's
thousands of matmul tiles writing one output would otherwise cost a quadratic number of
Python interval checks. Edges are added in the order the task-by-task formulation adds them
(by successor, then its access, writers before readers, then predecessor), so the DiGraph is
the same object down to its adjacency order.
"""

from __future__ import annotations

from itertools import chain

import networkx as nx
import numpy as np
from mkcompiler.ops.registry import FAMILIES

from mkcompiler.ir.dag import TileDAG, TileTask
from mkcompiler.ir.graph import Graph

BUFFER_SHIFT = 40  # intervals of buffer b live at b << 40 + offset: one address space for all buffers
PAIRS_PER_CHUNK = 1 << 22  # interval pairs materialised at once (bounds memory)


def build_dag(graph: Graph) -> TileDAG:
    written = {o.buffer for op in graph.ops for o in op.outputs}
    tasks: list[TileTask] = []
    acc_task: list[int] = []  # per tracked access: task, position in the task's accesses, is a write, buffer
    acc_pos: list[int] = []
    acc_write: list[bool] = []
    acc_buffer: list[int] = []
    acc_count: list[int] = []  # intervals of the access
    flat: list[tuple[int, int]] = []
    for op_index, op in enumerate(graph.ops):
        fam = FAMILIES[op.kind]
        for coords in fam.tiles(op):
            task = len(tasks)
            reads, writes = fam.regions(op, coords)
            tasks.append(TileTask(op_index, tuple(coords), fam.cost(op, coords), fam.describe(op, coords)))
            pos = 0
            for is_write, accesses in ((False, reads), (True, writes)):
                for acc in accesses:
                    if acc.intervals and (is_write or acc.buffer in written):
                        acc_task.append(task)
                        acc_pos.append(pos)
                        acc_write.append(is_write)
                        acc_buffer.append(acc.buffer)
                        acc_count.append(len(acc.intervals))
                        flat.extend(acc.intervals)
                    pos += 1
    u, v = _dependencies(
        np.array(acc_task, dtype=np.int64),
        np.array(acc_pos, dtype=np.int64),
        np.array(acc_write, dtype=bool),
        np.array(acc_buffer, dtype=np.int64),
        np.array(acc_count, dtype=np.int64),
        np.fromiter(chain.from_iterable(flat), dtype=np.int64, count=2 * len(flat)).reshape(-1, 2),
        len(tasks),
    )
    return TileDAG(tasks, zip(u.tolist(), v.tolist()))


def _dependencies(acc_task, acc_pos, acc_write, acc_buffer, acc_count, intervals, num_tasks):
    """Edges (u, v) as two arrays, in insertion order. Every interval of every tracked access is
    a query; every interval of a write is a candidate; each overlapping (query, candidate) pair
    of two different tasks gives an edge from the earlier task to the later one."""
    if len(intervals) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    rec_acc = np.repeat(np.arange(len(acc_task)), acc_count)
    limit = 1 << (BUFFER_SHIFT - 1)
    assert np.abs(intervals).max() < limit, "buffer offsets beyond 2**39 elements"
    base = acc_buffer[rec_acc] << BUFFER_SHIFT
    lo, hi = intervals[:, 0] + base, intervals[:, 1] + base
    cand = np.nonzero(acc_write[rec_acc])[0]
    # Per interval: its task; the edge order key if its access is the successor's and the
    # predecessor writes (the access position, twice: writers (+0) come before readers (+1)).
    task_of = acc_task[rec_acc]
    rank_of = 2 * acc_pos[rec_acc]
    read_of = ~acc_write[rec_acc]
    num_ranks = 2 * int(acc_pos.max()) + 2
    keys = []
    for q, w in _overlapping_pairs(lo, hi, cand):
        tq, tw = task_of[q], task_of[w]
        keep = tq != tw
        q, w, tq, tw = q[keep], w[keep], tq[keep], tw[keep]
        later_is_query = tq > tw
        rank = np.where(later_is_query, rank_of[q], rank_of[w] + read_of[q])
        keys.append(
            _first_per_edge((np.maximum(tq, tw) * num_tasks + np.minimum(tq, tw)) * num_ranks + rank, num_ranks)
        )
    code = _first_per_edge(np.concatenate(keys), num_ranks)
    edge, rank = code // num_ranks, code % num_ranks
    succ, pred = edge // num_tasks, edge % num_tasks
    order = np.lexsort((pred, rank, succ))
    return pred[order], succ[order]


def _first_per_edge(codes: np.ndarray, num_ranks: int) -> np.ndarray:
    """Sorted unique codes, keeping for each edge (code // num_ranks) only its smallest rank."""
    codes = np.sort(codes)
    edge = codes // num_ranks
    first = np.ones(len(codes), dtype=bool)
    first[1:] = edge[1:] != edge[:-1]
    return codes[first]


def _overlapping_pairs(lo, hi, cand):
    """Yield (query, candidate) index arrays, in chunks, of every pair with lo[c] < hi[q] and
    lo[q] < hi[c], q over all intervals and c over `cand`. Candidates are grouped by length
    (powers of two): in a group whose intervals are at most L long, those overlapping [lo, hi)
    start in (lo - L, hi), a range of the group sorted by start."""
    length = np.maximum(hi[cand] - lo[cand], 0)
    group = np.frexp(length.astype(np.float64))[1]  # bit length
    nq = len(lo)
    for g in np.unique(group):
        members = cand[group == g]
        members = members[np.argsort(lo[members], kind="stable")]
        starts = lo[members]
        longest = int(length[group == g].max())
        first = np.searchsorted(starts, lo - longest, side="right")
        last = np.searchsorted(starts, hi, side="left")
        counts = np.maximum(last - first, 0)
        ends = np.cumsum(counts)
        q0 = 0
        while q0 < nq:  # queries whose pairs fit one chunk (at least one query)
            q1 = max(q0 + 1, int(np.searchsorted(ends, (ends[q0 - 1] if q0 else 0) + PAIRS_PER_CHUNK, "right")))
            q1 = min(q1, nq)
            n = counts[q0:q1]
            total = int(n.sum())
            if total:
                qi = np.repeat(np.arange(q0, q1), n)
                offset = np.arange(total) - np.repeat(np.cumsum(n) - n, n)
                ci = members[first[qi] + offset]
                hit = hi[ci] > lo[qi]  # lo[ci] < hi[qi] holds by the range
                yield qi[hit], ci[hit]
            q0 = q1


def check_dag(dag: TileDAG) -> None:
    assert nx.is_directed_acyclic_graph(dag.graph), "tile dependency graph has a cycle"
    for u, v in dag.edges:
        assert u < v, f"edge {u}->{v} goes against program order"
