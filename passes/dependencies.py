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

from mkcompiler.ir import Graph
from mkcompiler.ops.base import Intervals
from mkcompiler.ops.registry import FAMILIES


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


def build_dag(graph: Graph) -> nx.DiGraph:
    dag = nx.DiGraph()
    written = {o.buffer for op in graph.ops for o in op.outputs}
    writers: dict[int, list] = defaultdict(list)  # buffer -> [(task, intervals)]
    readers: dict[int, list] = defaultdict(list)
    task = 0
    for op_index, op in enumerate(graph.ops):
        fam = FAMILIES[op.kind]
        for coords in fam.tiles(op):
            reads, writes = fam.regions(op, coords)
            dag.add_node(task, op=op_index, coords=tuple(coords), cost=fam.cost(op, coords),
                         desc=fam.describe(op, coords))
            for acc in reads:
                if acc.buffer in written:
                    for w, iv in writers[acc.buffer]:
                        if overlaps(iv, acc.intervals):
                            dag.add_edge(w, task)
            for acc in writes:
                for w, iv in writers[acc.buffer] + readers[acc.buffer]:
                    if w != task and overlaps(iv, acc.intervals):
                        dag.add_edge(w, task)
            for acc in reads:
                if acc.buffer in written:
                    readers[acc.buffer].append((task, acc.intervals))
            for acc in writes:
                writers[acc.buffer].append((task, acc.intervals))
            task += 1
    return dag


def check_dag(dag: nx.DiGraph) -> None:
    assert nx.is_directed_acyclic_graph(dag), "tile dependency graph has a cycle"
    for u, v in dag.edges:
        assert u < v, f"edge {u}->{v} goes against program order"
