"""Weight streaming for batch-1 decode: a persistent, warp-specialized Gluon kernel (sm_90).

`stream_matvec` computes a LIST of independent matvec tiles in one launch. Each tile is BN rows
of one bf16 weight matrix W [N, K] (row-major) times a vector x [K] (bf16 or fp32), accumulated
in fp32 and stored to y (fp32 or bf16). Tile i runs on program i % num_programs.

Per program (one CTA, persistent):
  * loader partition (1 warp): walks the program's tiles and TMA-loads W blocks [BN, BK] into a
    NUM_BUF-deep shared-memory ring (mbarrier `ready` / `empty` per slot). It blocks only on a
    free slot, so it runs ahead into the NEXT tile while compute is busy: cross-tile prefetch.
  * compute partition (the default 4 warps): waits `ready`, reads the block into registers,
    multiplies by the matching x chunk (broadcast, fp32; M=1 needs no tensor cores), releases the
    slot, and at the end of the tile reduces the rows and stores y.

Tile table (int32, NF=12 columns per row; `make_tiles` builds it):
    [weight index, n0 (first row), x offset, y offset, K, N, wait counter, wait count,
     signal counter, 0, 0, 0]
x and y offsets are in elements of the x / y buffers (one 1-D tensor each; several vectors live
in one buffer at different offsets; x and y may be one buffer, so a tile may read what another
wrote: a chain of matvecs in one launch).

Dependencies (a megakernel's, in miniature): a tile with a wait counter >= 0 reads x only once
counters[wait counter] >= wait count (polled with volatile loads, then one acquire; x is then
read from L2, `.cg`); a tile with a signal counter >= 0 adds 1 to it (release) once its rows of
y are stored. Only the compute partition waits: the loader never does (weights depend on
nothing), so it streams the next tiles' weights while compute waits for their inputs. A wait
gives up after MAX_SPIN polls: the kernel records the tile in err[0..1] (1, tile) and drains
the ring without computing or signalling, so every program ends (the loader never blocks on a
slot compute will not free). Counters are the caller's: zero them before a launch (or raise
the counts). Tiles are taken round-robin (tile t on program t % programs) and each program runs
its tiles in table order: a table in topological order whose programs all run at once cannot
deadlock. Weights are passed as up to MAX_W TMA descriptors (Gluon
cannot index a descriptor array at run time: the loader picks one with a static if-chain).
Stacking one weight kind across layers as [L*N, K] makes one descriptor cover all layers.

Importing this module does no CUDA work and never fails without Gluon (`HAVE_GLUON` says if it
is there). Gluon does not run in Triton's interpreter: `stream_matvec` needs a CUDA GPU.
`compile_offline` compiles the kernel for sm_90 on a CPU-only machine and reports registers,
spills and shared memory (python -m mkcompiler.backends.gluon.stream [--json]).
"""

from __future__ import annotations

import json

from mkcompiler.backends.gluon.ptxas import compile_report
from mkcompiler.ir.settings import default_max_spin

NF = 12  # tile table columns
MAX_SPIN = default_max_spin(interpret=False)  # a Gluon kernel runs only on a GPU
# Profile stamps per tile (%globaltimer, ns): the loader asks for its first weight block; compute
# starts it (then waits); its inputs are there; its rows are stored (and signalled).
STAMPS = ("issue", "start", "ready", "end")
NUM_STAMPS = len(STAMPS)
MAX_W = 8  # weight descriptors per launch
COMPUTE_WARPS = 4
LOADER_WARPS = 1
LOADER_REGS = 40

try:  # Gluon (triton.experimental.gluon, 3.6 API); only defines functions, no CUDA work
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

    HAVE_GLUON = True
except Exception:  # noqa: BLE001  (old Triton, or no Triton: the CPU suite must still import this)
    HAVE_GLUON = False


class GluonStreamError(RuntimeError):
    pass


