"""Launch safety: a grid that cannot be co-resident is refused at compile time; a kernel error
leaves the Megakernel usable (counters reset) for either schedule; compiled models keep their
own state when used alternately or from two Python threads.

The interpreter is not thread-safe (a launch sets a global grid index and patches
triton.language until it ends), so runtime.INTERPRETER_LOCK serialises interpreted launches;
each Megakernel also takes its own lock per call (bind, launch, check and outputs share its
buffers). The thread tests shrink the GIL switch interval so that, without those locks, the
threads really interleave inside launches (checked by hand: they then fail).
"""

import contextlib
import os
import sys
import threading

import pytest
import torch
from helpers import TOL, reference, rel_err
from models import ResidualMLP

import mkcompiler
import mkcompiler.runtime.megakernel as runtime
from mkcompiler import MegakernelError
from mkcompiler.backends.triton import threaded_interp
from mkcompiler.ir.layout import NUM_VIEW_FIELDS, Field, ViewField

MAX_SPIN = 200
OPTIONS = dict(matmul_tile=(16, 16, 16), elementwise_block=32, row_block=1, max_spin=MAX_SPIN)
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def layer_norm_mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.GELU(), torch.nn.LayerNorm(12))


def assert_correct(mk, model, x) -> None:
    mk.poison()
    assert rel_err(mk(x), reference(model, (x,))) <= TOL[torch.float32]


# ---- co-residency ----


@pytest.fixture
def two_sms(monkeypatch):
    """Pretend the device holds at most two resident workers (as on a 2-SM GPU)."""
    monkeypatch.setattr(runtime, "max_workers", lambda device, interpret, per_sm=1: 2 * per_sm)


def test_more_workers_than_sms_is_refused_before_capture(two_sms, monkeypatch):
    captured = []
    monkeypatch.setattr(mkcompiler.api, "capture", lambda *a: captured.append(a))
    with pytest.raises(
        ValueError,
        match=r"num_workers=3 is more than can be co-resident on cpu \(2 SMs x workers_per_sm=1\).*num_workers <= 2",
    ):
        mkcompiler.compile(layer_norm_mlp(), (torch.randn(4, 8),), num_workers=3, **OPTIONS)
    assert not captured  # refused up front, not after the slow part


def test_as_many_workers_as_sms_is_accepted(two_sms):
    torch.manual_seed(0)
    model, x = layer_norm_mlp(), torch.randn(4, 8)
    mk = mkcompiler.compile(model, (x,), num_workers=2, **OPTIONS)
    assert mk.num_workers == 2
    assert_correct(mk, model, x)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4"])
def test_num_workers_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=rf"num_workers must be a positive integer, got {bad!r}"):
        mkcompiler.compile(layer_norm_mlp(), (torch.randn(4, 8),), num_workers=bad)


@pytest.mark.gpu
def test_gpu_refuses_a_grid_larger_than_the_sm_count():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    model, x = layer_norm_mlp().cuda(), torch.randn(4, 8, device="cuda")
    with pytest.raises(
        ValueError, match=rf"num_workers={sms + 1} is more than can be co-resident .*\({sms} SMs x workers_per_sm=1\)"
    ):
        mkcompiler.compile(model, (x,), num_workers=sms + 1)
    mk = mkcompiler.compile(model, (x,), num_workers=sms)
    assert_correct(mk, model, x)


