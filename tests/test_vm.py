"""The reference VM: queues from the scheduling passes never deadlock under any interleaving,
bad static schedules always do, and real tilings of a model compute the eager result.

The VM is the executable spec of the queue protocol (fetch, wait for count x generation,
run, signal), so these properties say the passes produce queues the kernel can run in any
order the hardware picks; the seeds and hypothesis choose which worker moves next.
"""

import re

import networkx as nx
import numpy as np
import pytest
import torch
from dag_utils import dags, make_dag, queue_from_dag, scheduled, static_queue
from helpers import TOL, reference, rel_err
from hypothesis import event, given, settings
from hypothesis import strategies as st
from mkcompiler.passes.counters import assign_counters
from mkcompiler.passes.verify import check_static, static_wait_graph

import mkcompiler
from mkcompiler.errors import MegakernelError
from mkcompiler.ir.layout import Field
from mkcompiler.vm import VMDeadlock, run_megakernel, run_queue

SEEDS = 12
workers = st.integers(1, 6)


def run_and_check(dag, q, *, dynamic, seed=0, choose=None, counters=None, generation=1, lookahead=False):
    """Run q on the VM, checking that every instruction runs once, after its DAG predecessors."""
    task_of = q.rows[:, Field.TASK]
    done: set[int] = set()

    def execute(i):
        t = int(task_of[i])
        assert t not in done, f"task {t} ran twice"
        missing = set(dag.predecessors(t)) - done
        assert not missing, f"task {t} ran before its predecessors {sorted(missing)}"
        done.add(t)

    res = run_queue(
        q,
        execute,
        dynamic=dynamic,
        seed=seed,
        choose=choose,
        counters=counters,
        generation=generation,
        lookahead=lookahead,
    )
    assert sorted(res.executed) == list(range(len(q)))
    assert done == set(range(len(dag)))
    return res


def assert_counters_at_target(dag, counters, generation):
    sizes = np.array(dag.counter_sizes, dtype=np.int64)
    assert (counters[: len(sizes)] == sizes * generation).all()


def check_two_generations(dag, q, *, dynamic, seed):
    """Counters are never reset between launches: the second runs against count x 2."""
    counters = np.zeros(max(q.num_counters, 1), dtype=np.int64)
    for generation in (1, 2):
        run_and_check(dag, q, dynamic=dynamic, seed=seed + generation, counters=counters, generation=generation)
        assert_counters_at_target(dag, counters, generation)


# ---- queues from list_schedule ----


@settings(deadline=None, max_examples=60)
@given(dags(), workers)
def test_scheduled_queues_never_deadlock_on_seeded_interleavings(dag, num_workers):
    dag, sched = scheduled(dag, num_workers)
    q = queue_from_dag(dag, sched)
    for dynamic in (True, False):
        for seed in range(SEEDS):
            check_two_generations(dag, q, dynamic=dynamic, seed=100 * seed)


@settings(deadline=None, max_examples=100)
@given(dags(), workers, st.booleans(), st.data())
def test_scheduled_queues_never_deadlock_on_chosen_interleavings(dag, num_workers, dynamic, data):
    dag, sched = scheduled(dag, num_workers)
    q = queue_from_dag(dag, sched)
    res = run_and_check(dag, q, dynamic=dynamic, choose=lambda moves: data.draw(st.sampled_from(moves)))
    assert_counters_at_target(dag, res.counters, 1)
    if not dynamic:  # each worker ran exactly its own list
        lists = [sorted(q.worker_order[q.worker_begin[w] : q.worker_begin[w + 1]]) for w in range(num_workers)]
        assert all(sorted(i for i, w in res.worker_of.items() if w == k) == lists[k] for k in range(num_workers))


@settings(deadline=None, max_examples=100)
@given(dags(), workers, st.data())
def test_fetch_ahead_never_deadlocks_on_scheduled_queues(dag, num_workers, data):
    """The kernel's dynamic loop takes the next index before waiting on the one it holds
    (codegen.LOOP_HEAD). A topological queue still finishes under any interleaving, over two
    launches (counters never reset)."""
    dag, sched = scheduled(dag, num_workers)
    q = queue_from_dag(dag, sched)
    counters = np.zeros(max(q.num_counters, 1), dtype=np.int64)
    for generation in (1, 2):
        choose = lambda moves: data.draw(st.sampled_from(moves))  # noqa: E731
        run_and_check(dag, q, dynamic=True, choose=choose, counters=counters, generation=generation, lookahead=True)
        assert_counters_at_target(dag, counters, generation)


def test_fetch_ahead_is_modelled():
    """With fetch-ahead an out-of-order queue can deadlock where single fetches finish: worker 0
    holds B (which needs A) and takes A ahead of it, so A never runs."""
    dag, sched = scheduled(make_dag(2, [(0, 1)], [1, 1]), 2)
    q = queue_from_dag(dag, sched)
    order = [int(np.nonzero(q.rows[:, Field.TASK] == t)[0][0]) for t in (1, 0)]  # B first, then A
    q.rows = q.rows[order]
    w0_first = lambda moves: 0 if 0 in moves else moves[0]  # noqa: E731
    run_queue(q, lambda i: None, dynamic=True, choose=w0_first)  # finishes: worker 1 runs A
    with pytest.raises(VMDeadlock):
        run_queue(q, lambda i: None, dynamic=True, choose=w0_first, lookahead=True)


