"""The tile DAG: every tile task of a tiled op graph and the order between them.

Task ids are 0..n-1 in program order (op by op, each op's tiles in its family's order). An edge
u -> v (always u < v) means task v must wait for task u: passes/dependencies.py derives them
from the buffer regions tiles touch. Each task's record (TileTask) is filled in as the passes
run: build_dag gives what the tile is, assign_counters the counter it signals and those it
waits on, add_remote_waits a communication tile's waits on its peer ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import networkx as nx


@dataclass(slots=True)
class TileTask:
    op: int  # index into Graph.ops
    coords: tuple[int, ...]  # the tile within its op (the family's tiles())
    cost: float  # estimated ns (the family's cost model): the scheduler's priorities
    desc: str  # readable, for dumps and error messages
    signal: int = -1  # the counter it adds 1 to when done; -1: none (no task waits for it)
    waits: tuple[tuple[int, int], ...] = ()  # (counter, signals per launch) to see before it starts
    remote_waits: tuple[tuple[int, int, int], ...] = ()  # (counter, signals per launch, rank) on peer ranks


class TileDAG:
    """`tasks[t]` is task t's record; `graph` is the dependency structure as a networkx DiGraph
    over task ids, for analysis with networkx (nx.dag_longest_path_length(mk.dag.graph), ...):
    its nodes carry no attributes (the records are in `tasks`); edges keep the order they were
    added in (networkx iterates adjacency in that order, and the scheduler's ties follow it)."""

    def __init__(self, tasks: list[TileTask], edges: Iterable[tuple[int, int]] = ()):
        self.tasks = tasks
        self.graph = nx.DiGraph()
        self.graph.add_nodes_from(range(len(tasks)))
        self.graph.add_edges_from(edges)
        self.counter_sizes: list[int] = []  # per dependency counter: the tasks that signal it (assign_counters)

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"<TileDAG {len(self)} tasks, {self.number_of_edges()} edges, {len(self.counter_sizes)} counters>"

    @property
    def edges(self):
        """(u, v) pairs, by predecessor, in adjacency order."""
        return self.graph.edges

    def number_of_edges(self) -> int:
        return self.graph.number_of_edges()

    def predecessors(self, t: int) -> Iterator[int]:
        return self.graph.predecessors(t)

    def successors(self, t: int) -> Iterator[int]:
        return self.graph.successors(t)
