"""The tile DAG: every tile task of a tiled op graph and the order between them.

Task ids are 0..n-1 in program order (op by op, each op's tiles in its family's order). An edge
u -> v (always u < v) means task v must wait for task u: passes/dependencies.py derives them
from the buffer regions tiles touch. Each task's record (TileTask) is filled in as the passes
run: build_dag gives what the tile is, assign_counters the counter it signals and those it
waits on, add_remote_waits a communication tile's waits on its peer ranks.

The edges are held as numpy arrays (a prefill's DAG has millions: a networkx DiGraph of them
took seconds to build and more to walk); `graph`, the networkx view, is built on first use.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import networkx as nx
import numpy as np


@dataclass(slots=True)
class TileTask:
    op: int  # index into Graph.ops
    coords: tuple[int, ...]  # the tile within its op (the family's tiles())
    cost: float  # estimated ns (the family's cost model): the scheduler's priorities
    desc: str  # readable, for dumps and error messages
    signal: int = -1  # the counter it adds 1 to when done; -1: none (no task waits for it)
    waits: tuple[tuple[int, int], ...] = ()  # (counter, signals per launch) to see before it starts
    remote_waits: tuple[tuple[int, int, int], ...] = ()  # (counter, signals per launch, rank) on peer ranks


def _edge_arrays(edges) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) int64 arrays from a pair of arrays or an iterable of pairs."""
    if isinstance(edges, tuple) and len(edges) == 2 and all(isinstance(e, np.ndarray) for e in edges):
        return np.asarray(edges[0], dtype=np.int64), np.asarray(edges[1], dtype=np.int64)
    pairs = np.array(list(edges), dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def _csr(keys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, begin): a stable sort of edge indices by `keys` and, per node k, the range
    begin[k]:begin[k + 1] of `order` holding its edges (in their insertion order)."""
    order = np.argsort(keys, kind="stable")
    begin = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n), out=begin[1:])
    return order, begin


class TileDAG:
    """`tasks[t]` is task t's record. The edges keep the order they were added in, with repeats
    dropped (as networkx keeps them): `predecessors(t)` and `successors(t)` follow it, and so
    does `graph`, the dependencies as a networkx DiGraph over task ids for analysis
    (nx.dag_longest_path_length(mk.dag.graph), ...; its nodes carry no attributes). The arrays
    the passes read: `pred_begin`/`pred_index` (task t's predecessors are
    pred_index[pred_begin[t]:pred_begin[t + 1]]) and `succ_begin`/`succ_index` likewise."""

    def __init__(self, tasks: list[TileTask], edges: Iterable[tuple[int, int]] | tuple[np.ndarray, np.ndarray] = ()):
        """`edges`: (u, v) pairs, or two arrays u and v, in the order they are added."""
        self.tasks = tasks
        n = len(tasks)
        u, v = _edge_arrays(edges)
        if len(u):
            if min(int(u.min()), int(v.min())) < 0 or max(int(u.max()), int(v.max())) >= n:
                raise ValueError(f"an edge names a task outside 0..{n - 1}")
            _, first = np.unique(u * n + v, return_index=True)  # the first of repeated edges
            if len(first) < len(u):
                keep = np.sort(first)
                u, v = u[keep], v[keep]
        self._u, self._v = u, v  # unique edges, in insertion order
        order, self.pred_begin = _csr(v, n)
        self.pred_index = u[order]
        order, self.succ_begin = _csr(u, n)
        self.succ_index = v[order]
        self._graph: nx.DiGraph | None = None
        self.counter_sizes: list[int] = []  # per dependency counter: the tasks that signal it (assign_counters)

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"<TileDAG {len(self)} tasks, {self.number_of_edges()} edges, {len(self.counter_sizes)} counters>"

    @property
    def graph(self) -> nx.DiGraph:
        """The networkx DiGraph (built once, on first use; the DAG does not change after build_dag)."""
        if self._graph is None:
            g = nx.DiGraph()
            g.add_nodes_from(range(len(self.tasks)))
            g.add_edges_from(zip(self._u.tolist(), self._v.tolist()))
            self._graph = g
        return self._graph

    def edge_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) of every edge, by predecessor, in adjacency order (the order of `edges`)."""
        return np.repeat(np.arange(len(self.tasks), dtype=np.int64), np.diff(self.succ_begin)), self.succ_index

    @property
    def edges(self) -> list[tuple[int, int]]:
        """(u, v) pairs, by predecessor, in adjacency order."""
        u, v = self.edge_arrays()
        return list(zip(u.tolist(), v.tolist()))

    def number_of_edges(self) -> int:
        return len(self._u)

    def predecessors(self, t: int) -> Iterator[int]:
        return iter(self.pred_index[self.pred_begin[t] : self.pred_begin[t + 1]].tolist())

    def successors(self, t: int) -> Iterator[int]:
        return iter(self.succ_index[self.succ_begin[t] : self.succ_begin[t + 1]].tolist())

    def successor_lists(self) -> list[list[int]]:
        """Per task, its successors (plain lists, for the passes' per-task loops)."""
        return _split(self.succ_index, self.succ_begin)

    def predecessor_lists(self) -> list[list[int]]:
        """Per task, its predecessors (plain lists, for the passes' per-task loops)."""
        return _split(self.pred_index, self.pred_begin)


def _split(index: np.ndarray, begin: np.ndarray) -> list[list[int]]:
    flat, bounds = index.tolist(), begin.tolist()
    return [flat[b:e] for b, e in zip(bounds, bounds[1:])]