def test_waiting_on_too_few_signals_deadlocks():
    """The VM is a real check: a wait one signal short (here: a lost signal) never finishes."""
    dag, sched = scheduled(make_dag(3, [(0, 2), (1, 2)], [1, 1, 1]), 2)
    q = queue_from_dag(dag, sched)
    q.rows[q.rows[:, Field.TASK] == 1, Field.SIGNAL] = -1
    with pytest.raises(VMDeadlock, match=r"counter \d+ = 1 < 2"):
        run_queue(q, lambda i: None, dynamic=True)


# ---- hand-made static lists ----


@st.composite
def worker_lists(draw, dag):
    """Random tasks per worker; each list sorted by id (always fine), shuffled, or sorted but
    for one swapped neighbour pair (fine iff the two tasks are independent)."""
    n_workers = draw(workers)
    owner = draw(st.lists(st.integers(0, n_workers - 1), min_size=len(dag), max_size=len(dag)))
    lists = [[t for t in range(len(dag)) if owner[t] == w] for w in range(n_workers)]
    mode = draw(st.sampled_from(["sorted", "shuffled", "one_swap"]))
    if mode == "shuffled":
        lists = [draw(st.permutations(tasks)) for tasks in lists]
    elif mode == "one_swap":
        w = draw(st.integers(0, n_workers - 1))
        if len(lists[w]) >= 2:
            i = draw(st.integers(0, len(lists[w]) - 2))
            lists[w][i], lists[w][i + 1] = lists[w][i + 1], lists[w][i]
    return [list(tasks) for tasks in lists]


def stuck_tasks(dag, lists) -> set[int]:
    """Tasks on a cycle of waits, or waiting (through DAG or worker order) on one."""
    g = static_wait_graph(dag, lists)
    on_cycle = {t for scc in nx.strongly_connected_components(g) if len(scc) > 1 for t in scc}
    return on_cycle.union(*(nx.descendants(g, t) for t in on_cycle))


@settings(deadline=None, max_examples=150)
@given(dags(), st.data())
def test_check_static_accepts_exactly_the_schedules_the_vm_finishes(dag, data):
    dag = assign_counters(dag)
    lists = data.draw(worker_lists(dag))
    q = static_queue(dag, lists)
    acyclic = nx.is_directed_acyclic_graph(static_wait_graph(dag, lists))
    event(f"acyclic={acyclic}")
    if acyclic:
        check_static(dag, lists)
        for seed in range(SEEDS):
            check_two_generations(dag, q, dynamic=False, seed=seed)
        return
    with pytest.raises(MegakernelError, match="could deadlock") as info:
        check_static(dag, lists)
    # The reported cycle is one: each task waits on the next (DAG edge or earlier on its worker).
    cycle = [int(t) for t in re.findall(r"\d+", str(info.value).split("through tasks")[1])]
    g = static_wait_graph(dag, lists)
    assert all(g.has_edge(u, v) for u, v in zip(cycle, cycle[1:] + cycle[:1])), (cycle, lists)
    stuck = stuck_tasks(dag, lists)
    for seed in range(SEEDS):
        ran: set[int] = set()
        with pytest.raises(VMDeadlock) as info:
            run_queue(q, lambda i, ran=ran: ran.add(int(q.rows[i, Field.TASK])), dynamic=False, seed=seed)
        held = [int(i) for i in re.findall(r"holds instruction (\d+)", str(info.value))]
        assert held and all(int(q.rows[i, Field.TASK]) in stuck for i in held), str(info.value)
        # Exactly the tasks not held up by a cycle ran, whatever the interleaving.
        assert ran == set(range(len(dag))) - stuck


def test_check_static_rejects_a_list_missing_a_task():
    dag = assign_counters(make_dag(3, [(0, 1), (1, 2)]))
    with pytest.raises(MegakernelError, match="exactly once"):
        check_static(dag, [[0, 1], []])


# ---- real model tilings ----


class MLP(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(x)))


@settings(deadline=None, max_examples=10)
@given(
    rows=st.integers(1, 9),
    dim=st.integers(8, 48),
    hidden=st.integers(8, 48),
    matmul_tile=st.sampled_from([(16, 16, 16), (16, 32, 16), (32, 16, 32)]),
    elementwise_block=st.sampled_from([16, 32, 64]),
    row_block=st.integers(1, 3),
    num_workers=st.integers(1, 4),
    schedule=st.sampled_from(["dynamic", "static"]),
    seed=st.integers(0, 2**16),
)
def test_random_tilings_of_an_mlp_match_eager(
    rows, dim, hidden, matmul_tile, elementwise_block, row_block, num_workers, schedule, seed
):
    gen = torch.Generator().manual_seed(seed)
    model = MLP(dim, hidden)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    x = torch.randn(rows, dim, generator=gen)
    mk = mkcompiler.compile(
        model,
        (x,),
        matmul_tile=matmul_tile,
        elementwise_block=elementwise_block,
        row_block=row_block,
        num_workers=num_workers,
        schedule=schedule,
    )
    ref = reference(model, (x,))
    for vm_seed in range(3):
        mk.poison()
        out, res = run_megakernel(mk, x, seed=vm_seed)
        assert len(res.executed) == len(mk.queue)
        assert rel_err(out, ref) <= TOL[torch.float32]
