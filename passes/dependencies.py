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

import numpy as np
from mkcompiler.ops.registry import FAMILIES

from mkcompiler.ir.dag import TileDAG, TileTask
from mkcompiler.ir.graph import Graph

PAIRS_PER_CHUNK = 1 << 22  # interval pairs materialised at once (bounds memory)


def build_dag(graph: Graph) -> TileDAG:
    written = {o.buffer for op in graph.ops for o in op.outputs}
    tasks: list[TileTask] = []
    # Per tracked access: (task, position in the task's accesses, is a write, buffer, intervals).
    accesses: list[tuple[int, int, bool, int, int]] = []
    flat: list[tuple[int, int]] = []
    for op_index, op in enumerate(graph.ops):
        fam = FAMILIES[op.kind]
        for coords in fam.tiles(op):
            task = len(tasks)
            reads, writes, cost = fam.tile(op, coords)
            tasks.append(TileTask(op_index, tuple(coords), cost, fam.describe(op, coords)))
            for pos, acc in enumerate(chain(reads, writes)):
                is_write = pos >= len(reads)
                if acc.intervals and (is_write or acc.buffer in written):
                    accesses.append((task, pos, is_write, acc.buffer, len(acc.intervals)))
                    flat.extend(acc.intervals)
    table = np.array(accesses, dtype=np.int64).reshape(-1, 5)
    u, v = _dependencies(
        table[:, 0],
        table[:, 1],
        table[:, 2].astype(bool),
        table[:, 3],
        table[:, 4],
        np.fromiter(chain.from_iterable(flat), dtype=np.int64, count=2 * len(flat)).reshape(-1, 2),
        len(tasks),
    )
    return TileDAG(tasks, (u, v))


def _dependencies(acc_task, acc_pos, acc_write, acc_buffer, acc_count, intervals, num_tasks):
    """Edges (u, v) as two arrays, in insertion order. Every interval of every tracked access is
    a query; every interval of a write is a candidate; each overlapping (query, candidate) pair
    of two different tasks gives an edge from the earlier task to the later one."""
    if len(intervals) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    rec_acc = np.repeat(np.arange(len(acc_task)), acc_count)
    lo, hi = intervals[:, 0], intervals[:, 1]
    # Per interval: its task; the edge order key if its access is the successor's and the
    # predecessor writes (the access position, twice: writers (+0) come before readers (+1)).
    task_of = acc_task[rec_acc]
    rank_of = 2 * acc_pos[rec_acc]
    read_of = ~acc_write[rec_acc]
    num_ranks = 2 * int(acc_pos.max()) + 2
    keys = []
    pairs = _overlapping_pairs(lo, hi, acc_buffer[rec_acc], acc_write[rec_acc], _enumerated_only(lo, hi, acc_count))
    for q, w in _batches(pairs):
        tq, tw = task_of[q], task_of[w]
        keep = tq != tw
        q, w, tq, tw = q[keep], w[keep], tq[keep], tw[keep]
        later_is_query = tq > tw
        rank = np.where(later_is_query, rank_of[q], rank_of[w] + read_of[q])
        keys.append(
            _first_per_edge((np.maximum(tq, tw) * num_tasks + np.minimum(tq, tw)) * num_ranks + rank, num_ranks)
        )
    if not keys:
        return np.empty(0, np.int64), np.empty(0, np.int64)
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


def _batches(pairs):
    """The (query, candidate) chunks of `pairs` joined into batches of about PAIRS_PER_CHUNK
    (per-buffer chunks are often small: fewer, larger numpy calls downstream)."""
    held, size = [], 0
    for q, w in pairs:
        if len(q):
            held.append((q, w))
            size += len(q)
        if size >= PAIRS_PER_CHUNK:
            yield np.concatenate([q for q, _ in held]), np.concatenate([w for _, w in held])
            held, size = [], 0
    if held:
        yield np.concatenate([q for q, _ in held]), np.concatenate([w for _, w in held])


def _enumerated_only(lo, hi, acc_count) -> np.ndarray:
    """Per interval: must every overlap with it be enumerated (True), or may a query that spans
    it find it through its cell (see _buffer_pairs)? Cells need the interval's access to be
    sorted and disjoint (each interval non-empty, starting at or after the previous one's end)
    and a previous interval in it: the first interval of every access is enumerated, as is
    every interval of an access that is not sorted and disjoint."""
    begin = np.cumsum(acc_count) - acc_count
    first = np.zeros(len(lo), dtype=bool)
    first[begin] = True
    bad = hi <= lo
    bad[1:] |= ~first[1:] & (lo[1:] < hi[:-1])
    access_bad = np.add.reduceat(bad.astype(np.int64), begin) > 0
    return first | np.repeat(access_bad, acc_count)


