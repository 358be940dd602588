"""Device functions of the queue protocol across ranks (tensor parallelism): waits on peer
ranks' counters, system-scope signals, and the separation of launches across ranks.

A tensor-parallel kernel (codegen_tp.py) gets one more argument, `tp_ptr`, the rank's int64
table (layout.TPField): its rank, the addresses of every rank's counters and error record,
every rank's address of each buffer peers read (symmetric memory: mkcompiler/tp/runtime.py),
and which counters peers wait on. Single-GPU kernels never import this module.

Memory ordering across GPUs (TRITON_3_6_NOTES.md): a producer's stores are published to other
GPUs by a barrier then a release atomic at system scope on its counter (signal_tp, for the
counters peers wait on; the others stay at GPU scope); a remote wait polls the peer's counter
with volatile loads and acquires it at system scope once met, before the tile reads the
peer's memory. Every wait is bounded by MAX_SPIN polls, like kernel_lib.wait_all, and also
stops once the peer it waits on has stopped (its error record is set), so one rank's failure
ends every rank's launch instead of leaving them spinning.

Launches across ranks: counters only grow (targets are count x launch number on every rank),
so a peer's counters never need resetting; but a rank must not overwrite, in launch g, a
buffer a peer may still be reading from launch g - 1. Every worker adds 1 to the EXIT counter
(system-scope release) when it leaves the loop, after its last read of peer memory; at the
start of launch g every worker waits until each peer's EXIT counter has reached
num_workers x (g - 1), i.e. every peer has finished launch g - 1 (launch_barrier).
"""

import triton
import triton.language as tl

from mkcompiler.ir.layout import LOCAL, ErrorField, TPField, WaitField
from mkcompiler.ops.kernel_lib import (
    ABORT_CHECK,
    E_COUNTER,
    E_FLAG,
    E_INSTRUCTION,
    E_TARGET,
    E_VALUE,
    E_WORKER,
    WAIT_ROW,
    load_wait,
    wait_all,
)

TP_RANK: tl.constexpr = tl.constexpr(int(TPField.RANK))
TP_WORLD: tl.constexpr = tl.constexpr(int(TPField.WORLD))
TP_EXIT: tl.constexpr = tl.constexpr(int(TPField.EXIT))
TP_SYS_FLAGS: tl.constexpr = tl.constexpr(int(TPField.SYS_FLAGS))
TP_PEER_COUNTERS: tl.constexpr = tl.constexpr(int(TPField.PEER_COUNTERS))
TP_PEER_ERRS: tl.constexpr = tl.constexpr(int(TPField.PEER_ERRS))
W_RANK: tl.constexpr = tl.constexpr(int(WaitField.RANK))
W_LOCAL: tl.constexpr = tl.constexpr(LOCAL)
E_PEER: tl.constexpr = tl.constexpr(int(ErrorField.PEER))
GAVE_UP: tl.constexpr = tl.constexpr(1)  # ErrorField.FLAG values
PEER_STOPPED: tl.constexpr = tl.constexpr(2)
NO_INSTRUCTION: tl.constexpr = tl.constexpr(-1)  # the error record's instruction for the launch barrier


@triton.jit
def peer_counters(tp_ptr, k):
    """Rank k's counters (k may be this rank)."""
    return tl.load(tp_ptr + TP_PEER_COUNTERS + k).to(tl.pointer_type(tl.int32), bitcast=True)


@triton.jit
def peer_err(tp_ptr, k):
    """Rank k's error record."""
    return tl.load(tp_ptr + TP_PEER_ERRS + k).to(tl.pointer_type(tl.int32), bitcast=True)


@triton.jit
def record_tp(err_ptr, flag, idx, counter, value, target, peer):
    """kernel_lib.record_stuck_wait, naming the rank too (ErrorField.PEER = 1 + peer)."""
    if tl.atomic_cas(err_ptr + E_FLAG, 0, flag) == 0:  # the first one to stop tells its story
        tl.store(err_ptr + E_INSTRUCTION, idx)
        tl.store(err_ptr + E_COUNTER, counter)
        tl.store(err_ptr + E_VALUE, value)
        tl.store(err_ptr + E_TARGET, target)
        tl.store(err_ptr + E_WORKER, tl.program_id(0))
        tl.store(err_ptr + E_PEER, peer + 1)


