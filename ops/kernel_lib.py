"""Device functions of the queue protocol: bounded waits, signals, the error record.

Facts this relies on (TRITON_3_6_NOTES.md): a spin on a plain load is deleted by the
compiler, so polls are volatile loads (or acquire atomics); a scalar release atomic is issued
by one thread with no barrier before it, so callers put tl.debug_barrier() before signal().
"""

import triton
import triton.language as tl

from mkcompiler.ir.layout import NUM_FIELDS as LAYOUT_NUM_FIELDS
from mkcompiler.ir.layout import NUM_WAIT_FIELDS, PRELOADED_ARGS, ErrorField, Field, WaitField
from mkcompiler.ir.settings import WAIT_MANY_MODE as SETTINGS_WAIT_MANY_MODE

NUM_FIELDS: tl.constexpr = tl.constexpr(int(LAYOUT_NUM_FIELDS))
OPCODE: tl.constexpr = tl.constexpr(int(Field.OPCODE))
ARG0: tl.constexpr = tl.constexpr(int(Field.ARG0))
N_PRELOADED: tl.constexpr = tl.constexpr(PRELOADED_ARGS)
WAIT_BEGIN: tl.constexpr = tl.constexpr(int(Field.WAIT_BEGIN))
WAIT_END: tl.constexpr = tl.constexpr(int(Field.WAIT_END))
SIGNAL: tl.constexpr = tl.constexpr(int(Field.SIGNAL))
WAIT_ROW: tl.constexpr = tl.constexpr(NUM_WAIT_FIELDS)
W_COUNTER: tl.constexpr = tl.constexpr(int(WaitField.COUNTER))
W_COUNT: tl.constexpr = tl.constexpr(int(WaitField.COUNT))
E_FLAG: tl.constexpr = tl.constexpr(int(ErrorField.FLAG))
E_INSTRUCTION: tl.constexpr = tl.constexpr(int(ErrorField.INSTRUCTION))
E_COUNTER: tl.constexpr = tl.constexpr(int(ErrorField.COUNTER))
E_VALUE: tl.constexpr = tl.constexpr(int(ErrorField.VALUE))
E_TARGET: tl.constexpr = tl.constexpr(int(ErrorField.TARGET))
E_WORKER: tl.constexpr = tl.constexpr(int(ErrorField.WORKER))
ABORT_CHECK: tl.constexpr = tl.constexpr(64)  # polls between reads of the error flag


@triton.jit
def now(clock_ptr, LOGICAL: tl.constexpr):
    """A profile stamp: %globaltimer in ns on the GPU; in the interpreter (no inline asm) a
    shared tick counter, which orders events across workers but measures no duration."""
    if LOGICAL:
        t = tl.atomic_add(clock_ptr, 1).to(tl.int64)
    else:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    return t


@triton.jit
def aborted(err_ptr):
    """True once any worker has given up (every worker then stops)."""
    return tl.load(err_ptr + E_FLAG, volatile=True) != 0


@triton.jit
def record_stuck_wait(err_ptr, idx, counter, value, target):
    if tl.atomic_cas(err_ptr + E_FLAG, 0, 1) == 0:  # first one to give up tells its story
        tl.store(err_ptr + E_INSTRUCTION, idx)
        tl.store(err_ptr + E_COUNTER, counter)
        tl.store(err_ptr + E_VALUE, value)
        tl.store(err_ptr + E_TARGET, target)
        tl.store(err_ptr + E_WORKER, tl.program_id(0))


