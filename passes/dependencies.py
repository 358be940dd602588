"""Tile tasks and their dependencies, derived from the buffer regions each tile touches.

Every op is split into its family's tiles; a task records the intervals it reads and
writes. Edges: read-after-write, write-after-write and write-after-read between tasks
whose intervals overlap, in program order. Buffers nobody writes (parameters, inputs) need
no tracking. The result is a networkx DiGraph whose nodes are task ids with attributes:
op (index into graph.ops), coords, cost, desc.
"""

from __future__ import annotations

from collections import defaultdict

import networkx as nx
import numpy as np
from mkcompiler.ops.base import Intervals
from mkcompiler.ops.registry import FAMILIES

from mkcompiler.ir import Graph


def overlaps(a: Intervals, b: Intervals) -> bool:
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][0] < b[j][1] and b[j][0] < a[i][1]:
            return True
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return False


class AccessIndex:
    """The accesses of one buffer so far, with a vectorized bounding-interval prefilter: the
    exact interval test then runs only on candidates (thousands of tiles writing one big
    output, e.g. an LM head, would otherwise cost a quadratic number of Python checks)."""

    def __init__(self):
        self.tasks: list[int] = []
        self.intervals: list[Intervals] = []
        self.bounds = np.empty((64, 2), dtype=np.int64)

    def add(self, task: int, intervals: Intervals) -> None:
        if not intervals:
            return
        n = len(self.tasks)
        if n == len(self.bounds):
            self.bounds = np.concatenate([self.bounds, np.empty_like(self.bounds)])
        self.bounds[n] = (intervals[0][0], intervals[-1][1])
        self.tasks.append(task)
        self.intervals.append(intervals)

    def overlapping(self, intervals: Intervals) -> list[int]:
        if not intervals or not self.tasks:
            return []
        b = self.bounds[: len(self.tasks)]
        hits = np.nonzero((b[:, 0] < intervals[-1][1]) & (b[:, 1] > intervals[0][0]))[0]
        return [self.tasks[i] for i in hits.tolist() if overlaps(self.intervals[i], intervals)]


def build_dag(graph: Graph) -> nx.DiGraph:
    dag = nx.DiGraph()
    written = {o.buffer for op in graph.ops for o in op.outputs}
    writers: dict[int, AccessIndex] = defaultdict(AccessIndex)
    readers: dict[int, AccessIndex] = defaultdict(AccessIndex)
    task = 0
    for op_index, op in enumerate(graph.ops):
        fam = FAMILIES[op.kind]
        for coords in fam.tiles(op):
            reads, writes = fam.regions(op, coords)
            dag.add_node(
                task, op=op_index, coords=tuple(coords), cost=fam.cost(op, coords), desc=fam.describe(op, coords)
            )
            for acc in reads:
                if acc.buffer in written:
                    dag.add_edges_from((w, task) for w in writers[acc.buffer].overlapping(acc.intervals))
            for acc in writes:
                earlier = writers[acc.buffer].overlapping(acc.intervals) + readers[acc.buffer].overlapping(
                    acc.intervals
                )
                dag.add_edges_from((w, task) for w in earlier if w != task)
            for acc in reads:
                if acc.buffer in written:
                    readers[acc.buffer].add(task, acc.intervals)
            for acc in writes:
                writers[acc.buffer].add(task, acc.intervals)
            task += 1
    return dag


def check_dag(dag: nx.DiGraph) -> None:
    assert nx.is_directed_acyclic_graph(dag), "tile dependency graph has a cycle"
    for u, v in dag.edges:
        assert u < v, f"edge {u}->{v} goes against program order"
