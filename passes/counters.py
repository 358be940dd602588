"""Dependency counters: which counter each task signals and which counters it waits on.

Tasks with the same set of successors form one group with one counter: each member adds 1
when done, so a successor (which needs every member) waits for counter >= group size.
Every task signals at most one counter and every edge is covered exactly: a task's waits
are the groups of its predecessors. Targets are generation-relative (size x launch number),
so counters are never reset between launches.

Tickets: each combined group of tasks (passes/dependencies.py: a split-K matmul's tiles of one
output block that sum their partials themselves, ops/matmul.py) gets one more counter, after the
dependency counters, in the same buffer (so it is zeroed whenever they are: runtime reset). Every
member adds 1 to it when its partial is stored; the member that sees S x generation - 1 arrived
last and writes the block. dag.graph["tickets"] = {task: counter}, dag.graph["num_tickets"].
"""

from __future__ import annotations

import networkx as nx


def assign_counters(dag: nx.DiGraph) -> nx.DiGraph:
    group_of: dict[frozenset, int] = {}
    sizes: list[int] = []
    data = dict(dag.nodes(data=True))  # node -> its attribute dict (the graph's own)
    successors = dict(dag.adjacency())
    signal: dict = {}
    for t in sorted(data):
        succ = frozenset(successors[t])
        if not succ:
            signal[t] = data[t]["signal"] = -1
            continue
        if succ not in group_of:
            group_of[succ] = len(sizes)
            sizes.append(0)
        c = group_of[succ]
        sizes[c] += 1
        signal[t] = data[t]["signal"] = c
    for t, preds in dag.pred.items():
        groups = sorted({signal[p] for p in preds})
        data[t]["waits"] = [(c, sizes[c]) for c in groups]
    dag.graph["counter_sizes"] = sizes
    combined = dag.graph.get("combined", {})
    if combined:
        ticket_of = {g: len(sizes) + k for k, g in enumerate(sorted(set(combined.values())))}
        dag.graph["tickets"] = {t: ticket_of[g] for t, g in combined.items()}
        dag.graph["num_tickets"] = len(ticket_of)
    return dag


def check_counters(dag: nx.DiGraph) -> None:
    """Every wait is met by exactly the signals of its group, and covers every predecessor."""
    sizes = dag.graph["counter_sizes"]
    signals = [0] * len(sizes)
    for t in dag.nodes:
        if dag.nodes[t]["signal"] >= 0:
            signals[dag.nodes[t]["signal"]] += 1
    assert signals == sizes, "counter group sizes disagree with signals"
    for t in dag.nodes:
        waited = {c for c, _ in dag.nodes[t]["waits"]}
        for p in dag.predecessors(t):
            assert dag.nodes[p]["signal"] in waited, f"task {t} does not wait for predecessor {p}"
        for c, n in dag.nodes[t]["waits"]:
            assert n == sizes[c] and n > 0
