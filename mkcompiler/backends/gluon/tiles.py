"""Gluon device functions of the generated decode kernel (backends/gluon/codegen.py): the queue
protocol (bounded waits, the error record, release signals) and the decode matmul tile.

They read the SAME encoding as the Triton backend (ir/layout.py: instruction rows, wait rows, the
view table with its ADDR column kept current by the runtime), so one queue runs on either backend.
Twins of ops/kernel_lib.py and ops/common.py, written for Gluon: a Gluon kernel cannot call
@triton.jit functions (in the CPU suite they are interpreter functions), and every tensor needs
an explicit layout.

Per SM the compute partition runs this module's routines; the loader partition (generated: its
TMA descriptors are the kernel's arguments) fills the weight ring they consume. Ring protocol
(ring.py models it): block c of a worker's walk is in slot c % NUM_BUF; compute waits on
`ready[s]` for phase (c // NUM_BUF) & 1, reads the block into registers, and only then (after a
partition barrier, so every compute warp has read it) arrives on `empty[s]`.

Importing this module does no CUDA work and never fails without Gluon (HAVE_GLUON).
"""

from __future__ import annotations

from mkcompiler.backends.gluon.plan import MatmulArg
from mkcompiler.ir.layout import (
    NUM_FIELDS,
    NUM_STAMPS,
    NUM_VIEW_FIELDS,
    NUM_WAIT_FIELDS,
    ErrorField,
    Field,
    StampField,
    ViewField,
    WaitField,
)

# The per-instruction TMA table (int32 [n_instr, NUM_TMA_FIELDS]) both partitions read: which
# descriptor, the first weight row in its stacked buffer, and the K chunk [K_LO, K_HI) of the
# instruction's weight blocks (K_LO == K_HI: nothing to stream). codegen.tma_table builds it from
# the plan's loader walk.
TMA_DESC, TMA_ROW, TMA_K_LO, TMA_K_HI = range(4)
NUM_TMA_FIELDS = 4
ABORT_CHECK = 64  # polls between reads of the error flag (as kernel_lib)
# Matmul instruction args past MatmulArg (Matmul.instruction_tail): a folded norm's weight.
NORM_WEIGHT_ARG = int(MatmulArg.KS) + 1
# matmul_tile's NORM: what a folded norm the tile applies.
NORM_NONE, NORM_RMS_IN_LOOP, NORM_RMS_SWEEP = 0, 1, 2
MAX_KSUB = 128  # columns of a ring slot matmul_tile holds in registers at once
# Args of an instruction the compute partition loads before its wait (preload_row): fewer than the
# Triton backend's PRELOADED_ARGS, as the 1B step's kernel at 4 compute warps spilled 12 B with 8
# or 10 held across the wait (0 with 6).
GLUON_PRELOADED_ARGS = 6
# Batch-1 decode: activation columns staged in shared memory at once (fp32; with a folded norm's
# weights, twice): 2 x 8 KB, beside the weight ring.
XK_PIECE = 2048

try:  # Gluon (triton.experimental.gluon, 3.6 API); only defines functions, no CUDA work
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

    HAVE_GLUON = True
except Exception:  # noqa: BLE001  (old Triton, or no Triton: the CPU suite must still import this)
    HAVE_GLUON = False


