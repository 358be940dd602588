"""The Gluon decode backend's CPU-side foundation (issue 17): the per-SM plan
(backends/gluon/plan.py) and the model of its weight ring (backends/gluon/ring.py). No kernel runs.

What must hold for any schedule, because the kernel's loader and compute partitions only share a
FIFO: the loader's walk equals the compute walk on every worker (derived independently: from the
encoded queue and from the DAG's ops); a launch with rings of any depth >= 1, under any
interleaving of loaders, copies in flight and compute, completes exactly when the static check
accepts the lists (the loader never waits on a counter, so the ring adds no waits); weight
stacking puts every weight in exactly one group; a tiny Llama decode step needs few descriptors.
"""

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dag_utils import counted, dags, make_dag, scheduled, static_queue
from hypothesis import event, given, settings
from hypothesis import strategies as st
from mkcompiler.passes.pipeline import run_pipeline
from mkcompiler.passes.verify import check_static

from mkcompiler.backends.gluon.plan import (
    LoaderStep,
    PlanError,
    WeightTensor,
    WorkerPlan,
    build_plan,
    decode_plan,
    k_blocks,
    stack_key,
    stack_weights,
)
from mkcompiler.backends.gluon.ring import Actor, Ring, RingError, simulate
from mkcompiler.errors import MegakernelError
from mkcompiler.frontend.capture import capture
from mkcompiler.ir.graph import BufferKind
from mkcompiler.ir.layout import Field
from mkcompiler.ir.settings import Settings
from mkcompiler.vm import VMDeadlock, run_queue

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is not an installed package
from examples.llama import random_llama  # noqa: E402

depths = st.integers(1, 5)
seeds = st.integers(0, 2**16)


def weight(buffer: int, n: int = 64, k: int = 128, dtype=torch.bfloat16, whole: bool = True) -> WeightTensor:
    return WeightTensor(buffer, 0, n, k, k, 1, dtype, whole, f"w{buffer}")


def synthetic_blocks(dag, loads_per_task: list[int]):
    """blocks_of(i) for a bare-DAG queue: task t loads loads_per_task[t] K blocks of weight t."""
    per_task = [k_blocks(weight(t, k=64 * max(c, 1)), 0, 64, 0, 64 * c, 64, 64) for t, c in enumerate(loads_per_task)]
    return per_task


def dag_plan(queue, per_task):
    def blocks(i):
        return per_task[int(queue.rows[i, Field.TASK])]

    return build_plan(queue, blocks, blocks)


@st.composite
def dag_schedules(draw):
    """A counted DAG, static worker lists (the scheduler's, or any assignment and order), and how
    many weight blocks each task loads (0: not a matmul)."""
    dag = draw(dags(max_nodes=24))
    n = len(dag)
    workers = draw(st.integers(1, 5))
    if draw(st.booleans()):
        dag, sched = scheduled(dag, workers)
        lists = sched.worker_lists
    else:
        dag = counted(dag)
        order = draw(st.permutations(range(n)))
        owner = draw(st.lists(st.integers(0, workers - 1), min_size=n, max_size=n))
        lists = [[t for t in order if owner[t] == w] for w in range(workers)]
    loads = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    return dag, lists, loads


def accepted(dag, lists) -> bool:
    try:
        check_static(dag, lists)
    except MegakernelError:
        return False
    return True


@settings(deadline=None, max_examples=150)
@given(dag_schedules(), depths, seeds)
def test_ring_completes_exactly_when_the_static_check_accepts(case, depth, seed):
    dag, lists, loads = case
    queue = static_queue(dag, lists)
    plan = dag_plan(queue, synthetic_blocks(dag, loads))
    plan.check()
    for p in plan.workers:  # the loader's walk: every matmul's blocks in list order, K order within
        want = [i for i in p.instructions for _ in range(loads[queue.rows[i, Field.TASK]])]
        assert [s.instruction for s in p.loads] == want
        assert all(a.block.k0 < b.block.k0 for a, b in zip(p.loads, p.loads[1:]) if a.instruction == b.instruction)
    res = simulate(queue, plan.workers, depth, seed=seed)
    event(f"completed: {res.completed}")
    assert res.completed == accepted(dag, lists), res.story()
    if not res.completed:
        # a cycle of waits: some compute waits on a counter; a loader is stuck only behind its own compute
        assert any(s.actor is Actor.COMPUTE and s.reason.startswith("counter") for s in res.stuck), res.story()
        computes = {s.worker for s in res.stuck if s.actor is Actor.COMPUTE}
        assert all(s.worker in computes for s in res.stuck if s.actor is Actor.LOADER), res.story()
        with pytest.raises(VMDeadlock):
            res.raise_if_deadlocked()
        return
    tasks = [int(queue.rows[i, Field.TASK]) for i in res.executed]
    assert sorted(tasks) == list(range(len(dag)))
    ran = {t: p for p, t in enumerate(tasks)}
    assert all(ran[u] < ran[v] for u, v in dag.edges)
    vm = run_queue(queue, lambda i: None, dynamic=False, seed=seed)
    assert np.array_equal(res.counters, vm.counters)


