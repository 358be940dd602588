"""Refuse schedules that could deadlock, before anything is launched.

Dynamic fetch: workers take instructions in queue order, so the queue must be a
topological order of the DAG (then the lowest unfinished instruction can always run).
Static lists: a worker runs its list in order, so (DAG edges + "next on the same worker"
edges) must be acyclic; with a cycle, every worker on it can wait forever.
"""

from __future__ import annotations

import networkx as nx

from mkcompiler.errors import MegakernelError


def check_dynamic(dag: nx.DiGraph, order: list[int]) -> None:
    if sorted(order) != sorted(dag.nodes):
        raise MegakernelError("queue does not hold every task exactly once")
    pos = {t: i for i, t in enumerate(order)}
    for u, v in dag.edges:
        if pos[u] > pos[v]:
            raise MegakernelError(
                f"queue is not a topological order: instruction {pos[v]} (task {v}) comes before "
                f"instruction {pos[u]} (task {u}) it depends on"
            )


def static_wait_graph(dag: nx.DiGraph, worker_lists: list[list[int]]) -> nx.DiGraph:
    g = nx.DiGraph(dag.edges)
    g.add_nodes_from(dag.nodes)
    for tasks in worker_lists:
        g.add_edges_from(zip(tasks, tasks[1:]))
    return g


def check_static(dag: nx.DiGraph, worker_lists: list[list[int]]) -> None:
    flat = [t for tasks in worker_lists for t in tasks]
    if sorted(flat) != sorted(dag.nodes):
        raise MegakernelError("static schedule does not hold every task exactly once")
    g = static_wait_graph(dag, worker_lists)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    raise MegakernelError(
        "static schedule could deadlock: a cycle of waits through tasks "
        + " -> ".join(str(u) for u, _ in cycle)
    )