if HAVE_GLUON:
    # 3.6 name first (renamed gl.barrier later)
    CTA_BARRIER = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
    TMA_LOAD = tma.async_copy_global_to_shared if hasattr(tma, "async_copy_global_to_shared") else tma.async_load

    _NUM_FIELDS = gl.constexpr(NUM_FIELDS)
    _OPCODE = gl.constexpr(int(Field.OPCODE))
    _ARG0 = gl.constexpr(int(Field.ARG0))
    _PRELOADED = gl.constexpr(GLUON_PRELOADED_ARGS)
    _WAIT_BEGIN = gl.constexpr(int(Field.WAIT_BEGIN))
    _WAIT_END = gl.constexpr(int(Field.WAIT_END))
    _SIGNAL = gl.constexpr(int(Field.SIGNAL))
    _WAIT_ROW = gl.constexpr(NUM_WAIT_FIELDS)
    _W_COUNTER = gl.constexpr(int(WaitField.COUNTER))
    _W_COUNT = gl.constexpr(int(WaitField.COUNT))
    _VIEW_ROW = gl.constexpr(NUM_VIEW_FIELDS)
    _V_SIZE0 = gl.constexpr(int(ViewField.SIZE0))
    _V_STRIDE0 = gl.constexpr(int(ViewField.STRIDE0))
    _V_ADDR = gl.constexpr(int(ViewField.ADDR))
    _E_FLAG = gl.constexpr(int(ErrorField.FLAG))
    _E_INSTRUCTION = gl.constexpr(int(ErrorField.INSTRUCTION))
    _E_COUNTER = gl.constexpr(int(ErrorField.COUNTER))
    _E_VALUE = gl.constexpr(int(ErrorField.VALUE))
    _E_TARGET = gl.constexpr(int(ErrorField.TARGET))
    _E_WORKER = gl.constexpr(int(ErrorField.WORKER))
    _NUM_STAMPS = gl.constexpr(NUM_STAMPS)
    _S_WORKER = gl.constexpr(int(StampField.WORKER))
    _S_FETCH = gl.constexpr(int(StampField.FETCH))
    _S_READY = gl.constexpr(int(StampField.READY))
    _S_END = gl.constexpr(int(StampField.END))
    _TMA_ROW = gl.constexpr(NUM_TMA_FIELDS)
    _T_DESC = gl.constexpr(TMA_DESC)
    _T_ROW = gl.constexpr(TMA_ROW)
    _T_K_LO = gl.constexpr(TMA_K_LO)
    _T_K_HI = gl.constexpr(TMA_K_HI)
    _ABORT_CHECK = gl.constexpr(ABORT_CHECK)
    _A = gl.constexpr(int(MatmulArg.A))
    _BIAS = gl.constexpr(int(MatmulArg.BIAS))
    _C = gl.constexpr(int(MatmulArg.C))
    _TN = gl.constexpr(int(MatmulArg.TN))
    _KS = gl.constexpr(int(MatmulArg.KS))
    _NW = gl.constexpr(NORM_WEIGHT_ARG)
    _RMS_IN_LOOP = gl.constexpr(NORM_RMS_IN_LOOP)
    _RMS_SWEEP = gl.constexpr(NORM_RMS_SWEEP)
    MAX_KSUB_C = gl.constexpr(MAX_KSUB)
    XK_PIECE_C = gl.constexpr(XK_PIECE)

    @gluon.jit
    def add(a, b):
        # gl.sum's combine function is a @triton.jit one (an interpreter function in the CPU suite)
        return a + b

    @gluon.jit
    def sigmoid(x):
        """tl.sigmoid's formula (the elementwise family's templates use it)."""
        return 1.0 / (1.0 + gl.exp(-x))

    # ---- the encoding ----

    @gluon.jit
    def field(instr_ptr, idx, f: gl.constexpr):
        return gl.load(instr_ptr + idx * _NUM_FIELDS + f)

    @gluon.jit
    def arg_at(instr_ptr, idx, i: gl.constexpr):
        """Instruction argument i, loaded (partitions that have no preloaded row: the loaders)."""
        return gl.load(instr_ptr + idx * _NUM_FIELDS + _ARG0 + i)

    @gluon.jit
    def preload_row(instr_ptr, idx):
        """(instr_ptr, the first GLUON_PRELOADED_ARGS args of instruction idx): what the compute
        partition's tiles take as `row` (arg). Loaded before the instruction's wait, these
        independent loads overlap it, and the tile finds its view ids and coordinates in
        registers: after the wait's acquire (which invalidates L1) a load of the row would be a
        dependent trip to L2 at the tile's start (the Triton backend's kernel_lib.preload)."""
        args = ()
        for i in gl.static_range(_PRELOADED):
            args = args + (gl.load(instr_ptr + idx * _NUM_FIELDS + _ARG0 + i),)
        return instr_ptr, args

    @gluon.jit
    def arg(row, idx, i: gl.constexpr):
        """Instruction argument i of the preloaded `row` (preload_row): a register for the first
        GLUON_PRELOADED_ARGS, else a load."""
        if i < _PRELOADED:
            value = row[1][i]
        else:
            value = gl.load(row[0] + idx * _NUM_FIELDS + _ARG0 + i)
        return value

    @gluon.jit
    def tma_field(tma_ptr, idx, f: gl.constexpr):
        return gl.load(tma_ptr + idx * _TMA_ROW + f)

    @gluon.jit
    def view_field(views_ptr, v, f: gl.constexpr):
        return gl.load(views_ptr + v.to(gl.int64) * _VIEW_ROW + f)

    @gluon.jit
    def view_base(views_ptr, v, DT: gl.constexpr):
        """Typed pointer to element 0 of view v (its row's ADDR)."""
        return view_field(views_ptr, v, _V_ADDR).to(gl.pointer_type(DT), bitcast=True)

    @gluon.jit
    def view_size(views_ptr, v, d: gl.constexpr):
        return view_field(views_ptr, v, _V_SIZE0 + d)

    @gluon.jit
    def view_stride(views_ptr, v, d: gl.constexpr):
        return view_field(views_ptr, v, _V_STRIDE0 + d)

    @gluon.jit
    def view_numel(views_ptr, v):
        return (
            view_size(views_ptr, v, 0)
            * view_size(views_ptr, v, 1)
            * view_size(views_ptr, v, 2)
            * view_size(views_ptr, v, 3)
        )

    # ---- profile stamps (the profiling variant only: PROFILE) ----

    @gluon.jit
    def now():
        """%globaltimer in ns (kernel_lib.now's GPU stamp)."""
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def stamp(prof_ptr, idx, worker, t_fetch, t_ready, t_end):
        """Instruction idx's row of ir/layout.StampField (worker, fetch, ready, end)."""
        row = prof_ptr + idx.to(gl.int64) * _NUM_STAMPS
        gl.store(row + _S_WORKER, worker.to(gl.int64))
        gl.store(row + _S_FETCH, t_fetch)
        gl.store(row + _S_READY, t_ready)
        gl.store(row + _S_END, t_end)

    # ---- the protocol ----

    @gluon.jit
    def aborted(err_ptr):
        """True once any worker has given up."""
        return gl.load(err_ptr + _E_FLAG, volatile=True) != 0

    @gluon.jit
    def record_stuck_wait(err_ptr, idx, counter, value, target):
        """kernel_lib.record_stuck_wait's record (ErrorField): the first worker to give up tells."""
        if gl.atomic_cas(err_ptr + _E_FLAG, 0, 1) == 0:
            gl.store(err_ptr + _E_INSTRUCTION, idx)
            gl.store(err_ptr + _E_COUNTER, counter)
            gl.store(err_ptr + _E_VALUE, value)
            gl.store(err_ptr + _E_TARGET, target)
            gl.store(err_ptr + _E_WORKER, gl.program_id(0))

    @gluon.jit
    def wait_rows(waits_ptr, counters_ptr, err_ptr, idx, w, w_end, generation, MAX_SPIN: gl.constexpr):
        """Wait (acquire) until each counter of instruction idx's wait rows [w, w_end) (loaded by
        the caller, ahead) reaches count x generation: volatile polls (every thread; no barrier
        per poll), then one acquire atomic, whose broadcast answer is uniform. Returns 1, or 0
        after MAX_SPIN polls of one row (or once another worker gave up: the error flag is read
        every ABORT_CHECK polls), the stuck row then recorded."""
        ok = 1
        while (w < w_end) & (ok == 1):
            counter = gl.load(waits_ptr + w * _WAIT_ROW + _W_COUNTER)
            target = gl.load(waits_ptr + w * _WAIT_ROW + _W_COUNT) * generation
            seen = gl.load(counters_ptr + counter, volatile=True)
            spins = 0
            while (seen < target) & (spins < MAX_SPIN):
                seen = gl.load(counters_ptr + counter, volatile=True)
                spins += 1
                if spins % _ABORT_CHECK == 0:
                    if aborted(err_ptr):
                        spins = MAX_SPIN
            value = gl.atomic_add(counters_ptr + counter, 0, sem="acquire", scope="gpu")
            if value < target:
                ok = 0
                record_stuck_wait(err_ptr, idx, counter, value, target)
            w += 1
        return ok

    @gluon.jit
    def signal(instr_ptr, counters_ptr, idx):
        """Release: the instruction's stores, by every compute warp, before its counter's add."""
        counter = field(instr_ptr, idx, _SIGNAL)
        if counter >= 0:
            CTA_BARRIER()
            gl.atomic_add(counters_ptr + counter, 1, sem="release", scope="gpu")

    # ---- the decode matmul tile ----

    @gluon.jit
    def _rms_sweep(a_ptr, sam, sak, M, K, ms, EPS: gl.constexpr, num_warps: gl.constexpr):
        """1 / sqrt(mean(x^2) + eps) of each of the tile's rows over all of K (a split-K tile's
        folded RMSNorm), as a [MP] vector in ms's layout (rows past M: 1). Gluon pipelines no
        loop, so each step issues two wide loads (16 B per thread each) before using either: a
        2048-long row is one step, one memory latency."""
        SW: gl.constexpr = 8 * 32 * num_warps
        lay: gl.constexpr = gl.BlockedLayout([8], [32], [num_warps], [0])
        offs = gl.arange(0, SW, layout=lay)
        s2 = ms.to(gl.float32) * 0.0  # zeros in ms's layout (a layout taken from ms.type cannot be passed on)
        for m in range(0, M):
            acc = gl.zeros([SW], gl.float32, layout=lay)
            for k in range(0, K, 2 * SW):
                k0 = k + offs
                k1 = k0 + SW
                x0 = gl.load(a_ptr + m * sam + k0 * sak, mask=k0 < K, other=0.0, cache_modifier=".cg")
                x1 = gl.load(a_ptr + m * sam + k1 * sak, mask=k1 < K, other=0.0, cache_modifier=".cg")
                x0 = x0.to(gl.float32)
                x1 = x1.to(gl.float32)
                acc += x0 * x0 + x1 * x1
            s2 = gl.where(ms == m, s2 + gl.reduce(acc, 0, add), s2)
        return 1.0 / gl.sqrt(s2 / K + EPS)

    @gluon.jit
    def _row_products(w, x, g, r, s2, NORM: gl.constexpr, H_DT: gl.constexpr, DOT_DT: gl.constexpr):
        """w[BN, KSUB] * A'[1, KSUB] (A' as matmul_tile's), unreduced, and the in-loop norm's running
        squares per column: the caller sums both over K once, after its loop, so the K loop has
        no cross-thread reduction."""
        if NORM == _RMS_IN_LOOP:
            s2 += x * x
            a = (x * g).to(H_DT)
        elif NORM == _RMS_SWEEP:
            a = (x * r * g).to(H_DT)
        else:
            a = x
        return w * a.to(DOT_DT).to(gl.float32), s2

    @gluon.jit
    def _stage_row(xs, gs, a_ptr, sak, nw_ptr, snw, p0, k_hi, M, HAS_NW: gl.constexpr, num_warps: gl.constexpr):
        """Columns [p0, p0 + NCH * KSUB) of the row's activations (and the folded norm's weights),
        fp32, into shared memory as [NCH, KSUB] (zeros past k_hi, or everywhere once a wait gave
        up: M == 0): every load issued at once, so the piece costs one memory latency, not one per
        ring slot. Barriers before (the previous piece was read by every warp) and after (stored)."""
        NCH: gl.constexpr = xs.type.shape[0]
        KSUB: gl.constexpr = xs.type.shape[1]
        TK: gl.constexpr = KSUB // 4 if KSUB // 4 < 32 else 32
        lay: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TK, TK], [num_warps, 1], [1, 0])
        kk = (
            p0
            + gl.arange(0, NCH, layout=gl.SliceLayout(1, lay))[:, None] * KSUB
            + gl.arange(0, KSUB, layout=gl.SliceLayout(0, lay))[None, :]
        )
        mask = (kk < k_hi) & (M > 0)
        x = gl.load(a_ptr + kk * sak, mask=mask, other=0.0, cache_modifier=".cg").to(gl.float32)
        CTA_BARRIER()
        xs.store(x)
        if HAS_NW:
            gs.store(gl.load(nw_ptr + kk * snw, mask=mask, other=0.0).to(gl.float32))
        CTA_BARRIER()

    @gluon.jit
    def _one_row_blocks(
        a_ptr, sak, nw_ptr, snw, k_lo, k_hi, M, r, acc, it, bufs, ready, empty,
        blk: gl.constexpr, KSUB: gl.constexpr, HAS_NW: gl.constexpr,
        NORM: gl.constexpr, H_DT: gl.constexpr, DOT_DT: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        """matmul_tile's K loop for one row (batch-1 decode). Gluon pipelines no loop, and one
        activation load per ring slot would expose an L2 latency per slot (longer than the slot's
        math): the row's activations and norm weights are staged in shared memory a piece of
        XK_PIECE columns at a time (_stage_row), then each slot reads them from there. A slot is
        one or two KSUB halves. Returns (acc, in-loop sum of squares, ring entries consumed)."""
        NUM_BUF: gl.constexpr = bufs.type.shape[0]
        BN: gl.constexpr = bufs.type.shape[1]
        BK: gl.constexpr = bufs.type.shape[2]
        NH: gl.constexpr = BK // KSUB
        NCH: gl.constexpr = XK_PIECE_C // KSUB
        gl.static_assert(NH <= 2, "a ring slot is at most two register halves")
        gl.static_assert(NCH % NH == 0, "a staged piece holds whole ring slots")
        stage: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        xs = gl.allocate_shared_memory(gl.float32, [NCH, KSUB], stage)
        gs = xs
        if HAS_NW:
            gs = gl.allocate_shared_memory(gl.float32, [NCH, KSUB], stage)
        # read back as [1, KSUB] rows in the weights' layout (they broadcast over the slot's rows);
        # the layout may have one dimension fewer than the buffer: .index(c) is a [1, KSUB] row
        xr = xs._reinterpret(gl.float32, [NCH, 1, KSUB], stage)
        gr = gs._reinterpret(gl.float32, [NCH, 1, KSUB], stage)
        prods = gl.zeros([BN, KSUB], gl.float32, layout=blk)  # summed over K after the loop
        sq = gl.zeros([1, KSUB], gl.float32, layout=blk)  # the in-loop norm's squares per column, likewise
        g0 = sq + 1.0
        g1 = g0
        for p0 in range(k_lo, k_hi, NCH * KSUB):
            _stage_row(xs, gs, a_ptr, sak, nw_ptr, snw, p0, k_hi, M, HAS_NW, num_warps)
            for j in range(0, gl.minimum(k_hi - p0, NCH * KSUB), BK):
                c = j // KSUB
                x0 = xr.index(c).load(blk)
                if HAS_NW:
                    g0 = gr.index(c).load(blk)
                s = it % NUM_BUF
                mbarrier.wait(ready.index(s), (it // NUM_BUF) & 1)
                slot = bufs.index(s)
                w = slot.slice(0, KSUB, dim=1).load(blk).to(DOT_DT).to(gl.float32)
                part, sq = _row_products(w, x0, g0, r, sq, NORM, H_DT, DOT_DT)
                prods += part
                if NH == 2:
                    x1 = xr.index(c + 1).load(blk)
                    if HAS_NW:
                        g1 = gr.index(c + 1).load(blk)
                    w = slot.slice(KSUB, KSUB, dim=1).load(blk).to(DOT_DT).to(gl.float32)
                    part, sq = _row_products(w, x1, g1, r, sq, NORM, H_DT, DOT_DT)
                    prods += part
                CTA_BARRIER()  # every compute warp has read the slot before it is given back
                mbarrier.arrive(empty.index(s), count=1)
                it += 1
        acc += gl.reduce(prods, 1, add)[:, None]
        return acc, gl.reduce(gl.reduce(sq, 1, add), 0, add), it

    @gluon.jit
    def matmul_tile(
        row,
        views_ptr,
        tma_ptr,
        idx,
        ok,
        it,
        bufs,
        ready,
        empty,
        A_DT: gl.constexpr,
        C_DT: gl.constexpr,
        DOT_DT: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        BIAS_DT: gl.constexpr,
        NORM: gl.constexpr,
        EPS: gl.constexpr,
        H_DT: gl.constexpr,
        HAS_NW: gl.constexpr,
        NW_DT: gl.constexpr,
        MP: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """One decode matmul instruction (ops/matmul.matmul_tile's arithmetic, BM rows of which M
        are real, M <= MP): C[m, n] (split ks: its fp32 partial) = sum over the instruction's K chunk
        of A'[m, k] * W[n, k], W's [BN, BK] blocks taken from the ring (`it`: ring entries consumed
        so far; returned advanced), A' = A rounded to the dot's dtype, or a folded RMSNorm's input
        (NORM: in the loop, rows scaled at the end; or a sweep first). fp32 accumulation by FMAs
        (M <= 16 rows need no tensor cores). ok == 0 (a wait gave up): the blocks are still taken
        and released (the loader must end), nothing is read or stored."""
        NUM_BUF: gl.constexpr = bufs.type.shape[0]
        BN: gl.constexpr = bufs.type.shape[1]
        BK: gl.constexpr = bufs.type.shape[2]
        # A slot is read KSUB columns at a time: a whole [64, 256] block in registers (and its
        # products) spills at 4 warps.
        KSUB: gl.constexpr = BK if BK < MAX_KSUB_C else MAX_KSUB_C
        VEC: gl.constexpr = 8  # 16 B of bf16 per thread per row
        TPW_K: gl.constexpr = KSUB // VEC if KSUB // VEC < 32 else 32
        TPW_N: gl.constexpr = 32 // TPW_K
        blk: gl.constexpr = gl.BlockedLayout([1, VEC], [TPW_N, TPW_K], [num_warps, 1], [1, 0])
        cols = gl.arange(0, KSUB, layout=gl.SliceLayout(0, blk))
        rows = gl.arange(0, BN, layout=gl.SliceLayout(1, blk))
        ms = gl.arange(0, MP, layout=gl.SliceLayout(0, blk))  # the tile's rows of A and C
        va = arg(row, idx, _A)
        vc = arg(row, idx, _C)
        k_lo = tma_field(tma_ptr, idx, _T_K_LO)
        k_hi = tma_field(tma_ptr, idx, _T_K_HI)
        M = view_size(views_ptr, va, 2) * ok  # 0 rows once a wait gave up: nothing is read
        K = view_size(views_ptr, va, 3)
        N = view_size(views_ptr, vc, 3)
        a_ptr = view_base(views_ptr, va, A_DT)
        sam = view_stride(views_ptr, va, 2)
        sak = view_stride(views_ptr, va, 3)
        nw_ptr = a_ptr
        snw = sak
        if HAS_NW:
            vnw = arg(row, idx, _NW)
            nw_ptr = view_base(views_ptr, vnw, NW_DT)
            snw = view_stride(views_ptr, vnw, 3)
        s2 = gl.zeros([MP], gl.float32, layout=gl.SliceLayout(0, blk))
        rstd = gl.full([MP], 1.0, gl.float32, layout=gl.SliceLayout(0, blk))
        if NORM == _RMS_SWEEP:
            rstd = _rms_sweep(a_ptr, sam, sak, M, K, ms, EPS, num_warps)
        acc = gl.zeros([BN, MP], gl.float32, layout=blk)
        if MP == 1:
            r = gl.reduce(rstd, 0, add)
            acc, s1, it = _one_row_blocks(
                a_ptr, sak, nw_ptr, snw, k_lo, k_hi, M, r, acc, it, bufs, ready, empty,
                blk, KSUB, HAS_NW, NORM, H_DT, DOT_DT, num_warps,
            )  # fmt: skip
            s2 = s2 + s1
        else:  # several rows: one at a time
            for k in range(k_lo, k_hi, BK):
                s = it % NUM_BUF
                mbarrier.wait(ready.index(s), (it // NUM_BUF) & 1)
                slot = bufs.index(s)
                for h in gl.static_range(BK // KSUB):
                    kk = k + h * KSUB + cols
                    kmask = kk < k_hi
                    g = gl.full([KSUB], 1.0, gl.float32, layout=gl.SliceLayout(0, blk))
                    if HAS_NW:
                        g = gl.load(nw_ptr + kk * snw, mask=kmask & (M > 0), other=0.0).to(gl.float32)
                    w = slot.slice(h * KSUB, KSUB, dim=1).load(blk).to(DOT_DT).to(gl.float32)
                    for m in range(0, M):
                        # x after the wait, from L2 (another SM wrote it)
                        x = gl.load(a_ptr + m * sam + kk * sak, mask=kmask, other=0.0, cache_modifier=".cg")
                        x = x.to(gl.float32)
                        if NORM == _RMS_IN_LOOP:
                            s2 = gl.where(ms == m, s2 + gl.reduce(x * x, 0, add), s2)
                            a = (x * g).to(H_DT)
                        elif NORM == _RMS_SWEEP:
                            r = gl.reduce(gl.where(ms == m, rstd, 0.0), 0, add)
                            a = (x * r * g).to(H_DT)
                        else:
                            a = x
                        part = gl.reduce(w * a.to(DOT_DT).to(gl.float32)[None, :], 1, add)
                        acc = gl.where(ms[None, :] == m, acc + part[:, None], acc)
                CTA_BARRIER()  # every compute warp has read the slot before it is given back
                mbarrier.arrive(empty.index(s), count=1)
                it += 1
        if M > 0:
            if NORM == _RMS_IN_LOOP:
                acc = acc * (1.0 / gl.sqrt(s2 / K + EPS))[None, :]
            rn = arg(row, idx, _TN) * BN + rows
            if HAS_BIAS:
                vb = arg(row, idx, _BIAS)
                bias = gl.load(view_base(views_ptr, vb, BIAS_DT) + rn * view_stride(views_ptr, vb, 3), mask=rn < N)
                acc += bias.to(gl.float32)[:, None]
            c_ptr = view_base(views_ptr, vc, C_DT) + arg(row, idx, _KS) * view_stride(views_ptr, vc, 1)
            offs = ms[None, :] * view_stride(views_ptr, vc, 2) + rn[:, None] * view_stride(views_ptr, vc, 3)
            gl.store(c_ptr + offs, acc.to(C_DT), mask=(rn[:, None] < N) & (ms[None, :] < M))
        return it
