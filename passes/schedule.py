"""List scheduling with the cost model: a global queue order and per-worker lists.

Priority is the bottom level (longest cost path to the end), so the critical path starts
first. A simulation of `num_workers` identical workers gives each task a worker and a start
time; the global queue is the start order (a topological order: a task starts only after
its predecessors finish). Dynamic fetch runs the global queue; static mode runs the lists.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import networkx as nx
import numpy as np

from mkcompiler.ir.dag import TileDAG


@dataclass
class Schedule:
    order: list[int]  # task ids in global queue order
    worker_lists: list[list[int]]  # per worker: task ids in the order it runs them
    makespan_ns: float


def bottom_levels(dag: TileDAG) -> list[float]:
    """Per task: its cost plus the largest bottom level of its successors (0 for none)."""
    cost = [task.cost for task in dag.tasks]
    level = [0.0] * len(dag)
    successors = dag.successor_lists()
    get = level.__getitem__
    for t in _reverse_topological(dag):
        succ = successors[t]
        level[t] = cost[t] + (max(map(get, succ)) if succ else 0.0)
    return level


def _reverse_topological(dag: TileDAG) -> list[int]:
    """Tasks, every one after its successors: the ids backwards where every edge goes from a
    lower id to a higher one (build_dag's DAGs), else networkx's order, reversed."""
    u, v = dag.edge_arrays()
    if (u < v).all():
        return list(range(len(dag) - 1, -1, -1))
    return list(reversed(list(nx.topological_sort(dag.graph))))


def list_schedule(dag: TileDAG, num_workers: int) -> Schedule:
    level = bottom_levels(dag)
    cost = [task.cost for task in dag.tasks]
    successors = dag.successor_lists()
    missing = np.diff(dag.pred_begin).tolist()
    ready_at = [0.0] * len(dag)
    ready = [(-level[t], t) for t in range(len(dag)) if missing[t] == 0]
    heapq.heapify(ready)
    workers = [(0.0, w) for w in range(num_workers)]  # (free at, worker)
    heapq.heapify(workers)
    running: list[tuple[float, int]] = []  # (finish, task)
    order, lists = [], [[] for _ in range(num_workers)]
    makespan = 0.0

    def release(t: int, finish: float) -> None:
        for s in successors[t]:
            missing[s] -= 1
            if ready_at[s] < finish:
                ready_at[s] = finish
            if missing[s] == 0:
                heapq.heappush(ready, (-level[s], s))

    while ready or running:
        if not ready:  # advance time to the next finish
            finish, t = heapq.heappop(running)
            release(t, finish)
            continue
        free_at, w = heapq.heappop(workers)
        # Let tasks that finish before this worker is free release their successors first.
        while running and running[0][0] <= free_at:
            finish, t = heapq.heappop(running)
            release(t, finish)
        _, t = heapq.heappop(ready)
        start = max(free_at, ready_at[t])
        finish = start + cost[t]
        order.append(t)
        lists[w].append(t)
        heapq.heappush(running, (finish, t))
        heapq.heappush(workers, (finish, w))
        makespan = max(makespan, finish)
    return Schedule(order, lists, makespan)


@dataclass(frozen=True)
class ScheduleStats:
    """How good a schedule is by the cost model's own numbers (ns): its makespan against the two
    lower bounds (all work spread evenly over the workers; the longest cost path), and the
    dependencies between tiles of one op (op index -> edges), which only overlapping writes of one
    op justify: a count there is the first sign of regions coarser than the tiles (a tile's
    bounding interval overlaps every tile of the same rows, so they wait on each other)."""

    makespan_ns: float
    work_bound_ns: float
    critical_path_ns: float
    intra_op_edges: dict[int, int]

    @property
    def efficiency(self) -> float:
        """The larger lower bound over the makespan (1: nothing better exists)."""
        bound = max(self.work_bound_ns, self.critical_path_ns)
        return bound / self.makespan_ns if self.makespan_ns > 0 else 1.0


def schedule_stats(dag: TileDAG, schedule: Schedule, num_workers: int) -> ScheduleStats:
    cost = np.array([task.cost for task in dag.tasks], dtype=np.float64)
    u, v = dag.edge_arrays()
    op = np.array([task.op for task in dag.tasks], dtype=np.int64)
    same = op[u] == op[v]
    ops, counts = np.unique(op[u[same]], return_counts=True)
    return ScheduleStats(
        schedule.makespan_ns,
        float(cost.sum()) / num_workers,
        max(bottom_levels(dag), default=0.0),
        dict(zip(ops.tolist(), counts.tolist())),
    )
