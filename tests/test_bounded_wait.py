"""A broken queue must fail fast and loudly, never hang: every wait is bounded (max_spin),
the host raises MegakernelError naming the stuck instruction and counter, and the
megakernel works again once the queue is fixed (the runtime resets counters after an error).
"""

import re
import time

import pytest
import torch
from helpers import TOL, reference, rel_err
from mkcompiler.passes.verify import check_static

import mkcompiler
from mkcompiler import MegakernelError
from mkcompiler.ir.layout import Field

MAX_SPIN = 200
FAST = 10.0  # seconds: a tiny model plus 200 interpreted polls; a hang would be unbounded
OPTIONS = dict(matmul_tile=(16, 16, 16), elementwise_block=32, max_spin=MAX_SPIN)


class MLP(torch.nn.Module):
    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(x)))


@pytest.fixture
def model_and_input():
    torch.manual_seed(0)
    return MLP(), torch.randn(3, 16)


def assert_correct(mk, model, x):
    mk.poison()
    assert rel_err(mk(x), reference(model, (x,))) <= TOL[torch.float32]


def waiters_of(q, counter: int) -> list[int]:
    return [i for i in range(len(q)) if any(c == counter for c, _ in q.waits_of(i))]


def a_waited_on_signal(q) -> tuple[int, int]:
    """An instruction whose signal someone waits for: (instruction, counter)."""
    for i in range(len(q)):
        c = int(q.rows[i, Field.SIGNAL])
        if c >= 0 and waiters_of(q, c):
            return i, c
    raise AssertionError("no instruction signals a counter anyone waits on")


def call_expecting_error(mk, x) -> str:
    start = time.perf_counter()
    with pytest.raises(MegakernelError) as info:
        mk(x)
    elapsed = time.perf_counter() - start
    assert elapsed < FAST, f"a stuck wait took {elapsed:.1f} s to be reported"
    return str(info.value)


def assert_names_a_stuck_waiter(mk, message: str, counter: int, launch: int) -> None:
    m = re.search(
        r"instruction (\d+) \(.*\) on worker \d+ waited for counter (\d+) to reach (\d+) but it was (\d+) \(launch (\d+)\)",
        message,
    )
    assert m, message
    i, c, target, value, reported_launch = map(int, m.groups())
    assert c == counter and i in waiters_of(mk.queue, counter), message
    # Targets are generation-relative: the group size times the launch number.
    assert reported_launch == launch and (c, target // launch) in mk.queue.waits_of(i) and target % launch == 0
    assert value < target, message
    assert f"after {MAX_SPIN} polls" in message


def assert_reset(mk) -> None:
    assert int(mk.counters.abs().sum()) == 0 and int(mk.head.item()) == 0 and int(mk.err.abs().sum()) == 0
    assert mk.generation == 0


def test_missing_signal_fails_fast_and_names_the_wait(model_and_input):
    model, x = model_and_input
    mk = mkcompiler.compile(model, (x,), **OPTIONS)
    assert_correct(mk, model, x)
    original = mk.queue.rows.copy()
    i, c = a_waited_on_signal(mk.queue)
    mk.queue.rows[i, Field.SIGNAL] = -1  # the waiters of c now get one signal too few

    mk.upload_queue(check=False)
    message = call_expecting_error(mk, x)
    assert_names_a_stuck_waiter(mk, message, c, launch=1)  # upload_queue restarted the count
    producers = re.search(rf"instructions that signal counter {c}: \[([\d, ]*)\]", message)
    assert producers and i not in [int(k) for k in producers.group(1).split(",") if k.strip()], message
    assert_reset(mk)

    # The host check refuses the same queue before anything is launched.
    with pytest.raises(MegakernelError, match=rf"waits for \d+ signals on counter {c}, but the queue holds"):
        mk.upload_queue(check=True)

    mk.queue.rows[:] = original
    mk.upload_queue(check=True)
    assert_correct(mk, model, x)
    assert_correct(mk, model, torch.randn(3, 16))  # and again: counters keep counting across launches


def test_runtime_resets_counters_after_an_error(model_and_input):
    """Break only the device copy of the queue, then repair it without upload_queue (which
    would reset counters itself): the next call works only if the error path reset them."""
    model, x = model_and_input
    mk = mkcompiler.compile(model, (x,), **OPTIONS)
    assert_correct(mk, model, x)  # counters now hold a finished launch
    i, c = a_waited_on_signal(mk.queue)
    mk.instr[i, Field.SIGNAL] = -1
    assert_names_a_stuck_waiter(mk, call_expecting_error(mk, x), c, launch=2)
    assert_reset(mk)
    mk.instr[i, Field.SIGNAL] = c
    assert_correct(mk, model, x)


def reversed_lists(mk) -> list[list[int]]:
    return [tasks[::-1] for tasks in mk.compilation.schedule.worker_lists]


def test_check_static_rejects_reversed_worker_lists(model_and_input):
    model, x = model_and_input
    mk = mkcompiler.compile(model, (x,), schedule="static", num_workers=2, **OPTIONS)
    check_static(mk.dag, mk.compilation.schedule.worker_lists)
    with pytest.raises(MegakernelError, match="could deadlock: a cycle of waits"):
        check_static(mk.dag, reversed_lists(mk))


def test_check_static_with_an_order_skips_the_search_only_when_the_order_proves_it(model_and_input, monkeypatch):
    """With the schedule's global order as a witness, lists whose every wait edge goes forward in
    it pass without the graph search; reversed lists (a cycle) still fall back to the search and
    are refused, witness or not."""
    import mkcompiler.passes.verify as verify

    model, x = model_and_input
    mk = mkcompiler.compile(model, (x,), schedule="static", num_workers=2, **OPTIONS)
    sched = mk.compilation.schedule
    searched = []
    real = verify.static_wait_graph
    monkeypatch.setattr(verify, "static_wait_graph", lambda *a: searched.append(1) or real(*a))
    check_static(mk.dag, sched.worker_lists, sched.order)
    assert not searched
    with pytest.raises(MegakernelError, match="could deadlock: a cycle of waits"):
        check_static(mk.dag, reversed_lists(mk), sched.order)
    assert searched
    with pytest.raises(MegakernelError, match="queue is not a topological order"):
        verify.check_dynamic(mk.dag, sched.order[::-1])


def test_reversed_static_queue_fails_fast_in_the_kernel(model_and_input):
    """The host check refuses a reversed static list (a cycle of waits); forced onto the device
    anyway, the bounded wait stops the kernel; the original order then works again."""
    model, x = model_and_input
    mk = mkcompiler.compile(model, (x,), schedule="static", num_workers=1, **OPTIONS)
    assert_correct(mk, model, x)
    q = mk.queue
    original = q.worker_order.copy()
    with pytest.raises(MegakernelError):
        check_static(mk.dag, reversed_lists(mk))
    q.worker_order[:] = original[::-1]
    with pytest.raises(MegakernelError, match="cycle"):
        mk.upload_queue(check=True)
    mk.upload_queue(check=False)
    message = call_expecting_error(mk, x)
    # The worker's first instruction is the last of the queue: it waits on work nobody will do.
    assert re.search(rf"instruction {len(q) - 1} \(", message), message
    assert_reset(mk)
    q.worker_order[:] = original
    mk.upload_queue(check=True)
    assert_correct(mk, model, x)