@triton.jit
def wait_remote(tp_ptr, idx, peer, counter, target, err_ptr, MAX_SPIN: tl.constexpr):
    """Wait (acquire, system scope) until rank `peer`'s counter reaches `target`. Returns 1 when
    met, 0 when it gave up after MAX_SPIN polls or saw this rank or the peer stop (recorded)."""
    ptr = peer_counters(tp_ptr, peer) + counter
    value = tl.atomic_add(ptr, 0, sem="acquire", scope="sys")  # often met at once
    flag = GAVE_UP
    if value < target:
        perr = peer_err(tp_ptr, peer)
        spins = 0
        while (value < target) & (spins < MAX_SPIN):
            value = tl.load(ptr, volatile=True)
            spins += 1
            if spins % ABORT_CHECK == 0:
                if tl.load(err_ptr + E_FLAG, volatile=True) != 0:
                    spins = MAX_SPIN
                if tl.load(perr + E_FLAG, volatile=True) != 0:
                    flag = PEER_STOPPED
                    spins = MAX_SPIN
        value = tl.atomic_add(ptr, 0, sem="acquire", scope="sys")
    ok = 1
    if value < target:
        ok = 0
        record_tp(err_ptr, flag, idx, counter, value, target, peer)
    return ok


@triton.jit
def wait_all_tp(
    tp_ptr,
    idx,
    w,
    w_end,
    counter,
    count,
    waits_ptr,
    counters_ptr,
    err_ptr,
    generation,
    MAX_SPIN: tl.constexpr,
    MODE: tl.constexpr,
):
    """kernel_lib.wait_all for wait rows that may name a rank (layout.WaitField.RANK): a row on
    this rank's counters (LOCAL, or this rank's number) is waited for by wait_all itself; a row on
    a peer's counters by wait_remote (its own acquire at system scope, whatever MODE). Same
    arguments as wait_all, after tp_ptr."""
    rank = tl.load(tp_ptr + TP_RANK).to(tl.int32)
    ok = 1
    while (w < w_end) & (ok == 1):
        peer = tl.load(waits_ptr + w * WAIT_ROW + W_RANK)
        if (peer == W_LOCAL) | (peer == rank):
            ok = wait_all(idx, w, w + 1, counter, count, waits_ptr, counters_ptr, err_ptr, generation, MAX_SPIN, MODE)
        else:
            ok = wait_remote(tp_ptr, idx, peer, counter, count * generation, err_ptr, MAX_SPIN)
        w += 1
        counter, count = load_wait(waits_ptr, w, w_end)
    return ok


@triton.jit
def signal_tp(pre, counters_ptr, tp_ptr):
    """kernel_lib.signal; at system scope for the counters peers wait on (callers put
    tl.debug_barrier() before it, as for signal)."""
    counter = pre[2]
    if counter >= 0:
        if tl.load(tp_ptr + tl.load(tp_ptr + TP_SYS_FLAGS) + counter) != 0:
            tl.atomic_add(counters_ptr + counter, 1, sem="release", scope="sys")
        else:
            tl.atomic_add(counters_ptr + counter, 1, sem="release")


@triton.jit(noinline=True)
def launch_barrier(tp_ptr, err_ptr, generation, MAX_SPIN: tl.constexpr):
    """At the start of launch `generation`: wait until every peer has finished the previous
    launch (its EXIT counter = num_workers x (generation - 1)), so nothing this launch writes is
    still being read by a peer. Returns 1, or 0 when a wait gave up (recorded).
    Not inlined: inlined, this prologue cost the whole dispatch loop registers (a TP=2 decode
    kernel: 255 registers and spills, against 245 and none without it or called)."""
    # Its own rank too: met at once (launches on one GPU run in order).
    world = tl.load(tp_ptr + TP_WORLD).to(tl.int32)
    exit_counter = tl.load(tp_ptr + TP_EXIT).to(tl.int32)
    target = tl.num_programs(0) * (generation - 1)
    ok = 1
    k = 0
    while (k < world) & (ok == 1):
        ok = wait_remote(tp_ptr, NO_INSTRUCTION, k, exit_counter, target, err_ptr, MAX_SPIN)
        k += 1
    return ok


@triton.jit
def worker_exit(counters_ptr, tp_ptr):
    """The worker is done with this launch, its reads of peer memory included (launch_barrier)."""
    tl.debug_barrier()
    tl.atomic_add(counters_ptr + tl.load(tp_ptr + TP_EXIT).to(tl.int32), 1, sem="release", scope="sys")