@settings(deadline=None, max_examples=60)
@given(dag_schedules(), depths, seeds)
def test_a_loader_walk_that_differs_never_passes(case, depth, seed):
    """Drop, add or swap one load of one worker: the plan check and the ring both refuse it."""
    dag, lists, loads = case
    queue = static_queue(dag, lists)
    plan = dag_plan(queue, synthetic_blocks(dag, loads))
    w = next((p.worker for p in plan.workers if p.loads), None)
    if w is None or not accepted(dag, lists):
        return
    good = plan.workers[w]
    extra = LoaderStep(good.loads[-1].instruction, k_blocks(weight(10_000), 0, 64, 0, 64, 64, 64)[0])
    broken = [good.loads[:-1], good.loads + (extra,)]
    if len(good.loads) > 1 and good.loads[0] != good.loads[-1]:
        broken.append((good.loads[-1],) + good.loads[1:-1] + (good.loads[0],))
    for loads_w in broken:
        bad = WorkerPlan(w, good.instructions, loads_w, good.computes)
        with pytest.raises(PlanError):
            bad.check()
        workers = plan.workers[:w] + (bad,) + plan.workers[w + 1 :]
        try:
            res = simulate(queue, workers, depth, seed=seed)
        except RingError:
            event("ring error")
            continue
        event("stuck")
        assert not res.completed
        assert any(s.worker == w for s in res.stuck), res.story()


def test_the_loader_streams_ahead_of_every_wait():
    """A chooser that runs loaders and copies whenever it can, on a chain (every instruction waits
    for the one before, on another worker): with a deep ring, every loader issues its whole walk
    before any compute partition moves, so no loader waited on a counter."""
    dag = counted(make_dag(9, [(t, t + 1) for t in range(8)], [1] * 9))
    _, sched = scheduled(dag, 3)
    queue = static_queue(dag, sched.worker_lists)
    plan = dag_plan(queue, synthetic_blocks(dag, [2] * len(dag)))
    offered = []

    def loaders_first(moves):
        offered.append({m.actor for m in moves})
        early = [m for m in moves if m.actor is not Actor.COMPUTE]
        return (early or moves)[0]

    res = simulate(queue, plan.workers, depth=64, choose=loaders_first)
    assert res.completed, res.story()
    first_compute = next(k for k, actors in enumerate(offered) if actors == {Actor.COMPUTE})
    assert first_compute == 2 * sum(len(p.loads) for p in plan.workers)  # an issue and an arrival per load
    assert all(lead == len(p.instructions) - 1 for lead, p in zip(res.max_lead, plan.workers) if p.loads)


def test_ring_protocol():
    ring = Ring(2)
    a, b, c = (LoaderStep(i, k_blocks(weight(i), 0, 64, 0, 64, 64, 64)[0]) for i in range(3))
    assert ring.issue(a) == 0 and ring.issue(b) == 1
    assert not ring.can_issue()
    with pytest.raises(RingError):
        ring.issue(c)
    with pytest.raises(RingError):
        ring.consume(a)  # not arrived
    ring.arrive(1)
    ring.arrive(0)
    with pytest.raises(RingError):
        ring.consume(b)  # slot 0 holds a
    ring.consume(a)
    assert ring.can_issue()
    assert ring.issue(c) == 2
    with pytest.raises(ValueError):
        Ring(0)


# ---- stacking ----


