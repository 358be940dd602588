"""Dependency counters: which counter each task signals and which counters it waits on.

Tasks with the same set of successors form one group with one counter: each member adds 1
when done, so a successor (which needs every member) waits for counter >= group size.
Every task signals at most one counter and every edge is covered exactly: a task's waits
are the groups of its predecessors. Targets are generation-relative (size x launch number),
so counters are never reset between launches.
"""

from __future__ import annotations

import numpy as np

from mkcompiler.ir.dag import TileDAG


def assign_counters(dag: TileDAG) -> TileDAG:
    """Sets each task's signal and waits, and dag.counter_sizes (in place). Counters are numbered
    in the order their groups first appear in task order."""
    n = len(dag)
    group_of: dict[tuple[int, ...], int] = {}
    sizes: list[int] = []
    signal = np.full(n, -1, dtype=np.int64)
    for t, succ in enumerate(_sorted_successors(dag)):
        if succ:
            c = group_of.setdefault(succ, len(sizes))
            if c == len(sizes):
                sizes.append(0)
            signal[t] = c
            sizes[c] += 1
    # A task's waits: the distinct groups of its predecessors, in counter order.
    waiter = np.repeat(np.arange(n, dtype=np.int64), np.diff(dag.pred_begin))
    code = np.unique(waiter * (len(sizes) + 1) + signal[dag.pred_index])
    waiter, counter = code // (len(sizes) + 1), code % (len(sizes) + 1)
    bounds = np.searchsorted(waiter, np.arange(n + 1)).tolist()
    counters, signals = counter.tolist(), signal.tolist()
    for t, task in enumerate(dag.tasks):
        task.signal = signals[t]
        task.waits = tuple((c, sizes[c]) for c in counters[bounds[t] : bounds[t + 1]])
    dag.counter_sizes = sizes
    return dag


def _sorted_successors(dag: TileDAG) -> list[tuple[int, ...]]:
    """Per task, its successors as a sorted tuple (the key of its counter group)."""
    owner = np.repeat(np.arange(len(dag), dtype=np.int64), np.diff(dag.succ_begin))
    succ = dag.succ_index[np.lexsort((dag.succ_index, owner))].tolist()
    bounds = dag.succ_begin.tolist()
    return [tuple(succ[b:e]) for b, e in zip(bounds, bounds[1:])]


def check_counters(dag: TileDAG) -> None:
    """Every wait is met by exactly the signals of its group, and covers every predecessor."""
    sizes = dag.counter_sizes
    signals = [0] * len(sizes)
    for task in dag.tasks:
        if task.signal >= 0:
            signals[task.signal] += 1
    assert signals == sizes, "counter group sizes disagree with signals"
    for t, task in enumerate(dag.tasks):
        waited = {c for c, _ in task.waits}
        for p in dag.predecessors(t):
            assert dag.tasks[p].signal in waited, f"task {t} does not wait for predecessor {p}"
        for c, n in task.waits:
            assert n == sizes[c] and n > 0