@pytest.mark.gpu
def test_gpu_two_workers_per_sm_run_or_are_refused_clearly():
    """Two programs per SM: correct when they fit (num_warps=4), else a MegakernelError that
    names the knobs; never a hang."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    model, x = layer_norm_mlp().cuda(), torch.randn(4, 8, device="cuda")
    mk = mkcompiler.compile(model, (x,), workers_per_sm=2, num_warps=4)
    assert mk.num_workers == 2 * sms
    assert_correct(mk, model, x)


def test_workers_per_sm_must_be_a_positive_integer():
    with pytest.raises(ValueError, match=r"workers_per_sm must be a positive integer, got 0"):
        mkcompiler.compile(layer_norm_mlp(), (torch.randn(4, 8),), workers_per_sm=0)


def test_waits_must_name_a_wait_mode():
    with pytest.raises(ValueError, match=r"waits must be one of \('atomic', 'fence', 'acquire'\), not 'spin'"):
        mkcompiler.compile(layer_norm_mlp(), (torch.randn(4, 8),), waits="spin")


# ---- a kernel error leaves the Megakernel usable ----


def a_waited_on_signal(q) -> int:
    """An instruction whose signal some instruction waits for."""
    waited = {c for i in range(len(q)) for c, _ in q.waits_of(i)}
    return next(i for i in range(len(q)) if int(q.rows[i, Field.SIGNAL]) in waited)


def assert_reset(mk) -> None:
    assert mk.generation == 0 and not mk.counters.any() and not mk.head.any() and not mk.err.any()


SCHEDULES = {
    "dynamic": (dict(schedule="dynamic", num_workers=3), False),
    "static_1_worker": (dict(schedule="static", num_workers=1), False),
    # Two static workers wait on each other: only the thread-per-program interpreter runs them.
    "static_2_workers_threaded": (dict(schedule="static", num_workers=2), True),
}


@pytest.mark.parametrize("case", list(SCHEDULES))
def test_kernel_error_leaves_the_megakernel_usable(case):
    """Drop one signal in the device copy of the queue: the call raises (bounded wait), the
    counters are reset; with the signal back, the next calls (and launch numbers) are right."""
    options, threaded = SCHEDULES[case]
    if threaded and not INTERPRETING:
        pytest.skip("the thread-per-program mode patches the CPU interpreter")
    torch.manual_seed(0)
    model, x = ResidualMLP(16, 24), torch.randn(3, 16)
    mk = mkcompiler.compile(model, (x,), **options, **OPTIONS)
    with threaded_interp.threaded() if threaded else contextlib.nullcontext():
        assert_correct(mk, model, x)
        i = a_waited_on_signal(mk.queue)
        signal = int(mk.instr[i, Field.SIGNAL])
        mk.instr[i, Field.SIGNAL] = -1
        with pytest.raises(MegakernelError, match=rf"gave up after {MAX_SPIN} polls.*counters were reset"):
            mk(torch.randn(3, 16))
        assert_reset(mk)
        mk.instr[i, Field.SIGNAL] = signal  # without upload_queue, which would reset by itself
        for _ in range(2):
            assert_correct(mk, model, torch.randn(3, 16))
        assert mk.generation == 2


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["dynamic", "static"])
def test_gpu_kernel_error_leaves_the_megakernel_usable(schedule):
    """One worker per SM, really concurrent: the same drop-a-signal check as above."""
    torch.manual_seed(0)
    model = ResidualMLP(64, 128).cuda()
    mk = mkcompiler.compile(model, (torch.randn(8, 64, device="cuda"),), schedule=schedule, max_spin=1 << 14)
    assert_correct(mk, model, torch.randn(8, 64, device="cuda"))
    i = a_waited_on_signal(mk.queue)
    signal = int(mk.instr[i, Field.SIGNAL])
    mk.instr[i, Field.SIGNAL] = -1
    with pytest.raises(MegakernelError, match="counters were reset"):
        mk(torch.randn(8, 64, device="cuda"))
    assert_reset(mk)
    mk.instr[i, Field.SIGNAL] = signal
    for _ in range(3):
        assert_correct(mk, model, torch.randn(8, 64, device="cuda"))


# ---- separate state ----


def state_tensors(mk) -> list[torch.Tensor]:
    return [mk.counters, mk.head, mk.err, mk.addrs, mk.instr, mk.waits, mk.views, *mk.buffers.values()]


def test_two_megakernels_of_one_model_share_no_state():
    """Same model, same generated source (one kernel module): still two sets of counters and
    buffers; used alternately each counts its own launches, and an error in one leaves the
    other alone."""
    torch.manual_seed(0)
    model, x = ResidualMLP(16, 24), torch.randn(3, 16)
    a = mkcompiler.compile(model, (x,), **OPTIONS)
    b = mkcompiler.compile(model, (x,), **OPTIONS)
    assert a.source == b.source and a._kernel is b._kernel
    ptrs_a = {t.data_ptr() for t in state_tensors(a)}
    assert not ptrs_a & {t.data_ptr() for t in state_tensors(b)}
    for _ in range(2):
        assert_correct(a, model, torch.randn(3, 16))
        assert_correct(b, model, torch.randn(3, 16))
    assert a.generation == b.generation == 2
    i = a_waited_on_signal(a.queue)
    a.instr[i, Field.SIGNAL] = -1
    with pytest.raises(MegakernelError):
        a(torch.randn(3, 16))
    assert b.generation == 2 and b.counters.any()
    assert_correct(b, model, torch.randn(3, 16))


def run_in_threads(jobs, calls: int = 4) -> list[str]:
    """Run each (mk, model, shape) job `calls` times in its own thread; return the failures."""
    failures: list[str] = []

    def work(mk, model, shape):
        for _ in range(calls):
            x = torch.randn(*shape)
            try:
                err = rel_err(mk(x), reference(model, (x,)))
                if err > TOL[torch.float32]:
                    failures.append(f"relative error {err:.3g}")
            except Exception as e:  # reported in the test's thread
                failures.append(repr(e)[:300])

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: interleave inside launches
    try:
        threads = [threading.Thread(target=work, args=job, daemon=True) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a thread is still running after 120 s"
    finally:
        sys.setswitchinterval(interval)
    return failures


def test_two_threads_with_two_megakernels():
    torch.manual_seed(0)
    model_a, model_b = ResidualMLP(16, 24), layer_norm_mlp()
    a = mkcompiler.compile(model_a, (torch.randn(3, 16),), **OPTIONS)
    b = mkcompiler.compile(model_b, (torch.randn(5, 8),), **OPTIONS)
    assert run_in_threads([(a, model_a, (3, 16)), (b, model_b, (5, 8))]) == []
    assert a.generation == b.generation == 4


def test_two_threads_sharing_one_megakernel():
    """Calls on one Megakernel are serialised: each thread gets the output of its own input."""
    torch.manual_seed(0)
    model = layer_norm_mlp()
    mk = mkcompiler.compile(model, (torch.randn(5, 8),), **OPTIONS)
    assert run_in_threads([(mk, model, (5, 8)), (mk, model, (5, 8))]) == []
    assert mk.generation == 8


# ---- view addresses follow the buffers ----


@pytest.mark.parametrize("preload_args", [True, False])
def test_view_addresses_follow_rebound_inputs(preload_args):
    """Each view row carries its data's address (layout.ViewField.ADDR), which the runtime keeps
    equal to its buffer's address plus offset: calls with new input tensors (new addresses) are
    still correct, and after a call every row's ADDR is where its buffer now is. Both placements
    of the args preload (before or after the wait) compute the same thing."""
    torch.manual_seed(0)
    model = ResidualMLP(16, 24)
    mk = mkcompiler.compile(model, (torch.randn(3, 16),), preload_args=preload_args, **OPTIONS)
    assert ("\n        pre = preload(row)\n" in mk.source) == preload_args  # before the wait (8 spaces)
    for _ in range(3):
        x = torch.randn(3, 16) + 0.5  # a fresh tensor each call: a fresh address
        assert_correct(mk, model, x)
        views = mk.views.view(-1, NUM_VIEW_FIELDS)
        buffers = views[:, ViewField.BUFFER]
        itemsize = torch.tensor([b.dtype.itemsize for b in mk.graph.buffers])[buffers]
        expect = mk.addrs[buffers] + views[:, ViewField.OFFSET] * itemsize
        assert torch.equal(views[:, ViewField.ADDR], expect)
        assert x.data_ptr() in set(views[:, ViewField.ADDR].tolist())  # the bound input itself
    assert (mk.queue.views[:, ViewField.ADDR] == 0).all()  # the compiled queue is not written


def test_errors_setting_is_checked_and_the_interpreter_reports_at_once():
    """Settings.errors: "sync" or "deferred", anything else refused; the interpreter runs each
    launch to its end, so even "deferred" raises in the failing call itself."""
    model = ResidualMLP(dim=16, hidden=32)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="errors must be"):
        mkcompiler.compile(model, (x,), errors="later")
    mk = mkcompiler.compile(model, (x,), errors="deferred", max_spin=50)
    assert_correct(mk, model, x)
    rows = mk.queue.rows.copy()
    mk.queue.rows[:, Field.SIGNAL] = -1  # nothing signals: the first wait gives up
    mk.upload_queue(check=False)
    with pytest.raises(MegakernelError):
        mk(x)
    mk.queue.rows[:] = rows
    mk.upload_queue()
    assert_correct(mk, model, x)
