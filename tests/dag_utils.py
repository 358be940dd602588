"""Test utilities: random tile DAGs and instruction queues built from a bare DAG.

`queue_from_dag` mirrors passes/encode.py without an op graph (opcode 0 for every task, no
views, desc = str(task)), so the scheduling passes and the reference VM can be tested on
arbitrary DAGs. The hypothesis strategies draw DAGs whose edges go i -> j with i < j (the
order build_dag produces): random sparse ones, and layered ones that look like tiled ops
(many tasks sharing a successor set, hence counter groups larger than 1).
"""

from __future__ import annotations

import copy

import networkx as nx
import numpy as np
from hypothesis import strategies as st
from mkcompiler.passes.counters import assign_counters
from mkcompiler.passes.schedule import Schedule, list_schedule

from mkcompiler.ir.dag import TileDAG, TileTask
from mkcompiler.ir.layout import LOCAL, NUM_FIELDS, NUM_VIEW_FIELDS, NUM_WAIT_FIELDS, Field
from mkcompiler.ir.queue import Queue

MAX_NODES = 40


class TaskDAG(TileDAG):
    """A TileDAG that prints as code, so hypothesis' falsifying examples can be replayed."""

    def __repr__(self) -> str:
        return f"make_dag({len(self)}, {sorted(self.edges)}, {[task.cost for task in self.tasks]})"


def make_dag(n: int, edges, costs=None) -> TileDAG:
    """Tasks 0..n-1 (op 0, coords (t,)) with the given costs (default 0) and edges, each turned
    to go from the lower id to the higher (self loops dropped)."""
    costs = [0] * n if costs is None else costs
    tasks = [TileTask(op=0, coords=(t,), cost=float(costs[t]), desc=str(t)) for t in range(n)]
    return TaskDAG(tasks, ((min(u, v), max(u, v)) for u, v in edges if u != v))


@st.composite
def sparse_dags(draw, max_nodes: int = MAX_NODES) -> TileDAG:
    n = draw(st.integers(1, max_nodes))
    node = st.integers(0, n - 1)
    edges = draw(st.lists(st.tuples(node, node), max_size=3 * n))
    costs = draw(st.lists(st.integers(0, 100), min_size=n, max_size=n))
    return make_dag(n, edges, costs)


@st.composite
def layered_dags(draw, max_nodes: int = MAX_NODES) -> TileDAG:
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


def counted(dag: TileDAG) -> TileDAG:
    """A copy of `dag` with counters assigned (the passes annotate the tasks in place)."""
    return assign_counters(copy.deepcopy(dag))


def scheduled(dag: TileDAG, num_workers: int) -> tuple[TileDAG, Schedule]:
    dag = counted(dag)
    return dag, list_schedule(dag, num_workers)


def queue_from_dag(dag: TileDAG, schedule: Schedule) -> Queue:
    """Encode a counted DAG (after assign_counters) and a schedule as a Queue, like encode()."""
    pos = {t: i for i, t in enumerate(schedule.order)}
    rows = np.full((len(schedule.order), NUM_FIELDS), -1, dtype=np.int32)
    waits: list[tuple[int, int, int]] = []
    for i, t in enumerate(schedule.order):
        task = dag.tasks[t]
        rows[i, Field.OPCODE] = 0
        rows[i, Field.WAIT_BEGIN] = len(waits)
        waits.extend((c, n, LOCAL) for c, n in task.waits)
        waits.extend(task.remote_waits)  # (counter, count, rank): tensor-parallel DAGs
        rows[i, Field.WAIT_END] = len(waits)
        rows[i, Field.SIGNAL] = task.signal
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
        num_counters=len(dag.counter_sizes),
    )


def static_queue(dag: TileDAG, worker_lists: list[list[int]]) -> Queue:
    """A queue for hand-made worker lists (the global order, unused by static fetch, is by id)."""
    return queue_from_dag(dag, Schedule(list(range(len(dag))), worker_lists, float("nan")))


def critical_path(dag: TileDAG) -> float:
    """Cost of the most expensive path (a lower bound on any schedule's makespan)."""
    longest: dict[int, float] = {}
    for t in nx.topological_sort(dag.graph):
        longest[t] = dag.tasks[t].cost + max((longest[p] for p in dag.predecessors(t)), default=0.0)
    return max(longest.values(), default=0.0)


def replay_makespan(dag: TileDAG, schedule: Schedule) -> float:
    """Finish time when every task starts as soon as its predecessors and its worker's
    previous task are done, taking tasks in queue order."""
    worker_of = {t: w for w, tasks in enumerate(schedule.worker_lists) for t in tasks}
    free = [0.0] * len(schedule.worker_lists)
    finish: dict[int, float] = {}
    for t in schedule.order:
        w = worker_of[t]
        start = max([free[w]] + [finish[p] for p in dag.predecessors(t)])
        finish[t] = free[w] = start + dag.tasks[t].cost
    return max(finish.values(), default=0.0)
