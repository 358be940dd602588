"""Refuse schedules that could deadlock, before anything is launched.

Dynamic fetch: workers take instructions in queue order, so the queue must be a
topological order of the DAG (then the lowest unfinished instruction can always run).
Static lists: a worker runs its list in order, so (DAG edges + "next on the same worker"
edges) must be acyclic; with a cycle, every worker on it can wait forever.
"""

from __future__ import annotations

import networkx as nx
import numpy as np

from mkcompiler.errors import MegakernelError
from mkcompiler.ir.dag import TileDAG


def _positions(order: list[int]) -> np.ndarray:
    """pos[task] = index of the task in `order` (tasks are small non-negative ints)."""
    ids = np.asarray(order, dtype=np.int64)
    pos = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=np.int64)
    pos[ids] = np.arange(len(ids))
    return pos


def _edges(dag: TileDAG) -> np.ndarray:
    return np.stack(dag.edge_arrays(), axis=1)


def check_dynamic(dag: TileDAG, order: list[int]) -> None:
    if sorted(order) != list(range(len(dag))):
        raise MegakernelError("queue does not hold every task exactly once")
    pos, edges = _positions(order), _edges(dag)
    backward = np.nonzero(pos[edges[:, 0]] > pos[edges[:, 1]])[0]  # vectorised: prefill DAGs have millions of edges
    if len(backward):
        u, v = edges[backward[0]].tolist()
        raise MegakernelError(
            f"queue is not a topological order: instruction {pos[v]} (task {v}) comes before "
            f"instruction {pos[u]} (task {u}) it depends on"
        )


def static_wait_graph(dag: TileDAG, worker_lists: list[list[int]]) -> nx.DiGraph:
    g = nx.DiGraph(dag.edges)
    g.add_nodes_from(range(len(dag)))
    for tasks in worker_lists:
        g.add_edges_from(zip(tasks, tasks[1:]))
    return g


def _forward_in(order: list[int], dag: TileDAG, worker_lists: list[list[int]]) -> bool:
    """Does every wait edge (DAG edges, and each worker's next task) go forward in `order`? Then
    the wait graph is acyclic: a total order with every edge forward is a topological order."""
    pos, edges = _positions(order), _edges(dag)
    if (pos[edges[:, 0]] >= pos[edges[:, 1]]).any():
        return False
    return all((np.diff(pos[np.asarray(tasks, dtype=np.int64)]) > 0).all() for tasks in worker_lists if len(tasks) > 1)


def check_static(dag: TileDAG, worker_lists: list[list[int]], order: list[int] | None = None) -> None:
    """`order` (optional): a witness, e.g. the global order the lists were dealt from. When every
    wait edge goes forward in it, the lists are free of cycles without a graph search (which takes
    minutes on an 8B prefill's DAG); otherwise the search finds the cycle to report."""
    flat = [t for tasks in worker_lists for t in tasks]
    if sorted(flat) != list(range(len(dag))):
        raise MegakernelError("static schedule does not hold every task exactly once")
    if order is not None and sorted(order) == sorted(flat) and _forward_in(order, dag, worker_lists):
        return
    g = static_wait_graph(dag, worker_lists)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    raise MegakernelError(
        "static schedule could deadlock: a cycle of waits through tasks " + " -> ".join(str(u) for u, _ in cycle)
    )


def check_queue(queue, static: bool) -> None:
    """Check an encoded (possibly hand-edited) queue before launch: every wait is met exactly
    by the signals the queue holds, signals come earlier in the queue than their waiters
    (dynamic fetch), and the static lists hold every instruction once with no cycle of waits."""
    from mkcompiler.ir.layout import Field

    signal = queue.rows[:, Field.SIGNAL]
    signallers: dict[int, list[int]] = {}
    for i, c in enumerate(signal.tolist()):
        if c >= 0:
            signallers.setdefault(c, []).append(i)
    g = nx.DiGraph()
    g.add_nodes_from(range(len(queue)))
    for i in range(len(queue)):
        # A wait on another rank's counter (tensor parallelism) is met by the same instructions
        # of that rank's queue, which is this queue: every rank runs the same program. Its edges
        # map onto this queue's, so this queue being free of waiting cycles covers every rank.
        remote = [(c, n, f"rank {r}'s counter") for c, n, r in queue.remote_waits_of(i)]
        for c, n, what in [(c, n, "counter") for c, n in queue.waits_of(i)] + remote:
            have = signallers.get(c, [])
            if len(have) != n:
                raise MegakernelError(
                    f"instruction {i} ({queue.opcode_name(i)} {queue.descs[i]}) waits for {n} signals on {what} "
                    f"{c}, but the queue holds {len(have)}: launching it would stall"
                )
            late = [j for j in have if j >= i]
            if late and not static:
                raise MegakernelError(
                    f"instruction {i} waits on counter {c}, which instruction {late[0]} (later in the queue) signals"
                )
            g.add_edges_from((j, i) for j in have)
    if static:
        order = queue.worker_order.tolist()
        if sorted(order) != list(range(len(queue))):
            raise MegakernelError("static worker lists do not hold every instruction exactly once")
        for w in range(queue.num_workers):
            mine = order[queue.worker_begin[w] : queue.worker_begin[w + 1]]
            g.add_edges_from(zip(mine, mine[1:]))
        try:
            cycle = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            return
        raise MegakernelError(
            "static schedule could deadlock: a cycle of waits through instructions "
            + " -> ".join(str(u) for u, _ in cycle)
        )