def _overlapping_pairs(lo, hi, buffer, is_write, enumerated_only):
    """Yield (query, candidate) index arrays, in chunks: for every query interval q (all of
    them) and every write access with an interval overlapping q, at least one pair of q and an
    overlapping candidate interval of that access (candidates: the intervals of writes; every
    pair yielded overlaps: lo[c] < hi[q] and lo[q] < hi[c]). Buffers are done one at a time."""
    order = np.argsort(buffer, kind="stable")
    cuts = np.flatnonzero(buffer[order][1:] != buffer[order][:-1]) + 1
    for members in np.split(order, cuts):
        cand = members[is_write[members]]
        if len(cand):
            yield from _buffer_pairs(lo, hi, enumerated_only, members, cand)


def _buffer_pairs(lo, hi, enumerated_only, queries, cand):
    """_overlapping_pairs within one buffer. A long query (a row block read) overlaps many short
    intervals of one write (a tile's 64 rows): enumerating them all gave ~20 pairs per edge on a
    prefill. Instead each candidate interval c with a previous interval in its access owns the
    cell [hi[c - 1], hi[c]) (the gap before it and itself; the cells of an access do not
    overlap). A query [a, b) at least as long as c's cell finds c through the cell holding a:
    if the access overlaps [a, b), its first interval to do so starts at or before a (its cell
    holds a) or after a with its previous interval ending at or before a (its cell holds a
    too); and c overlaps [a, b) exactly when also lo[c] < b (a cell shorter than the query
    cannot hide it in its gap). So one cell per access is tested. Shorter queries, and the
    enumerated_only candidates, enumerate overlapping intervals (few per access: the query is
    shorter than the cells)."""
    plain = enumerated_only[cand]
    yield from _enumerated(lo, hi, queries, cand[plain])
    rest = cand[~plain]
    if not len(rest):
        return
    cell_class = _bit_length(hi[rest] - hi[rest - 1])
    query_length = hi[queries] - lo[queries]
    for g in np.unique(cell_class).tolist():
        members = rest[cell_class == g]
        spans = query_length >= (1 << g)  # longer than every cell of the class
        yield from _stabbed(lo, hi, queries[spans], members)
        yield from _enumerated(lo, hi, queries[~spans], members)


def _bit_length(x: np.ndarray) -> np.ndarray:
    return np.frexp(np.maximum(x, 0).astype(np.float64))[1]


def _enumerated(lo, hi, queries, members):
    """Every (q, c) with q in queries, c in members and the two intervals overlapping. Members
    are grouped by length (powers of two): in a group whose intervals are at most L long,
    those overlapping [lo, hi) start in (lo - L, hi), a range of the group sorted by start."""
    if not len(queries) or not len(members):
        return
    length = np.maximum(hi[members] - lo[members], 0)
    group = _bit_length(length)
    for g in np.unique(group).tolist():
        in_group = group == g
        ranked = members[in_group]
        ranked = ranked[np.argsort(lo[ranked], kind="stable")]
        starts = lo[ranked]
        longest = int(length[in_group].max())
        first = np.searchsorted(starts, lo[queries] - longest, side="right")
        last = np.searchsorted(starts, hi[queries], side="left")
        for qi, ci in _ranges(queries, ranked, first, last):
            hit = hi[ci] > lo[qi]  # lo[ci] < hi[qi] holds by the range
            yield qi[hit], ci[hit]


def _stabbed(lo, hi, queries, members):
    """Every (q, c) with q in queries, c in members, c's cell [hi[c - 1], hi[c]) holding lo[q]
    and lo[c] < hi[q] (then c overlaps q: see _buffer_pairs)."""
    if not len(queries) or not len(members):
        return
    cell_start = hi[members - 1]
    ranked = np.argsort(cell_start, kind="stable")
    members, starts = members[ranked], cell_start[ranked]
    longest = int((hi[members] - starts).max())
    point = lo[queries]
    first = np.searchsorted(starts, point - longest, side="right")
    last = np.searchsorted(starts, point, side="right")
    for qi, ci in _ranges(queries, members, first, last):
        hit = (hi[ci] > lo[qi]) & (lo[ci] < hi[qi])
        yield qi[hit], ci[hit]


def _ranges(queries, ranked, first, last):
    """(query, member) index arrays of ranked[first[i]:last[i]] for each query i, in chunks of
    about PAIRS_PER_CHUNK pairs (at least one query a chunk)."""
    counts = np.maximum(last - first, 0)
    ends = np.cumsum(counts)
    nq = len(queries)
    q0 = 0
    while q0 < nq:
        q1 = max(q0 + 1, int(np.searchsorted(ends, (ends[q0 - 1] if q0 else 0) + PAIRS_PER_CHUNK, "right")))
        q1 = min(q1, nq)
        n = counts[q0:q1]
        total = int(n.sum())
        if total:
            local = np.repeat(np.arange(q0, q1), n)
            offset = np.arange(total) - np.repeat(np.cumsum(n) - n, n)
            yield queries[local], ranked[first[local] + offset]
        q0 = q1


def check_dag(dag: TileDAG) -> None:
    """Every edge goes forward in program order (so the DAG has no cycle)."""
    u, v = dag.edge_arrays()
    back = np.flatnonzero(u >= v)
    assert not len(back), f"edge {u[back[0]]}->{v[back[0]]} goes against program order"
