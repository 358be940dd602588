"""The compile-time work on big graphs (issue 21's precompiles, issue 18's prefills) changes no
output: build_dag's per-buffer cell search, the TileDAG held as arrays (networkx built only when
asked), and the array-based counters and scheduler give exactly the queue the networkx
versions gave. The references here are those versions (task-by-task DAG, counters and list
scheduling over networkx), run on the same tiled graph."""

import copy
import heapq
import random

import networkx as nx
import numpy as np
import pytest
import torch
from mkcompiler.passes import dependencies
from mkcompiler.passes.encode import encode
from mkcompiler.passes.pipeline import run_pipeline
from mkcompiler.passes.schedule import Schedule
from models import ResidualMLP, TransformerMLP
from test_build_dag import build_dag_reference

import mkcompiler
from mkcompiler.frontend.capture import capture
from mkcompiler.ir.dag import TileDAG, TileTask
from mkcompiler.ir.settings import Settings

# ---- the networkx versions of the passes (before the DAG was held as arrays) ----


def assign_counters_reference(dag: TileDAG) -> TileDAG:
    group_of: dict[frozenset, int] = {}
    sizes: list[int] = []
    for t, task in enumerate(dag.tasks):
        succ = frozenset(dag.graph.succ[t])
        if not succ:
            task.signal = -1
            continue
        if succ not in group_of:
            group_of[succ] = len(sizes)
            sizes.append(0)
        task.signal = group_of[succ]
        sizes[task.signal] += 1
    for t, preds in dag.graph.pred.items():
        dag.tasks[t].waits = tuple((c, sizes[c]) for c in sorted({dag.tasks[p].signal for p in preds}))
    dag.counter_sizes = sizes
    return dag


def list_schedule_reference(dag: TileDAG, num_workers: int) -> Schedule:
    g = dag.graph
    level: dict[int, float] = {}
    for t in reversed(list(nx.topological_sort(g))):
        level[t] = dag.tasks[t].cost + max((level[s] for s in g.succ[t]), default=0.0)
    missing = dict(g.in_degree())
    ready_at = {t: 0.0 for t in range(len(dag))}
    ready = [(-level[t], t) for t in range(len(dag)) if missing[t] == 0]
    heapq.heapify(ready)
    workers = [(0.0, w) for w in range(num_workers)]
    running: list[tuple[float, int]] = []
    order, lists, makespan = [], [[] for _ in range(num_workers)], 0.0

    def release(t, finish):
        for s in g.succ[t]:
            missing[s] -= 1
            ready_at[s] = max(ready_at[s], finish)
            if missing[s] == 0:
                heapq.heappush(ready, (-level[s], s))

    while ready or running:
        if not ready:
            finish, t = heapq.heappop(running)
            release(t, finish)
            continue
        free_at, w = heapq.heappop(workers)
        while running and running[0][0] <= free_at:
            finish, t = heapq.heappop(running)
            release(t, finish)
        _, t = heapq.heappop(ready)
        finish = max(free_at, ready_at[t]) + dag.tasks[t].cost
        order.append(t)
        lists[w].append(t)
        heapq.heappush(running, (finish, t))
        heapq.heappush(workers, (finish, w))
        makespan = max(makespan, finish)
    return Schedule(order, lists, makespan)


def queue_arrays(q) -> dict:
    return dict(
        rows=q.rows,
        waits=q.waits,
        views=q.views,
        opcode_keys=q.opcode_keys,
        worker_begin=q.worker_begin,
        worker_order=q.worker_order,
        descs=q.descs,
        num_counters=q.num_counters,
    )


def assert_same_queue(a, b) -> None:
    a, b = queue_arrays(a), queue_arrays(b)
    for k in a:
        same = np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k]
        assert same, f"queues differ in {k}"


# ---- the whole queue ----


def tiny_llama(tokens: int):
    from examples.llama import fill_caches, random_llama

    torch.manual_seed(0)
    model = fill_caches(random_llama("tiny", max_seq_len=256))
    pos = torch.arange(tokens) + (7 if tokens == 1 else 0)
    return model, (torch.randint(0, 256, (1, tokens)), pos)


def hf_llama():
    pytest.importorskip("transformers")
    from mkcompiler.frontend.hf import StaticCacheLM, random_model

    lm = StaticCacheLM(random_model("llama", seed=1), batch_size=1, max_cache_len=32)
    return lm, (torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0)), torch.arange(8))


