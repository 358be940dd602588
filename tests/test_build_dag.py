"""build_dag (all interval pairs at once, with sorted arrays) and the region helpers it calls
(ops/base.py) give exactly what their straightforward task-by-task / element-by-element
versions give: the same DAG down to networkx's adjacency order, the same intervals."""

import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from mkcompiler.ops import base
from mkcompiler.ops.registry import FAMILIES
from mkcompiler.passes import pipeline
from mkcompiler.passes.dependencies import build_dag
from models import TransformerMLP
from test_cache import same_dag

from mkcompiler.frontend.capture import capture
from mkcompiler.ir.dag import TileDAG, TileTask
from mkcompiler.ir.graph import View
from mkcompiler.ir.settings import Settings

# ---- the straightforward versions (build_dag and ops/base.py before they were vectorized) ----


def overlaps(a, b) -> bool:
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][0] < b[j][1] and b[j][0] < a[i][1]:
            return True
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return False


def build_dag_reference(graph) -> TileDAG:
    """Task by task: each tile's accesses against every earlier access of the same buffer."""
    tasks, edges = [], []
    written = {o.buffer for op in graph.ops for o in op.outputs}
    writers, readers = defaultdict(list), defaultdict(list)  # buffer -> [(task, intervals)]

    def overlapping(index, intervals):
        return [t for t, iv in index if iv and intervals and overlaps(iv, intervals)]

    task = 0
    for op_index, op in enumerate(graph.ops):
        fam = FAMILIES[op.kind]
        for coords in fam.tiles(op):
            reads, writes = fam.regions(op, coords)
            tasks.append(TileTask(op_index, tuple(coords), fam.cost(op, coords), fam.describe(op, coords)))
            for acc in reads:
                if acc.buffer in written:
                    edges += [(w, task) for w in overlapping(writers[acc.buffer], acc.intervals)]
            for acc in writes:
                earlier = overlapping(writers[acc.buffer], acc.intervals)
                earlier += overlapping(readers[acc.buffer], acc.intervals)
                edges += [(w, task) for w in earlier if w != task]
            for acc in reads:
                if acc.buffer in written:
                    readers[acc.buffer].append((task, acc.intervals))
            for acc in writes:
                writers[acc.buffer].append((task, acc.intervals))
            task += 1
    return TileDAG(tasks, edges)


def box_access_reference(view: View, box) -> base.Access:
    sub = view
    for d, (lo, hi) in enumerate(box):
        sub = sub.slice(d, lo, hi)
    if sub.numel == 0:
        return base.Access(view.buffer, ())
    c = sub.coalesced()
    if c.strides[-1] == 1:
        run = c.shape[-1]
        outer = View(c.buffer, c.dtype, c.shape[:-1] or (1,), c.strides[:-1] or (0,), c.offset)
    else:
        run, outer = 1, c
    if outer.numel > 4 * base.MAX_INTERVALS:
        lo, hi = c.span()
        return base.Access(view.buffer, ((lo, hi),))
    starts = outer.offsets()
    return base.Access(view.buffer, base.merge_intervals((int(s), int(s) + run) for s in starts))


def linear_access_reference(view: View, start: int, end: int) -> base.Access:
    end = min(end, view.numel)
    if view.is_contiguous():
        return base.Access(view.buffer, ((view.offset + start, view.offset + end),))
    idx = np.arange(start, end, dtype=np.int64)
    off = np.full_like(idx, view.offset)
    for size, stride in zip(reversed(view.shape), reversed(view.strides)):
        off += (idx % size) * stride
        idx //= size
    return base.Access(view.buffer, base.offsets_intervals(off))


# ---- region helpers ----


