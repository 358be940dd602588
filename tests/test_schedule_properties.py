"""Property tests of the counter and scheduling passes on random DAGs (no kernels run).

What must hold for any DAG and worker count, because the queue protocol depends on it: the
global order is topological (dynamic fetch cannot deadlock), every task waits for all of its
predecessors and for nothing else, every wait is met by exactly the signals of its counter,
and the schedule's makespan is a real, achievable finish time no shorter than the critical path.
"""

import re
from collections import Counter

import pytest
from dag_utils import critical_path, dags, queue_from_dag, replay_makespan, scheduled
from hypothesis import given, settings
from hypothesis import strategies as st
from mkcompiler.passes.counters import check_counters
from mkcompiler.passes.verify import check_dynamic

from mkcompiler.errors import MegakernelError
from mkcompiler.ir.dag import TileDAG
from mkcompiler.ir.layout import Field

workers = st.integers(1, 6)


def signallers(dag: TileDAG) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for t, task in enumerate(dag.tasks):
        if task.signal >= 0:
            out.setdefault(task.signal, set()).add(t)
    return out


@settings(deadline=None, max_examples=150)
@given(dags(), workers)
def test_order_is_topological_and_lists_partition_it(dag, num_workers):
    dag, sched = scheduled(dag, num_workers)
    assert sorted(sched.order) == list(range(len(dag)))
    pos = {t: i for i, t in enumerate(sched.order)}
    for u, v in dag.edges:
        assert pos[u] < pos[v], f"edge {u}->{v} runs backwards in the queue"
    assert len(sched.worker_lists) == num_workers
    assert sorted(t for tasks in sched.worker_lists for t in tasks) == list(range(len(dag)))
    for tasks in sched.worker_lists:
        # A worker runs its tasks in start order, which is the global order.
        assert [pos[t] for t in tasks] == sorted(pos[t] for t in tasks)
    check_dynamic(dag, sched.order)


@settings(deadline=None, max_examples=150)
@given(dags())
def test_waits_cover_exactly_the_predecessors(dag):
    dag, _ = scheduled(dag, 1)
    check_counters(dag)
    groups = signallers(dag)
    for t, task in enumerate(dag.tasks):
        # A task signals one counter iff someone needs it.
        assert (task.signal >= 0) == (dag.graph.out_degree(t) > 0)
        waited = [c for c, _ in task.waits]
        assert len(waited) == len(set(waited)), f"task {t} waits twice on one counter"
        preds = set(dag.predecessors(t))
        assert {dag.tasks[p].signal for p in preds} == set(waited)
        for c in waited:
            # Waiting on c needs every signaller of c: they must all be real predecessors,
            # or the wait adds a dependency the DAG does not have.
            assert groups[c] <= preds, f"task {t} waits on counter {c} of non-predecessors {groups[c] - preds}"


@settings(deadline=None, max_examples=150)
@given(dags(), workers)
def test_every_wait_is_met_by_enough_signals(dag, num_workers):
    dag, sched = scheduled(dag, num_workers)
    q = queue_from_dag(dag, sched)
    signals = Counter(int(s) for s in q.rows[:, Field.SIGNAL] if s >= 0)
    assert q.num_counters == len(dag.counter_sizes)
    assert set(signals) == set(range(q.num_counters)), "a counter nobody signals (or out of range)"
    for i in range(len(q)):
        for c, k in q.waits_of(i):
            assert k == signals[c] == dag.counter_sizes[c]


@settings(deadline=None, max_examples=150)
@given(dags(), workers)
def test_makespan_is_achievable_and_bounded(dag, num_workers):
    dag, sched = scheduled(dag, num_workers)
    cp = critical_path(dag)
    total = sum(task.cost for task in dag.tasks)
    assert sched.makespan_ns >= cp
    assert sched.makespan_ns >= total / num_workers - 1e-9
    # Tasks started as soon as possible in the schedule's order finish exactly at its makespan.
    assert sched.makespan_ns == pytest.approx(replay_makespan(dag, sched))
    # Greedy list scheduling never idles a worker while a task is ready (Graham's bound).
    assert sched.makespan_ns <= total / num_workers + cp + 1e-9


@settings(deadline=None, max_examples=150)
@given(dags(), st.data())
def test_check_dynamic_accepts_exactly_topological_orders(dag, data):
    order = data.draw(st.permutations(range(len(dag))))
    pos = {t: i for i, t in enumerate(order)}
    backwards = [(u, v) for u, v in dag.edges if pos[u] > pos[v]]
    if backwards:
        with pytest.raises(MegakernelError, match="not a topological order") as info:
            check_dynamic(dag, order)
        # The message names a real edge that runs backwards, with the right positions.
        m = re.search(
            r"instruction (\d+) \(task (\d+)\) comes before instruction (\d+) \(task (\d+)\)", str(info.value)
        )
        assert m, str(info.value)
        iv, v, iu, u = map(int, m.groups())
        assert (u, v) in backwards and (pos[u], pos[v]) == (iu, iv)
    else:
        check_dynamic(dag, order)


@settings(deadline=None, max_examples=50)
@given(dags(), st.data())
def test_check_dynamic_rejects_missing_or_repeated_tasks(dag, data):
    order = list(range(len(dag)))
    i = data.draw(st.integers(0, len(order) - 1))
    broken = data.draw(st.sampled_from([order[:i] + order[i + 1 :], order + [order[i]]]))
    with pytest.raises(MegakernelError, match="exactly once"):
        check_dynamic(dag, broken)
