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

from mkcompiler.ir.dag import TileDAG


@dataclass
class Schedule:
    order: list[int]  # task ids in global queue order
    worker_lists: list[list[int]]  # per worker: task ids in the order it runs them
    makespan_ns: float


def bottom_levels(dag: TileDAG) -> dict[int, float]:
    level: dict[int, float] = {}
    successors = dict(dag.graph.adjacency())
    for t in reversed(list(nx.topological_sort(dag.graph))):
        level[t] = dag.tasks[t].cost + max((level[s] for s in successors[t]), default=0.0)
    return level


def list_schedule(dag: TileDAG, num_workers: int) -> Schedule:
    level = bottom_levels(dag)
    cost = [task.cost for task in dag.tasks]
    missing = dict(dag.graph.in_degree())
    ready_at = {t: 0.0 for t in range(len(dag))}
    ready = [(-level[t], t) for t in range(len(dag)) if missing[t] == 0]
    heapq.heapify(ready)
    workers = [(0.0, w) for w in range(num_workers)]  # (free at, worker)
    heapq.heapify(workers)
    running: list[tuple[float, int]] = []  # (finish, task)
    order, lists = [], [[] for _ in range(num_workers)]
    makespan = 0.0
    while ready or running:
        if not ready:  # advance time to the next finish
            finish, t = heapq.heappop(running)
            _release(dag, t, finish, missing, ready_at, ready, level)
            continue
        free_at, w = heapq.heappop(workers)
        # Let tasks that finish before this worker is free release their successors first.
        while running and running[0][0] <= free_at:
            finish, t = heapq.heappop(running)
            _release(dag, t, finish, missing, ready_at, ready, level)
        _, t = heapq.heappop(ready)
        start = max(free_at, ready_at[t])
        finish = start + cost[t]
        order.append(t)
        lists[w].append(t)
        heapq.heappush(running, (finish, t))
        heapq.heappush(workers, (finish, w))
        makespan = max(makespan, finish)
    return Schedule(order, lists, makespan)


def _release(dag, t, finish, missing, ready_at, ready, level):
    for s in dag.successors(t):
        missing[s] -= 1
        ready_at[s] = max(ready_at[s], finish)
        if missing[s] == 0:
            heapq.heappush(ready, (-level[s], s))
