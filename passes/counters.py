"""Dependency counters: which counter each task signals and which counters it waits on.

Tasks with the same set of successors form one group with one counter: each member adds 1
when done, so a successor (which needs every member) waits for counter >= group size.
Every task signals at most one counter and every edge is covered exactly: a task's waits
are the groups of its predecessors. Targets are generation-relative (size x launch number),
so counters are never reset between launches.
"""

from __future__ import annotations

from mkcompiler.ir.dag import TileDAG


def assign_counters(dag: TileDAG) -> TileDAG:
    """Sets each task's signal and waits, and dag.counter_sizes (in place)."""
    group_of: dict[frozenset, int] = {}
    sizes: list[int] = []
    successors = dict(dag.graph.adjacency())  # task -> {successor: {}} (plain dicts: the hot loop)
    for t, task in enumerate(dag.tasks):
        succ = frozenset(successors[t])
        if not succ:
            task.signal = -1
            continue
        if succ not in group_of:
            group_of[succ] = len(sizes)
            sizes.append(0)
        task.signal = group_of[succ]
        sizes[task.signal] += 1
    for t, preds in dag.graph.pred.items():
        groups = sorted({dag.tasks[p].signal for p in preds})
        dag.tasks[t].waits = tuple((c, sizes[c]) for c in groups)
    dag.counter_sizes = sizes
    return dag


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