def random_view(rng: random.Random) -> View:
    rank = rng.randint(0, 4)
    shape = tuple(rng.choice([0, 1, 1, 2, 3, 4, 5, 8, 16, 64, 70]) for _ in range(rank))
    if rng.random() < 0.4:  # a permuted contiguous tensor (transposes, heads)
        v = View(0, torch.float32, shape, tuple(torch.empty(shape).stride()), rng.randint(0, 50))
        perm = list(range(rank))
        rng.shuffle(perm)
        v = v.permute(perm) if rank else v
    else:  # anything: broadcast (0), overlapping, negative strides
        strides = tuple(rng.choice([0, 1, 2, 3, 5, 64, 100, -1, -3]) for _ in range(rank))
        v = View(0, torch.float32, shape, strides, rng.randint(0, 1000))
    if rank and rng.random() < 0.3:
        v = v.slice(rng.randrange(rank), 1, rng.randint(1, 40))
    return v


def test_region_helpers_match_their_element_by_element_versions():
    rng = random.Random(0)
    for _ in range(3000):
        v = random_view(rng)
        box = tuple((rng.randint(-3, s), rng.randint(-2, s + 3)) for s in v.shape[: rng.randint(0, v.rank)])
        assert base.box_access(v, box) == box_access_reference(v, box), (v, box)
        n = v.numel
        start = rng.randint(-5, 3) if rng.random() < 0.05 else rng.randint(0, max(n, 1))
        end = rng.randint(start, n + 3)
        with np.errstate(divide="ignore"):  # size-0 dims in the element-by-element version
            got, want = base.linear_access(v, start, end), linear_access_reference(v, start, end)
        assert got == want, (v, start, end)
        assert all(type(x) is int for iv in got.intervals for x in iv)


def test_runs_intervals_is_merge_intervals():
    rng = random.Random(1)
    for _ in range(2000):
        n = rng.randint(1, 150)
        lo = [rng.randint(0, 400) for _ in range(n)]
        hi = [x + rng.randint(1, 12) for x in lo]
        got = base.runs_intervals(np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64))
        assert got == base.merge_intervals(zip(lo, hi))


# ---- build_dag ----


def graph_before_dag(model, inputs, num_workers):
    comp = pipeline.Compilation(capture(model, inputs), Settings().for_target(), num_workers)
    for name, step, _ in pipeline.PIPELINE:
        if name == "build_dag":
            return comp.graph
        step(comp)


def llama(tokens: int, workers: int):
    from examples.llama import random_llama

    model = random_llama("tiny", max_seq_len=256)  # long enough for split-KV decode
    return model, (torch.zeros(1, tokens, dtype=torch.long), torch.arange(tokens) + (7 if tokens == 1 else 0))


@pytest.mark.parametrize(
    "case",
    [
        lambda: (TransformerMLP(), (torch.randn(4, 32),), 4),
        lambda: (TransformerMLP(dim=64, hidden=96, layers=3), (torch.randn(37, 64),), 132),  # split-K, ragged
        lambda: (*llama(1, 132), 132),  # decode: split-KV, scatter into the KV cache
        lambda: (*llama(24, 16), 16),  # prefill: causal attention, many tiles per output
    ],
    ids=["mlp", "mlp split-K", "llama decode", "llama prefill"],
)
def test_build_dag_matches_the_task_by_task_version(case):
    model, inputs, workers = case()
    graph = graph_before_dag(model, inputs, workers)
    dag = build_dag(graph)
    ref = build_dag_reference(graph)
    assert dag.number_of_edges() > 0
    same_dag(dag, ref)
    assert list(dag.edges) == list(ref.edges)