CASES = {
    "mlp": (lambda: (TransformerMLP(), (torch.randn(4, 32),)), dict(num_workers=4)),
    "mlp split-K": (
        lambda: (TransformerMLP(dim=64, hidden=96, layers=3), (torch.randn(37, 64),)),
        dict(num_workers=132),
    ),
    "residual static": (lambda: (ResidualMLP(), (torch.randn(8, 32),)), dict(num_workers=3, schedule="static")),
    "llama decode": (lambda: tiny_llama(1), dict(num_workers=132)),
    "llama prefill": (lambda: tiny_llama(24), dict(num_workers=16)),
    "llama prefill, GPU tiles": (lambda: tiny_llama(40), dict(num_workers=132, interpret=False)),
}


def check_queue_equals_the_networkx_passes(make, options) -> None:
    model, inputs = make()
    settings = Settings().replace(**options).for_target()
    comp = run_pipeline(capture(model, inputs), settings, options["num_workers"])
    ref_dag = assign_counters_reference(build_dag_reference(comp.graph))
    assert ref_dag.number_of_edges() == comp.dag.number_of_edges() > 0
    ref = encode(comp.graph, ref_dag, list_schedule_reference(ref_dag, options["num_workers"]))
    assert_same_queue(comp.queue, ref)


@pytest.mark.parametrize("case", list(CASES))
def test_queue_equals_the_networkx_passes(case):
    """Same instructions, order, waits, views, counters and worker lists as the task-by-task DAG
    with the networkx counters and scheduler."""
    check_queue_equals_the_networkx_passes(*CASES[case])


def test_hf_queue_equals_the_networkx_passes():
    """The same for a Hugging Face Llama (StaticCacheLM) prefill (slow tier: 8 s)."""
    check_queue_equals_the_networkx_passes(hf_llama, dict(num_workers=8))


# ---- build_dag's pair search on regions shaped like tiles ----


def tile_like_accesses(rng: np.random.Generator, buffers: int = 3):
    """Accesses as build_dag gathers them, with sorted disjoint intervals: row blocks of 2D
    outputs (a tile's rows: runs with gaps), long single reads spanning many of them, short
    reads inside gaps, and a few overlapping or degenerate ones."""
    acc, flat = [], []
    tasks = int(rng.integers(5, 60))
    for task in range(tasks):
        for pos in range(int(rng.integers(1, 4))):
            buffer, write = int(rng.integers(0, buffers)), bool(rng.random() < 0.5)
            kind = rng.random()
            if kind < 0.4:  # a tile of a [rows, width] output: rows x [c0, c0 + run)
                width = int(rng.choice([8, 16, 40]))
                run = int(rng.integers(1, width + 1))
                c0 = int(rng.integers(0, width - run + 1))
                r0 = int(rng.integers(0, 12))
                rows = int(rng.integers(1, 6))
                iv = [(r * width + c0, r * width + c0 + run) for r in range(r0, r0 + rows)]
            elif kind < 0.7:  # one long or short interval
                lo = int(rng.integers(0, 400))
                iv = [(lo, lo + int(rng.choice([1, 3, 30, 200])))]
            elif kind < 0.9:  # random sorted disjoint intervals
                cuts = np.sort(rng.choice(500, size=2 * int(rng.integers(1, 6)), replace=False))
                iv = [(int(a), int(b)) for a, b in cuts.reshape(-1, 2)]
            else:  # unsorted, overlapping, empty: the plain search
                lo = rng.integers(0, 300, int(rng.integers(1, 4)))
                iv = [(int(a), int(a + rng.integers(0, 20))) for a in lo]
            acc.append((task, pos, write, buffer, len(iv)))
            flat += iv
    table = np.array(acc, dtype=np.int64)
    return table, np.array(flat, dtype=np.int64).reshape(-1, 2), tasks


def all_pairs_edges(table, intervals) -> set:
    starts = np.cumsum(table[:, 4]) - table[:, 4]
    want = set()
    for a in range(len(table)):
        for b in range(len(table)):
            (ta, _, wa, ba, na), (tb, _, wb, bb, nb) = table[a], table[b]
            if ta >= tb or ba != bb or not (wa or wb):
                continue
            ia, ib = intervals[starts[a] : starts[a] + na], intervals[starts[b] : starts[b] + nb]
            if any(x0 < y1 and y0 < x1 for x0, x1 in ia for y0, y1 in ib):
                want.add((int(ta), int(tb)))
    return want