@triton.jit
def cta_all(pred):
    """1 where `pred` (a per-thread scalar) holds in every thread of the program, else 0: one
    barrier with an AND reduction (bar.red), which also makes the answer uniform. GPU only."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p, q; setp.ne.s32 p, $1, 0; bar.red.and.pred q, 0, p; selp.s32 $0, 1, 0, q; }",
        "=r,r",
        [pred.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def acquire_fence():
    """After relaxed reads that saw the producers' release writes: fence.acq_rel makes the
    pair an acquire (PTX memory model's acquire pattern), with no extra trip to memory."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def load_header(instr_ptr, idx, valid):
    """(opcode, first wait, end of waits) of instruction idx; zeros where not `valid` (a
    prefetch past the worker's last instruction reads nothing)."""
    row = instr_ptr + idx * NUM_FIELDS
    op = tl.load(row + OPCODE, mask=valid, other=0)
    w_begin = tl.load(row + WAIT_BEGIN, mask=valid, other=0)
    w_end = tl.load(row + WAIT_END, mask=valid, other=0)
    return op, w_begin, w_end


@triton.jit
def preload(row_ptr):
    """(row_ptr, its first PRELOADED_ARGS args, its signal counter): what tile routines take as
    their `row` (ops/common.arg) and signal() takes. Called before the wait, these independent
    loads overlap it: the tile finds its view ids and coordinates in registers, and its release
    needs no load first (after an acquire, a load of the row goes to L2: ~0.5 us)."""
    args = ()
    for i in tl.static_range(N_PRELOADED):
        args = args + (tl.load(row_ptr + ARG0 + i),)
    return row_ptr, args, tl.load(row_ptr + SIGNAL)


@triton.jit
def load_wait(waits_ptr, w, w_end):
    """(counter, count) of wait row w, or (0, 0) when w >= w_end (no such wait)."""
    has = w < w_end
    counter = tl.load(waits_ptr + w * WAIT_ROW + W_COUNTER, mask=has, other=0)
    count = tl.load(waits_ptr + w * WAIT_ROW + W_COUNT, mask=has, other=0)
    return counter, count


@triton.jit
def load_acquire(ptr):
    """ld.acquire.gpu of one int32 (GPU only: inline PTX): a poll that is also the acquire, so
    a wait that sees its count needs no second trip to memory (an acquire atomic) or fence."""
    return tl.inline_asm_elementwise(
        "ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr.to(tl.int64)], dtype=tl.int32, is_pure=False, pack=1
    )


WAIT_MANY_MODE: tl.constexpr = tl.constexpr(SETTINGS_WAIT_MANY_MODE)  # wait_all's MODE: "acquire" + wait_many
WIDE: tl.constexpr = tl.constexpr(128)  # wait rows polled at once by wait_many (one per thread)


@triton.jit
def wait_many(w, w_end, waits_ptr, counters_ptr, err_ptr, generation, MAX_SPIN: tl.constexpr):
    """wait_all's "acquire" mode for an instruction with more than three wait rows: WIDE rows at a
    time, each thread loading one row and polling its counter with ld.acquire; a CTA-wide
    reduction (a barrier) tells when all are met, so the wait costs one round trip to L2, not
    two per row. The barrier orders every thread's later loads after the acquires of the others
    (they share the SM's L1, which each acquire empties). Returns (ok, stuck counter, value,
    target), uniform across the CTA."""
    ok = 1
    stuck_counter, stuck_value, stuck_target = 0, 0, 0
    lanes = tl.arange(0, WIDE)
    while (w < w_end) & (ok == 1):
        rows = w + lanes
        has = rows < w_end
        c = tl.load(waits_ptr + rows * WAIT_ROW + W_COUNTER, mask=has, other=0)
        target = tl.load(waits_ptr + rows * WAIT_ROW + W_COUNT, mask=has, other=0) * generation
        v = load_acquire(counters_ptr + c)
        met = tl.min((v >= target).to(tl.int32), axis=0)
        spins = 0
        while (met == 0) & (spins < MAX_SPIN):
            v = load_acquire(counters_ptr + c)
            met = tl.min((v >= target).to(tl.int32), axis=0)
            spins += 1
            if spins % ABORT_CHECK == 0:
                if aborted(err_ptr):
                    spins = MAX_SPIN
        if met == 0:
            ok = 0
            first = tl.min(tl.where(v < target, lanes, WIDE), axis=0)
            stuck_counter = tl.sum(tl.where(lanes == first, c, 0), axis=0)
            stuck_value = tl.sum(tl.where(lanes == first, v, 0), axis=0)
            stuck_target = tl.sum(tl.where(lanes == first, target, 0), axis=0)
        w += WIDE
    return ok, stuck_counter, stuck_value, stuck_target


@triton.jit
def wait_all(
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
    """Wait (acquire) until each of the instruction's counters, wait rows [w, w_end), reaches
    count x generation; (counter, count) of the first row come prefetched (the dispatcher loads
    them while the previous instruction runs). Returns 1 when all are met, 0 when one gave up
    after MAX_SPIN polls (recorded in err). MODE is the index of Settings.waits in
    settings.WAIT_MODES:

    0 "atomic" (the interpreter: no inline asm): an acquire atomic first (often met at once);
      otherwise volatile polls, then one more acquire atomic.
    1 "fence" (GPU): volatile polls; the threads agree with one bar.red per row (a uniform
      answer: the tile after it has barriers), and one fence.acq_rel after the last wait orders
      the tile's loads after the producers' releases.
    2 "acquire" (GPU): every poll is an ld.acquire (load_acquire): the poll that sees the count
      is the acquire, for each thread; one bar.red at the end makes the answer uniform. Up to
      three rows are polled together (their row loads and polls side by side), the rest one
      after another.
    3 (WAIT_MANY_MODE) "acquire" for a queue with instructions of more than three wait rows
      (runtime.Megakernel.wait_mode): those rows are polled one per thread (wait_many). Its own
      mode so that kernels that never need it carry none of its code (the 1B decode kernel with
      it inlined at every wait: 10216 SASS instructions against 9352, 255 registers).

    Every thread polls (no barriers; a scalar atomic costs a broadcast through shared memory
    with two barriers); the error flag is read only every ABORT_CHECK polls."""
    ok = 1
    if MODE >= 2:
        # Threads leave these loops independently: nothing with a barrier inside (a scalar
        # atomic such as record_stuck_wait's has two) until cta_all makes the answer uniform;
        # wait_many's barriers are in loops whose every decision is uniform (reductions).
        stuck_counter, stuck_value, stuck_target = counter, 0, 0
        many = False  # a constant unless MODE is WAIT_MANY_MODE: then no wait_many code at all
        if MODE == WAIT_MANY_MODE:
            many = w + 3 < w_end
        if many:  # more than three rows: one per thread
            ok, stuck_counter, stuck_value, stuck_target = wait_many(
                w, w_end, waits_ptr, counters_ptr, err_ptr, generation, MAX_SPIN
            )
            w = w_end
        elif w + 1 < w_end:
            # Two or more rows (a decode layer's Q/K/V, gate/up, RoPE, attention, residual adds):
            # the first three are polled together, so a wait costs one round trip to L2 when
            # they are met, not two per row (its row, then its counter: an acquire empties L1).
            # A missing third row reads counter 0 against target 0, met at once.
            c1, n1 = load_wait(waits_ptr, w + 1, w_end)
            c2, n2 = load_wait(waits_ptr, w + 2, w_end)
            t0, t1, t2 = count * generation, n1 * generation, n2 * generation
            v0 = load_acquire(counters_ptr + counter)
            v1 = load_acquire(counters_ptr + c1)
            v2 = load_acquire(counters_ptr + c2)
            spins = 0
            while ((v0 < t0) | (v1 < t1) | (v2 < t2)) & (spins < MAX_SPIN):
                v0 = load_acquire(counters_ptr + counter)
                v1 = load_acquire(counters_ptr + c1)
                v2 = load_acquire(counters_ptr + c2)
                spins += 1
                if spins % ABORT_CHECK == 0:
                    if aborted(err_ptr):
                        spins = MAX_SPIN
            if v2 < t2:
                ok = 0
                stuck_counter, stuck_value, stuck_target = c2, v2, t2
            if v1 < t1:
                ok = 0
                stuck_counter, stuck_value, stuck_target = c1, v1, t1
            if v0 < t0:
                ok = 0
                stuck_counter, stuck_value, stuck_target = counter, v0, t0
            w += 3
            counter, count = load_wait(waits_ptr, w, w_end)
        while (w < w_end) & (ok == 1):
            target = count * generation
            value = load_acquire(counters_ptr + counter)
            spins = 0
            while (value < target) & (spins < MAX_SPIN):
                value = load_acquire(counters_ptr + counter)
                spins += 1
                if spins % ABORT_CHECK == 0:
                    if aborted(err_ptr):
                        spins = MAX_SPIN
            if value < target:
                ok = 0
                stuck_counter, stuck_value, stuck_target = counter, value, target
            w += 1
            counter, count = load_wait(waits_ptr, w, w_end)
        ok = cta_all(ok == 1)  # threads that gave up and threads that did not: all stop
        if ok == 0:
            record_stuck_wait(err_ptr, idx, stuck_counter, stuck_value, stuck_target)
    else:
        while (w < w_end) & (ok == 1):
            target = count * generation
            if MODE == 1:
                value = tl.load(counters_ptr + counter, volatile=True)
            else:
                value = tl.atomic_add(counters_ptr + counter, 0, sem="acquire")  # often met at once
            if MODE == 1 or value < target:
                spins = 0
                while (value < target) & (spins < MAX_SPIN):
                    value = tl.load(counters_ptr + counter, volatile=True)
                    spins += 1
                    if spins % ABORT_CHECK == 0:
                        if aborted(err_ptr):
                            spins = MAX_SPIN
                if MODE == 1:
                    ok = cta_all(value >= target)
                else:
                    value = tl.atomic_add(counters_ptr + counter, 0, sem="acquire")
            if MODE == 0:
                if value < target:
                    ok = 0
            if ok == 0:
                record_stuck_wait(err_ptr, idx, counter, value, target)
            w += 1
            counter, count = load_wait(waits_ptr, w, w_end)
        if MODE == 1:
            if ok == 1:
                acquire_fence()
    return ok


@triton.jit
def wait_in_tile(w):
    """The wait of an instruction whose tile waits itself (codegen: Settings.early_weights), after
    issuing the loads that need no input (weights): w is the dispatcher's wait_all arguments,
    then (PROFILE, clock pointer, LOGICAL_CLOCK). Returns (ok as wait_all's, the ready stamp:
    now() after the wait when profiling, else 0). Called in uniform control flow (wait_all's
    vote has a barrier)."""
    ok = wait_all(w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], w[10])
    t = tl.zeros((), tl.int64)
    if w[11]:
        t = now(w[12], w[13])
    return ok, t


@triton.jit
def signal(pre, counters_ptr):
    """Release: publish this instruction's writes to whoever waits on its counter (pre: the
    instruction's preload())."""
    counter = pre[2]
    if counter >= 0:
        tl.atomic_add(counters_ptr + counter, 1, sem="release")