def test_build_dag_with_degenerate_and_overlapping_writes():
    """Overlapping writers of one buffer (in-place updates), empty accesses, many buffers."""
    from mkcompiler.passes import dependencies

    rng = np.random.default_rng(2)
    for _ in range(30):
        n = int(rng.integers(1, 120))
        acc_task = np.sort(rng.integers(0, 40, n))
        acc_pos = rng.integers(0, 4, n)
        acc_write = rng.random(n) < 0.5
        acc_buffer = rng.integers(0, 3, n)
        counts = rng.integers(1, 4, n)
        lo = rng.integers(0, 200, counts.sum())
        iv = np.stack([lo, lo + rng.integers(0, 30, len(lo))], 1)  # zero-length intervals too
        u, v = dependencies._dependencies(acc_task, acc_pos, acc_write, acc_buffer, counts, iv, 40)
        want = set()
        starts = np.cumsum(counts) - counts
        for a in range(n):
            for b in range(n):
                ta, tb = acc_task[a], acc_task[b]
                if ta >= tb or acc_buffer[a] != acc_buffer[b] or not (acc_write[a] or acc_write[b]):
                    continue
                ia = iv[starts[a] : starts[a] + counts[a]]
                ib = iv[starts[b] : starts[b] + counts[b]]
                if any(x0 < y1 and y0 < x1 for x0, x1 in ia for y0, y1 in ib):
                    want.add((int(ta), int(tb)))
        assert set(zip(u.tolist(), v.tolist())) == want
        assert len(u) == len(want)


def compile_to_schedule(model, inputs, num_workers: int, **settings):
    comp = pipeline.Compilation(capture(model, inputs), Settings(**settings).for_target(), num_workers)
    for name, step, _ in pipeline.PIPELINE:
        step(comp)
        if name == "schedule":
            return comp


@pytest.mark.parametrize("tile", [(128, 128, 64), (256, 128, 64)], ids=["128 rows", "256 rows"])
def test_tall_tiles_of_one_matmul_do_not_wait_on_each_other(tile):
    """A large-M tile writes one interval per output row. Its region stays exact up to
    base.MAX_INTERVALS rows: a bounding interval would overlap every tile of the same rows, and
    each tile would wait for all tiles left of it (the Gluon prefill's 128-row tiles did: 8B MLP,
    2048 tokens, up to 93 waits per gate tile, SMs waiting 80% of the kernel)."""
    comp = compile_to_schedule(torch.nn.Linear(64, 512, bias=False), (torch.randn(512, 64),), 16, matmul_tile=tile)
    dag = comp.dag
    tasks = [t for t in dag.tasks if comp.graph.ops[t.op].kind == "matmul"]
    assert len(tasks) == (512 // tile[0]) * (512 // 128)
    assert dag.number_of_edges() == 0


def test_schedule_stats_show_tiles_of_one_op_waiting_on_each_other(monkeypatch):
    """passes/schedule.schedule_stats (inspect's schedule section): the makespan is never below
    its bounds, and regions too coarse for the tiles (here: MAX_INTERVALS back at 64 under
    128-row tiles) show as edges inside the matmul and a longer critical path."""
    from mkcompiler.passes.schedule import bottom_levels, schedule_stats

    model, x = torch.nn.Linear(64, 512, bias=False), torch.randn(512, 64)

    def stats():
        base._box_intervals.cache_clear()  # memoized per box, not per limit
        comp = compile_to_schedule(model, (x,), 16, matmul_tile=(128, 128, 64))
        st = schedule_stats(comp.dag, comp.schedule, 16)
        assert st.work_bound_ns == pytest.approx(sum(t.cost for t in comp.dag.tasks) / 16)
        assert st.critical_path_ns == pytest.approx(max(bottom_levels(comp.dag)))
        assert st.makespan_ns >= max(st.work_bound_ns, st.critical_path_ns) * (1 - 1e-9)
        return comp, st

    comp, exact = stats()
    assert exact.intra_op_edges == {} and 0 < exact.efficiency <= 1
    monkeypatch.setattr(base, "MAX_INTERVALS", 64)
    try:
        comp, coarse = stats()
    finally:
        base._box_intervals.cache_clear()
    (op,) = coarse.intra_op_edges
    assert comp.graph.ops[op].kind == "matmul" and coarse.intra_op_edges[op] > 0
    assert coarse.critical_path_ns > exact.critical_path_ns