def test_dependencies_match_all_pairs_on_tile_shaped_regions():
    rng = np.random.default_rng(5)
    for _ in range(60):
        table, intervals, tasks = tile_like_accesses(rng)
        u, v = dependencies._dependencies(
            table[:, 0], table[:, 1], table[:, 2].astype(bool), table[:, 3], table[:, 4], intervals, tasks
        )
        got = list(zip(u.tolist(), v.tolist()))
        assert len(got) == len(set(got)) and set(got) == all_pairs_edges(table, intervals)


def test_small_chunks_give_the_same_edges(monkeypatch):
    """Chunking (PAIRS_PER_CHUNK) splits a buffer's pairs; the edges and their order stay."""
    rng = np.random.default_rng(6)
    cases = [tile_like_accesses(rng, buffers=1) for _ in range(10)]

    def run():
        return [
            dependencies._dependencies(t[:, 0], t[:, 1], t[:, 2].astype(bool), t[:, 3], t[:, 4], iv, n)
            for t, iv, n in cases
        ]

    want = run()
    monkeypatch.setattr(dependencies, "PAIRS_PER_CHUNK", 7)
    for (u, v), (wu, wv) in zip(run(), want):
        assert np.array_equal(u, wu) and np.array_equal(v, wv)


# ---- TileDAG ----


def test_tile_dag_adjacency_is_networkx_s():
    """Repeated edges dropped, first-added order kept: predecessors, successors, edges and the
    lazily built graph follow networkx's adjacency order."""
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(1, 30)
        edges = [(rng.randrange(n), rng.randrange(n)) for _ in range(rng.randint(0, 80))]
        edges = [(min(a, b), max(a, b)) for a, b in edges if a != b]
        g = nx.DiGraph()
        g.add_nodes_from(range(n))
        g.add_edges_from(edges)
        tasks = [TileTask(0, (t,), 1.0, str(t)) for t in range(n)]
        for dag in (TileDAG(tasks, edges), TileDAG(tasks, tuple(np.array(x, dtype=np.int64) for x in zip(*edges)))):
            assert dag.number_of_edges() == g.number_of_edges()
            assert dag.edges == list(g.edges)
            for t in range(n):
                assert list(dag.predecessors(t)) == list(g.pred[t])
                assert list(dag.successors(t)) == list(g.succ[t])
            assert list(dag.graph.edges) == list(g.edges)
            assert all(list(dag.graph.pred[t]) == list(g.pred[t]) for t in range(n))


def test_scheduler_handles_edges_against_id_order():
    """A DAG whose edges do not all go from lower to higher ids (hand-made) is scheduled in a
    topological order, as the networkx version does."""
    tasks = [TileTask(0, (t,), float(1 + t % 3), str(t)) for t in range(6)]
    dag = TileDAG(tasks, [(5, 0), (0, 1), (4, 2), (2, 3), (1, 3)])
    from mkcompiler.passes.schedule import list_schedule

    ref = copy.deepcopy(dag)
    got, want = list_schedule(dag, 2), list_schedule_reference(ref, 2)
    assert got.order == want.order and got.worker_lists == want.worker_lists


def test_cache_entries_store_the_dag_arrays_without_building_networkx():
    """tools/cache._dag_data reads TileDAG's arrays: the same predecessor lists, in the order the
    networkx view gives them, and no networkx graph is built to write an entry."""
    from mkcompiler.tools.cache import _dag_data, _rebuild_dag

    torch.manual_seed(0)
    model = TransformerMLP(dim=32, hidden=64, layers=2)
    mk = mkcompiler.compile(model, (torch.randn(4, 32),), cache=False, num_workers=4)
    dag = mk.dag
    data = _dag_data(dag)
    assert dag._graph is None  # writing the entry built no networkx graph
    preds = [list(dag.graph.pred[t]) for t in range(len(dag))]
    assert data.pred_count.tolist() == [len(p) for p in preds] and sum(data.pred_count) > 0
    assert data.pred.tolist() == [u for p in preds for u in p]
    back = _rebuild_dag(data)
    assert list(back.graph.edges) == list(dag.graph.edges)
