"""The thread-per-program interpreter: programs really run concurrently, static schedules
compute the eager result, and a bad static schedule deadlocks and is caught by the bounded
waits instead of hanging."""

import os
import threading
import time

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpreterError

import mkcompiler
from mkcompiler.backends.triton import threaded_interp
from tests.helpers import compile_and_check, reference, rel_err
from tests.models import TransformerMLP

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="patches Triton's CPU interpreter (TRITON_INTERPRET=1)"
)
GUARD_S = 90  # a hang fails the test after this long instead of blocking CI


def guarded(fn, timeout=GUARD_S):
    """fn() in a daemon thread; fail (not hang) if it has not returned after `timeout` s."""
    result = {}

    def body():
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            result["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"still running after {timeout} s: the kernel hangs")
    if "error" in result:
        raise result["error"]
    return result["value"]


@triton.jit
def handshake(flag_ptr, data_ptr, out_ptr, MAX_SPIN: tl.constexpr):
    """Program 1 publishes data then releases a flag; program 0 acquires it (bounded) and
    copies what it sees. Run one after another, program 0 gives up before program 1 starts."""
    if tl.program_id(0) == 0:
        seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
        spins = 0
        while (seen == 0) & (spins < MAX_SPIN):
            seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
            spins += 1
        tl.store(out_ptr, seen)
        tl.store(out_ptr + 1, tl.load(data_ptr))
    else:
        tl.store(data_ptr, 42)
        tl.atomic_add(flag_ptr, 1, sem="release")


def run_handshake(max_spin):
    flag = torch.zeros(1, dtype=torch.int32)
    data = torch.zeros(1, dtype=torch.int32)
    out = torch.full((2,), -1, dtype=torch.int32)
    handshake[(2,)](flag, data, out, MAX_SPIN=max_spin)
    return out.tolist()


def test_programs_run_concurrently():
    assert run_handshake(300) == [0, 0]  # sequential interpreter: program 0 gave up, saw nothing
    with threaded_interp.threaded():
        assert threaded_interp.enabled()
        # Saw the flag and, after the acquire, the data (the bound only matters if it fails).
        assert guarded(lambda: run_handshake(20000)) == [1, 42]
    assert not threaded_interp.enabled()
    assert run_handshake(300) == [0, 0]  # disable() restored the sequential interpreter


def test_program_errors_reach_the_caller():
    @triton.jit
    def bad(x_ptr):
        if tl.program_id(0) == 1:
            tl.store(x_ptr + tl.arange(0, 4), tl.zeros([2], tl.int32))  # shapes do not broadcast

    with threaded_interp.threaded(), pytest.raises(InterpreterError, match="incompatible dimensions"):
        guarded(lambda: bad[(2,)](torch.zeros(4, dtype=torch.int32)))


def test_version_is_pinned(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    with pytest.raises(RuntimeError, match="triton 3.6"):
        threaded_interp.enable()
    assert not threaded_interp.enabled()


def small_mlp():
    torch.manual_seed(0)
    model = TransformerMLP(dim=32, hidden=64, layers=2)
    return model, torch.randn(4, 32)


TILES = dict(matmul_tile=(16, 16, 16), elementwise_block=64, row_block=2)


def test_static_schedule_runs_concurrently():
    model, x = small_mlp()
    with threaded_interp.threaded():
        mk, _ = guarded(lambda: compile_and_check(model, [x], torch.float32, schedule="static", num_workers=3, **TILES))
        x2 = torch.randn(4, 32)  # a second launch: counters carry over (targets x generation)
        mk.poison()
        assert rel_err(guarded(lambda: mk(x2)), reference(model, [x2])) <= 1e-4
    # The same schedule needs the concurrency: one program after another, worker 0 waits
    # for work a later program has not started.
    mk.max_spin = 300
    with pytest.raises(mkcompiler.MegakernelError, match="gave up"):
        mk(x)


def test_bad_static_schedule_raises_instead_of_hanging():
    model, x = small_mlp()
    mk = mkcompiler.compile(model, (x,), schedule="static", num_workers=3, max_spin=300, **TILES)
    q = mk.queue
    for w in range(q.num_workers):  # every worker runs its list backwards: a cycle of waits
        b, e = q.worker_begin[w], q.worker_begin[w + 1]
        q.worker_order[b:e] = q.worker_order[b:e][::-1].copy()
    mk.upload_queue(check=False)
    with threaded_interp.threaded():
        t0 = time.perf_counter()
        with pytest.raises(mkcompiler.MegakernelError, match="gave up after 300 polls"):
            guarded(lambda: mk(x))
        assert time.perf_counter() - t0 < 30