@st.composite
def weight_lists(draw):
    shape = st.tuples(st.sampled_from([32, 64, 128]), st.sampled_from([64, 128]))
    shapes = draw(st.lists(shape, min_size=1, max_size=4))
    ws = []
    for b in range(draw(st.integers(0, 30))):
        n, k = draw(st.sampled_from(shapes))
        dtype = draw(st.sampled_from([torch.bfloat16, torch.float32]))
        ws.append(weight(b, n, k, dtype, whole=draw(st.integers(0, 4)) > 0))
    return ws + draw(st.lists(st.sampled_from(ws), max_size=5)) if ws else ws  # some used twice


@settings(deadline=None, max_examples=200)
@given(weight_lists())
def test_stacking_covers_every_weight_once(ws):
    layout = stack_weights(ws)
    members = [w for g in layout.groups for w in g.members]
    assert sorted(members, key=lambda w: w.buffer) == sorted(set(ws), key=lambda w: w.buffer)
    assert len(members) == len(set(members))
    assert set(layout.slots) == set(ws)
    for g, group in enumerate(layout.groups):
        keys = {stack_key(w) for w in group.members}
        assert keys == {group.key}
        if group.key is None:
            assert len(group.members) == 1
        rows = 0
        for index, w in enumerate(group.members):
            assert layout.slots[w].group == g and layout.slots[w].index == index and layout.slots[w].row0 == rows
            rows += w.n
        assert rows == group.rows
    # as few groups as keys: one per stackable key, one per weight that cannot be stacked
    stackable = {stack_key(w) for w in ws if stack_key(w) is not None}
    alone = {w for w in ws if stack_key(w) is None}
    assert len(layout.groups) == len(stackable) + len(alone)


# ---- a tiny Llama decode step, through the real passes ----


@pytest.fixture(scope="module")
def llama_graph():
    model = random_llama("tiny", dtype=torch.bfloat16)
    return capture(model, (torch.tensor([[3]]), torch.tensor([5])))


def compiled(graph, num_workers: int, **options):
    settings_ = Settings().replace(schedule="static", **options).for_target()
    return run_pipeline(copy.deepcopy(graph), settings_, num_workers)


def matmul_weights(c) -> set[int]:
    """Buffers of the weights the decode step's matmuls read."""
    return {
        op.inputs[1].buffer
        for op in c.graph.ops
        if op.kind == "matmul" and c.graph.buffers[op.inputs[1].buffer].kind == BufferKind.PARAM
    }


@settings(deadline=None, max_examples=25)
@given(st.integers(1, 12), st.sampled_from([None, 1, 2, 3]), depths, seeds)
def test_llama_walks_agree_and_the_ring_completes(llama_graph, num_workers, split_k, depth, seed):
    c = compiled(llama_graph, num_workers, split_k=split_k)
    plan = decode_plan(c.graph, c.dag, c.queue)  # the loader's (queue) and compute's (DAG) walks agree
    res = simulate(c.queue, plan.workers, depth, seed=seed)
    assert res.completed, res.story()
    assert sorted(res.executed) == list(range(len(c.queue)))
    vm = run_queue(c.queue, lambda i: None, dynamic=False, seed=seed)
    assert np.array_equal(res.counters, vm.counters)
    # Each weight's blocks tile it exactly once (one row block: decode has one row).
    assert {w.buffer for w in plan.weights} == matmul_weights(c)
    for w in plan.weights:
        seen = np.zeros((w.n, w.k), dtype=np.int64)
        for s in plan.blocks():
            if s.block.weight == w:
                seen[s.block.n0 : s.block.n1, s.block.k0 : s.block.k1] += 1
        assert (seen == 1).all(), w.name


@pytest.mark.parametrize("num_workers", [4, 132])
def test_llama_needs_few_descriptors(llama_graph, num_workers):
    c = compiled(llama_graph, num_workers)
    plan = decode_plan(c.graph, c.dag, c.queue)
    # wq/wo, wk/wv, gate/up, down, lm_head: 15 weights, 5 stacked buffers
    assert len(plan.weights) == 15
    assert len(plan.stacks.groups) == 5
    assert all(g.key is not None for g in plan.stacks.groups)
    assert len(plan.descriptors()) <= 8, plan.descriptors()
    names = {frozenset(w.name.split(".", 2)[-1] for w in g.members) for g in plan.stacks.groups}
    assert frozenset({"attn.wq.weight", "attn.wo.weight"}) in names
    # distinct blocks land at distinct TMA coordinates of the stacked buffers
    coords = {(plan.stacks.locate(s.block), s.block.weight) for s in plan.blocks()}
    assert len({xy for xy, _ in coords}) == len(coords)