if HAVE_GLUON:
    # 3.6 names first (the later renames raise or differ in 3.6)
    _CTA_BARRIER = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
    _TMA_LOAD = tma.async_copy_global_to_shared if hasattr(tma, "async_copy_global_to_shared") else tma.async_load
    _LOADER_WARPS = gl.constexpr(LOADER_WARPS)
    _LOADER_REGS = gl.constexpr(LOADER_REGS)
    _NF = gl.constexpr(NF)
    _NS = gl.constexpr(NUM_STAMPS)
    _S_ISSUE, _S_START, _S_READY, _S_END = (gl.constexpr(i) for i in range(NUM_STAMPS))

    @gluon.jit
    def _add(a, b):
        # gl.sum's combine fn is a @triton.jit function: an interpreter function in a process that
        # imported Triton with TRITON_INTERPRET=1 (the CPU suite), which cannot be compiled.
        return a + b

    @gluon.jit
    def _issue_load(wid, n0, k, bar, buf, w0, w1, w2, w3, w4, w5, w6, w7, NUM_W: gl.constexpr):
        # Static if-chain over the descriptors: exactly one matches `wid`.
        if wid == 0:
            _TMA_LOAD(w0, [n0, k], bar, buf)
        if NUM_W > 1:
            if wid == 1:
                _TMA_LOAD(w1, [n0, k], bar, buf)
        if NUM_W > 2:
            if wid == 2:
                _TMA_LOAD(w2, [n0, k], bar, buf)
        if NUM_W > 3:
            if wid == 3:
                _TMA_LOAD(w3, [n0, k], bar, buf)
        if NUM_W > 4:
            if wid == 4:
                _TMA_LOAD(w4, [n0, k], bar, buf)
        if NUM_W > 5:
            if wid == 5:
                _TMA_LOAD(w5, [n0, k], bar, buf)
        if NUM_W > 6:
            if wid == 6:
                _TMA_LOAD(w6, [n0, k], bar, buf)
        if NUM_W > 7:
            if wid == 7:
                _TMA_LOAD(w7, [n0, k], bar, buf)

    @gluon.jit
    def _loader(w0, w1, w2, w3, w4, w5, w6, w7, q_ptr, n_tiles, bufs, ready, empty, prof_ptr,
                NUM_W: gl.constexpr, PROFILE: gl.constexpr):  # fmt: skip
        NUM_BUF: gl.constexpr = bufs.type.shape[0]
        BK: gl.constexpr = bufs.type.shape[2]
        NBYTES: gl.constexpr = w0.block_type.nbytes
        it = 0
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            wid = gl.load(q_ptr + t * _NF)
            n0 = gl.load(q_ptr + t * _NF + 1)
            K = gl.load(q_ptr + t * _NF + 4)
            for k in range(0, K, BK):
                s = it % NUM_BUF
                mbarrier.wait(empty.index(s), ((it // NUM_BUF) & 1) ^ 1)  # first pass: free at once
                if PROFILE:
                    if k == 0:  # the tile's first weight block is asked for
                        gl.store(prof_ptr + t * _NS + _S_ISSUE, _now())
                mbarrier.expect(ready.index(s), NBYTES)
                _issue_load(wid, n0, k, ready.index(s), bufs.index(s), w0, w1, w2, w3, w4, w5, w6, w7, NUM_W)
                it += 1

    @gluon.jit
    def _now():
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def _wait_counter(counters_ptr, ctr, cnt, MAX_SPIN: gl.constexpr):
        """True once counters[ctr] >= cnt: volatile polls, then one acquire (the x loads after it
        see what the signalling tile stored); False after MAX_SPIN polls."""
        seen = gl.load(counters_ptr + ctr, volatile=True)
        spins = 0
        while (seen < cnt) & (spins < MAX_SPIN):
            seen = gl.load(counters_ptr + ctr, volatile=True)
            spins += 1
        return gl.atomic_add(counters_ptr + ctr, 0, sem="acquire", scope="gpu") >= cnt

    @gluon.jit
    def _compute(x_ptr, y_ptr, q_ptr, n_tiles, bufs, ready, empty, counters_ptr, err_ptr, prof_ptr,
                 MAX_SPIN: gl.constexpr, PROFILE: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        NUM_BUF: gl.constexpr = bufs.type.shape[0]
        BN: gl.constexpr = bufs.type.shape[1]
        BK: gl.constexpr = bufs.type.shape[2]
        VEC: gl.constexpr = 8  # 16 B of bf16 per thread per row
        TPW_K: gl.constexpr = BK // VEC if BK // VEC < 32 else 32
        TPW_N: gl.constexpr = 32 // TPW_K
        blk: gl.constexpr = gl.BlockedLayout([1, VEC], [TPW_N, TPW_K], [num_warps, 1], [1, 0])
        rows_l: gl.constexpr = gl.SliceLayout(1, blk)
        cols_l: gl.constexpr = gl.SliceLayout(0, blk)
        cols = gl.arange(0, BK, layout=cols_l)
        rows = gl.arange(0, BN, layout=rows_l)
        it = 0
        failed = 0  # once a wait gave up: drain the ring, compute and signal nothing
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            n0 = gl.load(q_ptr + t * _NF + 1)
            x_off = gl.load(q_ptr + t * _NF + 2)
            y_off = gl.load(q_ptr + t * _NF + 3)
            K = gl.load(q_ptr + t * _NF + 4)
            N = gl.load(q_ptr + t * _NF + 5)
            wait_ctr = gl.load(q_ptr + t * _NF + 6)
            wait_cnt = gl.load(q_ptr + t * _NF + 7)
            signal = gl.load(q_ptr + t * _NF + 8)
            if PROFILE:
                gl.store(prof_ptr + t * _NS + _S_START, _now())
            if (failed == 0) & (wait_ctr >= 0):
                if not _wait_counter(counters_ptr, wait_ctr, wait_cnt, MAX_SPIN):
                    failed = 1
                    gl.atomic_xchg(err_ptr + 1, t)
                    gl.atomic_xchg(err_ptr, 1)
            if PROFILE:
                gl.store(prof_ptr + t * _NS + _S_READY, _now())
            acc = gl.zeros([BN, BK], gl.float32, layout=blk)
            for k in range(0, K, BK):
                s = it % NUM_BUF
                kk = k + cols
                # x after the wait, from L2 (another SM wrote it); nothing when failed
                xv = gl.load(x_ptr + x_off + kk, mask=(kk < K) & (failed == 0), other=0.0, cache_modifier=".cg")
                mbarrier.wait(ready.index(s), (it // NUM_BUF) & 1)
                w = bufs.index(s).load(blk)
                _CTA_BARRIER()  # every compute warp has read the slot before it is given back
                mbarrier.arrive(empty.index(s), count=1)
                acc += w.to(gl.float32) * xv.to(gl.float32)[None, :]
                it += 1
            if failed == 0:
                y = gl.reduce(acc, 1, _add)
                rr = n0 + rows
                gl.store(y_ptr + y_off + rr, y.to(y_ptr.dtype.element_ty), mask=rr < N)
                if signal >= 0:
                    _CTA_BARRIER()  # every compute warp's rows are stored before the release
                    gl.atomic_add(counters_ptr + signal, 1, sem="release", scope="gpu")
            if PROFILE:
                gl.store(prof_ptr + t * _NS + _S_END, _now())

    @gluon.jit
    def stream_matvec_kernel(
        w0,
        w1,
        w2,
        w3,
        w4,
        w5,
        w6,
        w7,
        q_ptr,
        n_tiles,
        x_ptr,
        y_ptr,
        counters_ptr,
        err_ptr,
        prof_ptr,
        NUM_W: gl.constexpr,
        NUM_BUF: gl.constexpr,
        MAX_SPIN: gl.constexpr,
        PROFILE: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        bufs = gl.allocate_shared_memory(w0.dtype, [NUM_BUF] + w0.block_type.shape, w0.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NUM_BUF):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        gl.warp_specialize(
            [
                (
                    _compute,
                    (
                        x_ptr,
                        y_ptr,
                        q_ptr,
                        n_tiles,
                        bufs,
                        ready,
                        empty,
                        counters_ptr,
                        err_ptr,
                        prof_ptr,
                        MAX_SPIN,
                        PROFILE,
                        num_warps,
                    ),
                ),
                (
                    _loader,
                    (w0, w1, w2, w3, w4, w5, w6, w7, q_ptr, n_tiles, bufs, ready, empty, prof_ptr, NUM_W, PROFILE),
                ),
            ],
            [_LOADER_WARPS],
            [_LOADER_REGS],
        )


def _require_gluon():
    if not HAVE_GLUON:
        raise GluonStreamError("triton.experimental.gluon (Triton 3.6 API) is not importable")


def weight_layout(BN: int, BK: int):
    _require_gluon()
    return gl.NVMMASharedLayout.get_default_for([BN, BK], gl.bfloat16)


# ---- host side ----


def make_tiles(weights, x_offsets, y_offsets, BN: int, which=None, waits=None, signals=None):
    """Tile table (int32 CPU tensor [T, NF]) covering every row block of the chosen weights.
    weights: list of [N, K] tensors; x_offsets[i] / y_offsets[i]: where weight i's x and y live
    in the x / y buffers (elements). which: weight indices to cover (default: all, in order).
    waits[i]: (counter, count) every tile of weight i waits for, or None; signals[i]: the
    counter each of its tiles adds 1 to, or None."""
    import torch

    rows = []
    for i in range(len(weights)) if which is None else which:
        N, K = weights[i].shape
        ctr, cnt = waits[i] if waits is not None and waits[i] is not None else (-1, 0)
        sig = signals[i] if signals is not None and signals[i] is not None else -1
        for n0 in range(0, N, BN):
            rows.append([i, n0, x_offsets[i], y_offsets[i], K, N, ctr, cnt, sig, 0, 0, 0])
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, NF)


def chain_tiles(weights, x_offset: int, y_offsets, BN: int):
    """Tiles of a chain of matvecs in one buffer: weight 0 reads x at x_offset, weight i > 0
    reads weight i-1's output (at y_offsets[i-1]) once all of its tiles signalled counter i-1."""
    blocks = [-(-w.shape[0] // BN) for w in weights]
    x_offsets = [x_offset] + list(y_offsets[:-1])
    waits = [None] + [(i - 1, blocks[i - 1]) for i in range(1, len(weights))]
    return make_tiles(weights, x_offsets, y_offsets, BN, waits=waits, signals=list(range(len(weights))))


def _check_tiles(weights, xs, ys, tiles, n_counters: int = 0):
    import torch

    if tiles.dim() != 2 or tiles.shape[1] not in (4, NF):
        raise GluonStreamError(f"tiles must be [T, 4] (w, n0, x_off, y_off) or [T, {NF}], got {tuple(tiles.shape)}")
    t = tiles.to("cpu", torch.int64)
    if t.shape[0] == 0:
        return torch.zeros(0, NF, dtype=torch.int32)
    wid = t[:, 0]
    if int(wid.min()) < 0 or int(wid.max()) >= len(weights):
        raise GluonStreamError(f"tile weight index out of range [0, {len(weights)})")
    shapes = torch.tensor([list(w.shape) for w in weights], dtype=torch.int64)
    N, K = shapes[wid, 0], shapes[wid, 1]
    if t.shape[1] == NF and (not torch.equal(t[:, 4], K) or not torch.equal(t[:, 5], N)):
        raise GluonStreamError("tile table columns 4/5 (K, N) do not match the weights' shapes")
    n0, xo, yo = t[:, 1], t[:, 2], t[:, 3]
    if bool((n0 < 0).any() or (n0 >= N).any()):
        raise GluonStreamError("tile n0 outside its weight's rows")
    if bool((xo < 0).any() or (xo + K > xs.numel()).any()):
        raise GluonStreamError("a tile's x range [x_off, x_off + K) is outside xs")
    if bool((yo < 0).any() or (yo + N > ys.numel()).any()):
        raise GluonStreamError("a tile's y range [y_off, y_off + N) is outside ys")
    out = torch.zeros(t.shape[0], NF, dtype=torch.int32)
    out[:, :4] = t[:, :4].to(torch.int32)
    out[:, 4], out[:, 5] = K.to(torch.int32), N.to(torch.int32)
    out[:, 6], out[:, 8] = -1, -1
    if t.shape[1] == NF:
        ctr, sig = t[:, 6], t[:, 8]
        if bool(((ctr >= n_counters) | (sig >= n_counters) | (ctr < -1) | (sig < -1)).any()):
            raise GluonStreamError(f"a tile's wait or signal counter is outside the {n_counters} counters given")
        out[:, 6:9] = t[:, 6:9].to(torch.int32)
    return out


def prepare_stream_matvec(
    weights,
    xs,
    ys,
    tiles,
    BN: int = 64,
    BK: int = 128,
    NUM_BUF: int = 4,
    num_programs=None,
    counters=None,
    profile: bool = False,
):
    """Validate once and build the TMA descriptors; return a no-argument callable that zeroes
    the counters and the error record, then launches (what a benchmark times); `.errors()` of it
    is the error record [flag, tile], `.stamps()` (profile=True: a separate compile) the tiles'
    [T, NUM_STAMPS] %globaltimer stamps (STAMPS). Arguments as for `stream_matvec`."""
    import os

    import torch

    _require_gluon()
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        raise GluonStreamError("stream_matvec needs a CUDA GPU (Gluon does not run in Triton's interpreter)")
    if not 1 <= len(weights) <= MAX_W:
        raise GluonStreamError(f"1..{MAX_W} weight tensors per launch, got {len(weights)} (stack per kind)")
    for w in weights:
        if w.dtype != torch.bfloat16 or w.dim() != 2 or not w.is_cuda or not w.is_contiguous():
            raise GluonStreamError("weights must be contiguous 2-D bf16 CUDA tensors")
        if (w.shape[1] * 2) % 16 or w.data_ptr() % 16:
            raise GluonStreamError("TMA needs 16-byte aligned weight rows and base")
    if xs.dim() != 1 or ys.dim() != 1 or not (xs.is_cuda and ys.is_cuda):
        raise GluonStreamError("xs and ys must be 1-D CUDA tensors")
    if xs.dtype not in (torch.bfloat16, torch.float32) or ys.dtype not in (torch.float32, torch.bfloat16):
        raise GluonStreamError("xs must be bf16/fp32 and ys fp32/bf16")
    if counters is None:
        counters = torch.zeros(1, dtype=torch.int32, device=xs.device)
        n_counters = 0
    elif counters.dtype != torch.int32 or counters.dim() != 1 or counters.device != xs.device:
        raise GluonStreamError("counters must be a 1-D int32 tensor on the vectors' device")
    else:
        n_counters = counters.numel()
    table = _check_tiles(weights, xs, ys, tiles, n_counters).to(xs.device)
    err = torch.zeros(2, dtype=torch.int32, device=xs.device)
    prof = torch.zeros(max(1, table.shape[0]), NUM_STAMPS, dtype=torch.int64, device=xs.device)
    if table.shape[0] == 0:
        launch = lambda: ys  # noqa: E731
        launch.errors, launch.stamps = lambda: err.cpu(), lambda: prof[:0].cpu()
        launch.programs = 0
        return launch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = weight_layout(BN, BK)
    descs = [TensorDescriptor.from_tensor(w, [BN, BK], layout) for w in weights]
    descs += [descs[0]] * (MAX_W - len(descs))  # unused slots: never selected (NUM_W)
    if num_programs is None:
        num_programs = torch.cuda.get_device_properties(xs.device).multi_processor_count
    grid = (max(1, min(num_programs, table.shape[0])),)
    n_tiles = table.shape[0]

    def launch():
        counters.zero_()
        err.zero_()
        stream_matvec_kernel[grid](
            *descs,
            table,
            n_tiles,
            xs,
            ys,
            counters,
            err,
            prof,
            NUM_W=len(weights),
            NUM_BUF=NUM_BUF,
            MAX_SPIN=MAX_SPIN,
            PROFILE=profile,
            num_warps=COMPUTE_WARPS,
        )
        return ys

    launch.errors, launch.stamps = lambda: err.cpu(), lambda: prof.cpu()
    launch.programs = grid[0]  # tile t runs on program t % programs
    return launch


def prefetch_report(stamps, n_tiles: int, programs: int) -> dict:
    """What the stamps of one profiled launch say about cross-tile prefetch. Per program, for
    each tile b after the program's first: lead = end of the tile before it - the time the loader
    asked for b's first weight block (> 0: b's weights were in flight while the previous tile
    still ran); wait = ready - start (what b waited for its inputs). Medians in us."""
    import torch

    s = stamps.to(torch.float64) / 1e3
    leads, waits = [], []
    for p in range(programs):
        mine = list(range(p, n_tiles, programs))
        for a, b in zip(mine, mine[1:]):
            leads.append(s[a, 3] - s[b, 0])
            waits.append(s[b, 2] - s[b, 1])
    if not leads:
        return {"pairs": 0}
    lead, wait = torch.stack(leads), torch.stack(waits)
    return {
        "pairs": len(leads),
        "ahead": float((lead > 0).double().mean()),  # share of tiles whose weights came early
        "lead_us": float(lead.median()),
        "wait_us": float(wait.median()),
        "span_us": float(s[:, 3].max() - s[:, 0].min()),
    }


def stream_matvec(
    weights, xs, ys, tiles, BN: int = 64, BK: int = 128, NUM_BUF: int = 4, num_programs=None, counters=None
):
    """y[y_off + n0 + r] = sum_k W[n0 + r, k] * x[x_off + k] (r < BN, n0 + r < N) for every tile.

    weights: list (<= MAX_W) of contiguous bf16 [N, K] CUDA tensors (K * 2 bytes a multiple of 16);
    xs: 1-D bf16 or fp32 CUDA tensor; ys: 1-D fp32 or bf16 CUDA tensor (written in place; may be
    xs itself); tiles: int [T, 4] (w, n0, x_off, y_off) or [T, NF] (make_tiles, chain_tiles);
    n0 is normally a multiple of BN (tiles that overlap write the same rows); counters: 1-D int32
    tensor the tiles' waits and signals index (zeroed before the launch). Returns ys once the
    kernel has finished; raises GluonStreamError if a wait gave up. Needs a CUDA GPU (sm_90)."""
    launch = prepare_stream_matvec(weights, xs, ys, tiles, BN, BK, NUM_BUF, num_programs, counters)
    launch()
    flag, tile = launch.errors().tolist()
    if flag:
        raise GluonStreamError(f"tile {tile} waited {MAX_SPIN} polls for its input and gave up (a missing signal?)")
    return ys


def prefetch_gantt(stamps, tiles, programs: int, path: str, title: str = "") -> str:
    """A picture of one profiled launch (PROFILE stamps, STAMPS): a row per program, per tile a
    thin bar from the loader's first weight request to the end (its weights in flight) above a
    grey wait (start to ready) and a compute bar (ready to end) coloured by weight. Bars of
    tile i+1 that start left of tile i's end show the cross-tile prefetch. Returns `path`."""
    from matplotlib.figure import Figure

    s = (stamps.double() - stamps.min()).numpy() / 1e3  # us from the first stamp
    wid = tiles[:, 0].tolist()
    fig = Figure(figsize=(12, max(2.0, 0.25 * programs + 1)))
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(max(wid) + 1)]
    for t in range(s.shape[0]):
        y = t % programs
        issue, start, ready, end = s[t]
        ax.broken_barh([(issue, end - issue)], (y + 0.30, 0.15), color=colors[wid[t]], alpha=0.35)
        ax.broken_barh([(start, ready - start)], (y - 0.35, 0.6), color="0.8")
        ax.broken_barh([(ready, end - ready)], (y - 0.35, 0.6), color=colors[wid[t]])
    ax.set_xlabel("us")
    ax.set_ylabel("program")
    ax.set_ylim(-0.6, programs)
    ax.set_title(title or "thin: weights asked for -> tile end; grey: waiting for inputs; colour: computing")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


# ---- offline compile (CPU only) ----


PTX_OPS = (  # counted in an offline report
    "globaltimer",
    "cp.async.bulk.tensor",
    "mbarrier.try_wait",
    "mbarrier.arrive",
    "expect_tx",
    "bar.sync",
    "ld.volatile.global",  # a wait's polls
    "ld.global.gpu.acquire",  # its final acquire
    "atom.global.gpu.release",  # a signal
)


def compile_offline(
    BN: int = 64,
    BK: int = 128,
    NUM_BUF: int = 4,
    x_dtype: str = "bf16",
    y_dtype: str = "fp32",
    num_w: int = MAX_W,
    arch: int = 90,
    keep_asm: bool = False,
    profile: bool = False,
) -> dict:
    """Compile stream_matvec_kernel for sm_`arch` without a GPU; report registers (ptxas: the
    whole CTA's allocation before setmaxnreg), spills, shared memory and PTX op counts."""
    _require_gluon()

    fn = stream_matvec_kernel
    lay = weight_layout(BN, BK)
    desc = f"tensordesc<bf16[{BN}, {BK}],{lay!r}>"
    sig = {f"w{i}": desc for i in range(MAX_W)}
    sig.update(
        q_ptr="*i32",
        n_tiles="i32",
        x_ptr=f"*{x_dtype}",
        y_ptr=f"*{y_dtype}",
        counters_ptr="*i32",
        err_ptr="*i32",
        prof_ptr="*i64",
        NUM_W="constexpr",
        NUM_BUF="constexpr",
        MAX_SPIN="constexpr",
        PROFILE="constexpr",
        num_warps="constexpr",
    )
    attrs = {n: [["tt.divisibility", 16]] for n in ("q_ptr", "x_ptr", "y_ptr", "counters_ptr", "err_ptr")}
    cst = {"NUM_W": num_w, "NUM_BUF": NUM_BUF, "MAX_SPIN": MAX_SPIN, "PROFILE": profile, "num_warps": COMPUTE_WARPS}
    r = compile_report(fn, sig, cst, attrs, COMPUTE_WARPS, arch, PTX_OPS, GluonStreamError, keep_asm)
    r.update(BN=BN, BK=BK, NUM_BUF=NUM_BUF, x_dtype=x_dtype, y_dtype=y_dtype, num_w=num_w)
    return r


def format_report(r: dict) -> str:
    return (
        f"sm_{r['arch']} BN={r['BN']} BK={r['BK']} NUM_BUF={r['NUM_BUF']} x={r['x_dtype']} y={r['y_dtype']}: "
        f"{r['regs']} regs, {r['spilled_bytes']} B spilled, {r['shared']} B shared, "
        f"setmaxnreg {r['setmaxnreg']}, {r['ptx_counts']}, {r['compile_s']:.1f} s"
    )


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Compile the Gluon stream_matvec kernel for sm_90 (no GPU needed).")
    p.add_argument("--bn", type=int, default=64)
    p.add_argument("--bk", type=int, default=128)
    p.add_argument("--num-buf", type=int, default=4)
    p.add_argument("--x-dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--y-dtype", default="fp32", choices=["bf16", "fp32"])
    p.add_argument("--dump", metavar="PREFIX", help="write PREFIX.ptx / PREFIX.ttgir")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = compile_offline(a.bn, a.bk, a.num_buf, a.x_dtype, a.y_dtype, keep_asm=bool(a.dump))
    if a.dump:
        for ext in ("ptx", "ttgir"):
            with open(f"{a.dump}.{ext}", "w") as f:
                f.write(r.pop(ext))
        r.pop("ptxas_log")
    print(json.dumps(r) if a.json else format_report(r))


if __name__ == "__main__":
    main()
