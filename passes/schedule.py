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


@dataclass
class Schedule:
    order: list[int]  # task ids in global queue order
    worker_lists: list[list[int]]  # per worker: task ids in the order it runs them
    makespan_ns: float


def bottom_levels(dag: nx.DiGraph) -> dict[int, float]:
    level: dict[int, float] = {}
    cost = dict(dag.nodes(data="cost"))
    successors = dict(dag.adjacency())
    for t in reversed(list(nx.topological_sort(dag))):
        level[t] = cost[t] + max((level[s] for s in successors[t]), default=0.0)
    return level


def list_schedule(dag: nx.DiGraph, num_workers: int) -> Schedule:
    level = bottom_levels(dag)
    cost = dict(dag.nodes(data="cost"))
    missing = dict(dag.in_degree())
    ready_at = {t: 0.0 for t in dag.nodes}
    ready = [(-level[t], t) for t in dag.nodes if missing[t] == 0]
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


def program_order_schedule(dag: nx.DiGraph, num_workers: int) -> Schedule:
    """Tasks in program order, round robin over workers (a simple baseline)."""
    order = sorted(dag.nodes)
    lists = [order[w::num_workers] for w in range(num_workers)]
    return Schedule(order, lists, float("nan"))
