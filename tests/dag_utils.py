"""Test utilities: random tile DAGs and instruction queues built from a bare DAG.

`queue_from_dag` mirrors passes/encode.py without an op graph (opcode 0 for every task, no
views, desc = str(task)), so the scheduling passes and the reference VM can be tested on
arbitrary DAGs. The hypothesis strategies draw DAGs whose edges go i -> j with i < j (the
order build_dag produces): random sparse ones, and layered ones that look like tiled ops
(many tasks sharing a successor set, hence counter groups larger than 1).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
from hypothesis import strategies as st
from mkcompiler.passes.counters import assign_counters
from mkcompiler.passes.schedule import Schedule, list_schedule

from mkcompiler.ir.layout import LOCAL, NUM_FIELDS, NUM_VIEW_FIELDS, NUM_WAIT_FIELDS, Field
from mkcompiler.ir.queue import Queue

MAX_NODES = 40


class TaskDAG(nx.DiGraph):
    """A DiGraph that prints as code, so hypothesis' falsifying examples can be replayed."""

    def __repr__(self) -> str:
        costs = [self.nodes[t].get("cost", 0.0) for t in sorted(self.nodes)]
        return f"make_dag({len(self)}, {sorted(self.edges)}, {costs})"


def make_dag(n: int, edges, costs) -> nx.DiGraph:
    dag = TaskDAG()
    for t in range(n):
        dag.add_node(t, cost=float(costs[t]))
    dag.add_edges_from((min(u, v), max(u, v)) for u, v in edges if u != v)
    return dag


@st.composite
def sparse_dags(draw, max_nodes: int = MAX_NODES) -> nx.DiGraph:
    n = draw(st.integers(1, max_nodes))
    node = st.integers(0, n - 1)
    edges = draw(st.lists(st.tuples(node, node), max_size=3 * n))
    costs = draw(st.lists(st.integers(0, 100), min_size=n, max_size=n))
    return make_dag(n, edges, costs)


@st.composite
def layered_dags(draw, max_nodes: int = MAX_NODES) -> nx.DiGraph:
    """Layers of tiles; each tile reads all or a random part of the previous layer."""
    widths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=8))
    while sum(widths) > max_nodes:
        widths.pop()
    starts = np.cumsum([0] + widths).tolist()
    edges = []
    for layer in range(1, len(widths)):
        prev = range(starts[layer - 1], starts[layer])
        dense = draw(st.booleans())
        for v in range(starts[layer], starts[layer + 1]):
            srcs = list(prev) if dense else draw(st.lists(st.sampled_from(list(prev)), max_size=len(prev)))
            edges += [(u, v) for u in srcs]
    # A few long-range edges (residual connections skip layers).
    n = starts[-1]
    node = st.integers(0, n - 1)
    edges += draw(st.lists(st.tuples(node, node), max_size=4))
    costs = draw(st.lists(st.integers(0, 100), min_size=n, max_size=n))
    return make_dag(n, edges, costs)


def dags(max_nodes: int = MAX_NODES):
    return st.one_of(sparse_dags(max_nodes), layered_dags(max_nodes))


def counted(dag: nx.DiGraph) -> nx.DiGraph:
    """A copy of `dag` with counters assigned (the passes annotate the graph in place)."""
    return assign_counters(dag.copy())


def scheduled(dag: nx.DiGraph, num_workers: int) -> tuple[nx.DiGraph, Schedule]:
    dag = counted(dag)
    return dag, list_schedule(dag, num_workers)


def queue_from_dag(dag: nx.DiGraph, schedule: Schedule) -> Queue:
    """Encode a counted DAG (after assign_counters) and a schedule as a Queue, like encode()."""
    pos = {t: i for i, t in enumerate(schedule.order)}
    rows = np.full((len(schedule.order), NUM_FIELDS), -1, dtype=np.int32)
    waits: list[tuple[int, int, int]] = []
    for i, t in enumerate(schedule.order):
        node = dag.nodes[t]
        rows[i, Field.OPCODE] = 0
        rows[i, Field.WAIT_BEGIN] = len(waits)
        waits.extend((c, n, LOCAL) for c, n in node["waits"])
        waits.extend(node.get("remote_waits", ()))  # (counter, count, rank): tensor-parallel DAGs
        rows[i, Field.WAIT_END] = len(waits)
        rows[i, Field.SIGNAL] = node["signal"]
        rows[i, Field.TASK] = t
    begin = np.cumsum([0] + [len(w) for w in schedule.worker_lists]).astype(np.int32)
    order = np.array([pos[t] for w in schedule.worker_lists for t in w], dtype=np.int32)
    return Queue(
        rows=rows,
        waits=np.array(waits, dtype=np.int32).reshape(-1, NUM_WAIT_FIELDS),
        views=np.zeros((0, NUM_VIEW_FIELDS), dtype=np.int64),
        opcode_keys=[("task",)],
        opcode_names=["task#0"],
        worker_begin=begin,
        worker_order=order,
        descs=[str(t) for t in schedule.order],
        num_counters=len(dag.graph["counter_sizes"]),
    )


def static_queue(dag: nx.DiGraph, worker_lists: list[list[int]]) -> Queue:
    """A queue for hand-made worker lists (the global order, unused by static fetch, is by id)."""
    return queue_from_dag(dag, Schedule(sorted(dag.nodes), worker_lists, float("nan")))


def critical_path(dag: nx.DiGraph) -> float:
    """Cost of the most expensive path (a lower bound on any schedule's makespan)."""
    longest: dict[int, float] = {}
    for t in nx.topological_sort(dag):
        longest[t] = dag.nodes[t]["cost"] + max((longest[p] for p in dag.predecessors(t)), default=0.0)
    return max(longest.values(), default=0.0)


def replay_makespan(dag: nx.DiGraph, schedule: Schedule) -> float:
    """Finish time when every task starts as soon as its predecessors and its worker's
    previous task are done, taking tasks in queue order."""
    worker_of = {t: w for w, tasks in enumerate(schedule.worker_lists) for t in tasks}
    free = [0.0] * len(schedule.worker_lists)
    finish: dict[int, float] = {}
    for t in schedule.order:
        w = worker_of[t]
        start = max([free[w]] + [finish[p] for p in dag.predecessors(t)])
        finish[t] = free[w] = start + dag.nodes[t]["cost"]
    return max(finish.values(), default=0.0)
