"""Large-M matmul tiles (prefill, large batch) inside the generated Gluon megakernel (sm_90).

A matmul instruction whose tile has more than DECODE_ROWS rows (passes/tile.GLUON_LARGE_TILE:
BM x BN x BK = 128 x 128 x 64) computes C[rows, cols] = A[rows, K chunk] @ W[cols, K chunk]^T
(+ bias) with async wgmma from its own shared-memory ring, beside the decode weight ring:

  * B loader (1 warp, generated: its TMA descriptors are kernel arguments, one per stacked weight
    group, picked by a static if-chain): per large-M instruction of the worker's list, TMA-loads
    the [BN, BK] weight blocks of its K chunk, blocking only on a free slot, never on a counter
    (weights are parameters: nothing in a launch writes them), so it streams ahead of every wait;
  * A loader (1 warp, `prefill_a_loader`): per large-M instruction, waits on its counters
    (tiles.wait_rows, bounded), fences (`fence.proxy.async.global`: A was written by ordinary
    stores, TMA reads through the async proxy), builds A's descriptor on the device from the view
    table (tma.make_tensor_descriptor: any A view and any bound input address, no host work) and
    TMA-loads the [BM, BK] A blocks;
  * compute (`prefill_tile`, the default warpgroup): per K step waits for the slot (both loads),
    issues an async wgmma into a 128x128 fp32 accumulator and gives back the previous step's slot
    once at most one MMA is in flight; epilogue: bias, C (or its split-K fp32 partial) with
    ordinary stores, which the kernel's release signal (tiles.signal) publishes.

Ring protocol (the FIFO of plan.py, a second ring): entry e of a worker's large-M walk is in slot
e % P_BUF; `ready[s]` takes two arrivals (each loader's expect: A's and B's bytes), `empty[s]` one
(compute). Each instruction's first entry is a table field (PTAB_POS), so no partition carries a
ring counter across instructions. A wait that gives up (ok == 0): the A loader from then on only
arrives on `ready` (no loads, no waits), compute still takes and gives back every entry and
stores nothing, the B loader never waits: every partition ends and the launch returns.

Hazards: a slot is given back only after the wgmma that read it completed (warpgroup_mma_wait);
A's device descriptor lives in global scratch (one per CTA: the runtime sets a Triton allocator)
and is rewritten per instruction only after the A loads of the previous one have landed.

What it refuses (problem): operands other than bf16 x bf16 (A and W; C and bias may be any float),
a tile other than GLUON_LARGE_TILE, a folded norm (fuse_norm folds only into decode matmuls), an A
TMA cannot address (K not contiguous, base or row stride not 16-byte aligned). W must be a whole
row-major [N, K] parameter (codegen.unsupported, as for decode matmuls).

Importing this module does no CUDA work and never fails without Gluon (tiles.HAVE_GLUON).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mkcompiler.backends.gluon import tiles
from mkcompiler.backends.gluon.family import Emitted
from mkcompiler.backends.gluon.plan import DecodePlan, MatmulArg, is_large
from mkcompiler.ir.layout import Field
from mkcompiler.ir.queue import Queue
from mkcompiler.ops.base import tl_dtype

MODULE = "mkcompiler.backends.gluon.prefill"
TILE = (128, 128, 64)  # passes/tile.GLUON_LARGE_TILE (passes import nothing from backends)
# The per-instruction table (int32 [n_instr, NUM_PTAB_FIELDS]) the three partitions read: the B
# descriptor, W's first row in its stacked buffer, the K chunk [K_LO, K_HI), and the ring entry of
# the instruction's first K step in its worker's large-M walk (rows of other instructions: 0).
PTAB_DESC, PTAB_ROW, PTAB_K_LO, PTAB_K_HI, PTAB_POS = range(5)
NUM_PTAB_FIELDS = 5
RING_BYTES = 160 * 1024  # the A/B ring alone (a kernel without decode matmuls)
SHARED_RING_BYTES = 96 * 1024  # each ring when the kernel has both (Hopper: 227 KiB per CTA)
MIN_BUF, MAX_BUF = 2, 6


def large(key) -> bool:
    """A matmul opcode key runs here (not as a decode tile)."""
    return is_large(key.tile[0])


def problem(key) -> str | None:
    """Why a large-M matmul opcode cannot run on the Gluon backend (None: it can)."""
    if tuple(key.tile) != TILE:
        return f"a {tuple(key.tile)} tile (large-M Gluon tiles are {TILE}: compile with backend='gluon')"
    if key.a != torch.bfloat16 or key.b != torch.bfloat16 or key.dot != torch.bfloat16:
        return f"{key.a} x {key.b} operands (large-M tiles run bf16 wgmma)"
    if key.norm is not None:
        return "a folded norm in a large-M tile"
    a_k_unit, a_aligned = key.units[0], key.units[4]
    if not (a_k_unit and a_aligned):
        return "an A operand TMA cannot read (K not contiguous, or not 16-byte aligned)"
    return None


def emit(key, opcode: int, queue: Queue) -> Emitted:
    bias = key.bias if key.bias is not None else torch.float32
    dt = {k: tl_dtype(v).replace("tl.", "gl.") for k, v in (("c", key.c), ("bias", bias))}
    return Emitted(
        "",
        f"prefill_tile(row, views_ptr, idx, ok, pring, {dt['c']}, {key.units[3]}, {key.bias is not None}, "
        f"{dt['bias']}, num_warps)",
    )


def has_large(queue: Queue) -> bool:
    return any(k[0] == "matmul" and large(k) for k in queue.opcode_keys)


def ring_depth(ring_bytes: int) -> int:
    bm, bn, bk = TILE
    slot = (bm + bn) * bk * torch.bfloat16.itemsize
    return max(MIN_BUF, min(MAX_BUF, ring_bytes // slot))


def prefill_table(queue: Queue, plan: DecodePlan, groups: Sequence[int]) -> np.ndarray:
    """Per large-M instruction, from the large-M plan's loader walk: (descriptor, first W row in
    its stacked buffer, K_LO, K_HI, its first ring entry)."""
    table = np.zeros((len(queue), NUM_PTAB_FIELDS), dtype=np.int32)
    desc_of = {g: d for d, g in enumerate(groups)}
    for p in plan.workers:
        for e, step in enumerate(p.loads):
            i, b = step.instruction, step.block
            if table[i, PTAB_K_HI] == 0:
                group, row, _ = plan.stacks.locate(b)
                table[i, PTAB_DESC] = desc_of[group]
                table[i, PTAB_ROW] = row
                table[i, PTAB_K_LO] = b.k0
                table[i, PTAB_POS] = e
            table[i, PTAB_K_HI] = b.k1
    return table


# ---- generated source: the B loader and the kernel (codegen.generate joins them) ----

IMPORTS = """\
from mkcompiler.backends.gluon.prefill import A_LAYOUT, PTAB_FIELDS, prefill_a_loader, prefill_tile, ptab_field
"""

B_LOADER = '''

@gluon.jit
def prefill_b_loader({pdescs}, order_ptr, worker_begin_ptr, pring, load_ptr, PROFILE: gl.constexpr):
    """The worker's large-M weight blocks, in list order, into the A/B ring; waits only for free
    slots. PROFILE: load_ptr[idx] = when the instruction's first block was issued."""
    a_bufs, b_bufs, p_ready, p_empty, ptab_ptr = pring
    P_BUF: gl.constexpr = b_bufs.type.shape[0]
    BK: gl.constexpr = b_bufs.type.shape[2]
    NBYTES: gl.constexpr = p0.block_type.nbytes
    pid = gl.program_id(0)
    for cursor in range(gl.load(worker_begin_ptr + pid), gl.load(worker_begin_ptr + pid + 1)):
        idx = gl.load(order_ptr + cursor)
        d = ptab_field(ptab_ptr, idx, PTAB_FIELDS[0])
        row = ptab_field(ptab_ptr, idx, PTAB_FIELDS[1])
        k_lo = ptab_field(ptab_ptr, idx, PTAB_FIELDS[2])
        e = ptab_field(ptab_ptr, idx, PTAB_FIELDS[4])
        for k in range(k_lo, ptab_field(ptab_ptr, idx, PTAB_FIELDS[3]), BK):
            s = e % P_BUF
            mbarrier.wait(p_empty.index(s), ((e // P_BUF) & 1) ^ 1)  # first lap: free at once
            mbarrier.expect(p_ready.index(s), NBYTES)
{issue}            if PROFILE:
                if k == k_lo:
                    gl.store(load_ptr + idx, now())
            e += 1
'''

B_ISSUE = """\
            if d == {d}:
                TMA_LOAD(p{d}, [row, k], p_ready.index(s), b_bufs.index(s))
"""

DECODE_RING = """\
    bufs = gl.allocate_shared_memory(w0.dtype, [NUM_BUF] + w0.block_type.shape, w0.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NUM_BUF):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
"""

NO_DECODE_RING = """\
    bufs = 0  # no decode matmuls: no weight ring (compute's decode names are never read)
    ready = 0
    empty = 0
"""

DECODE_LOADER = """\
            (loader, ({descs}, order_ptr, worker_begin_ptr, tma_ptr, bufs, ready, empty, load_ptr, PROFILE)),
"""

KERNEL = """

@gluon.jit(do_not_specialize=["generation"])
def megakernel({all_descs}, instr_ptr, waits_ptr, counters_ptr, err_ptr, views_ptr, order_ptr, worker_begin_ptr,
               tma_ptr, ptab_ptr, prof_ptr, load_ptr, generation, MAX_SPIN: gl.constexpr, NUM_BUF: gl.constexpr,
               P_BUF: gl.constexpr, PROFILE: gl.constexpr, num_warps: gl.constexpr):
{decode_ring}    # the large-M A/B ring: ready takes both loaders' arrivals, empty compute's
    a_bufs = gl.allocate_shared_memory(p0.dtype, [P_BUF, {bm}, {bk}], A_LAYOUT)
    b_bufs = gl.allocate_shared_memory(p0.dtype, [P_BUF] + p0.block_type.shape, p0.layout)
    p_ready = gl.allocate_shared_memory(gl.int64, [P_BUF, 1], mbarrier.MBarrierLayout())
    p_empty = gl.allocate_shared_memory(gl.int64, [P_BUF, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(P_BUF):
        mbarrier.init(p_ready.index(s), count=2)
        mbarrier.init(p_empty.index(s), count=1)
    pring = (a_bufs, b_bufs, p_ready, p_empty, ptab_ptr)
    gl.warp_specialize(
        [
            (compute, (instr_ptr, waits_ptr, counters_ptr, err_ptr, views_ptr, order_ptr, worker_begin_ptr, tma_ptr,
                       generation, bufs, ready, empty, pring, prof_ptr, MAX_SPIN, PROFILE, num_warps)),
{decode_loader}            (prefill_b_loader, ({pdescs}, order_ptr, worker_begin_ptr, pring, load_ptr, PROFILE)),
            (prefill_a_loader, (instr_ptr, waits_ptr, counters_ptr, err_ptr, views_ptr, order_ptr, worker_begin_ptr,
                                pring, generation, MAX_SPIN)),
        ],
        [{warps}],
        [{regs}],
    )
"""

# What the compute partition's signature gains (codegen.COMPUTE_HEAD, rewritten at generation:
# the decode kernel's source stays as it was).
COMPUTE_PARAMS = ("bufs, ready, empty, prof_ptr", "bufs, ready, empty, pring, prof_ptr")


def source_parts(num_decode: int, num_prefill: int, loader_warps: int, loader_regs: int) -> dict[str, str]:
    """The generated pieces of a kernel with large-M matmuls: imports, the B loader, the kernel."""
    descs = ", ".join(f"w{d}" for d in range(num_decode))
    pdescs = ", ".join(f"p{d}" for d in range(num_prefill))
    workers = 2 + (num_decode > 0)
    bm, _, bk = TILE
    kernel = KERNEL.format(
        all_descs=", ".join(x for x in (descs, pdescs) if x),
        decode_ring=DECODE_RING if num_decode else NO_DECODE_RING,
        decode_loader=DECODE_LOADER.format(descs=descs) if num_decode else "",
        pdescs=pdescs,
        bm=bm,
        bk=bk,
        warps=", ".join([str(loader_warps)] * workers),
        regs=", ".join([str(loader_regs)] * workers),
    )
    loader = B_LOADER.format(pdescs=pdescs, issue="".join(B_ISSUE.format(d=d) for d in range(num_prefill)))
    return {"imports": IMPORTS, "loader": loader, "kernel": kernel}


def b_layout():
    from triton.experimental.gluon import language as gl

    return gl.NVMMASharedLayout.get_default_for([TILE[1], TILE[2]], gl.bfloat16)


# ---- device functions ----

if tiles.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

    from mkcompiler.backends.gluon.matmul import _acc_layout
    from mkcompiler.backends.gluon.tiles import (
        TMA_LOAD,
        arg,
        arg_at,
        field,
        view_base,
        view_size,
        view_stride,
        wait_rows,
    )

    A_LAYOUT = gl.constexpr(gl.NVMMASharedLayout.get_default_for([TILE[0], TILE[2]], gl.bfloat16))
    PTAB_FIELDS = gl.constexpr((PTAB_DESC, PTAB_ROW, PTAB_K_LO, PTAB_K_HI, PTAB_POS))
    _NUM_PTAB = gl.constexpr(NUM_PTAB_FIELDS)
    _K_LO = gl.constexpr(PTAB_K_LO)
    _K_HI = gl.constexpr(PTAB_K_HI)
    _POS = gl.constexpr(PTAB_POS)
    _A = gl.constexpr(int(MatmulArg.A))
    _BIAS = gl.constexpr(int(MatmulArg.BIAS))
    _C = gl.constexpr(int(MatmulArg.C))
    _TM = gl.constexpr(int(MatmulArg.TM))
    _TN = gl.constexpr(int(MatmulArg.TN))
    _KS = gl.constexpr(int(MatmulArg.KS))
    _WAIT_BEGIN = gl.constexpr(int(Field.WAIT_BEGIN))
    _WAIT_END = gl.constexpr(int(Field.WAIT_END))

    @gluon.jit
    def ptab_field(ptab_ptr, idx, f: gl.constexpr):
        return gl.load(ptab_ptr + idx * _NUM_PTAB + f)

    @gluon.jit
    def fence_proxy_async_global():
        """Order the acquired data (ordinary stores of other CTAs) before this thread's TMA reads
        (the async proxy): no Gluon op in 3.6, so inline PTX."""
        gl.inline_asm_elementwise(
            "fence.proxy.async.global; mov.u32 $0, 0;", "=r", [], dtype=gl.int32, is_pure=False, pack=1
        )

    @gluon.jit
    def _landed(p_ready, first, last):
        """Wait until the ring entries [max(first, last - P_BUF + 1), last] are filled: the A loads
        still in flight from the previous instruction's descriptor (older entries were given back,
        so they landed). A slot cannot be two laps past an entry this loader has not refilled."""
        P_BUF: gl.constexpr = p_ready.type.shape[0]
        for e in range(gl.maximum(first, last - P_BUF + 1), last + 1):
            mbarrier.wait(p_ready.index(e % P_BUF), (e // P_BUF) & 1)

    @gluon.jit
    def prefill_a_loader(instr_ptr, waits_ptr, counters_ptr, err_ptr, views_ptr, order_ptr, worker_begin_ptr, pring,
                         generation, MAX_SPIN: gl.constexpr):  # fmt: skip
        """Per large-M instruction of the worker's list: its wait (bounded), then its A blocks
        into the ring. After a wait gave up (ok == 0): no waits, no loads, only the arrivals
        compute needs to take every entry."""
        a_bufs, b_bufs, p_ready, p_empty, ptab_ptr = pring
        P_BUF: gl.constexpr = a_bufs.type.shape[0]
        BM: gl.constexpr = a_bufs.type.shape[1]
        BK: gl.constexpr = a_bufs.type.shape[2]
        NBYTES: gl.constexpr = BM * BK * 2
        pid = gl.program_id(0)
        ok = 1
        first = 0  # entries [first, last] may hold loads through the current descriptor
        last = -1
        for cursor in range(gl.load(worker_begin_ptr + pid), gl.load(worker_begin_ptr + pid + 1)):
            idx = gl.load(order_ptr + cursor)
            k_lo = ptab_field(ptab_ptr, idx, _K_LO)
            k_hi = ptab_field(ptab_ptr, idx, _K_HI)
            pos = ptab_field(ptab_ptr, idx, _POS)
            if k_hi > k_lo:  # a large-M instruction with K steps (others have no entries)
                if ok != 0:
                    w0 = field(instr_ptr, idx, _WAIT_BEGIN)
                    ok = wait_rows(waits_ptr, counters_ptr, err_ptr, idx, w0, field(instr_ptr, idx, _WAIT_END),
                                   generation, MAX_SPIN)  # fmt: skip
                e = pos
                if ok != 0:
                    fence_proxy_async_global()
                    _landed(p_ready, first, last)
                    va = arg_at(instr_ptr, idx, _A)
                    desc = tma.make_tensor_descriptor(
                        view_base(views_ptr, va, gl.bfloat16),
                        [view_size(views_ptr, va, 2).to(gl.int32), view_size(views_ptr, va, 3).to(gl.int32)],
                        [view_stride(views_ptr, va, 2), 1],
                        [BM, BK],
                        a_bufs.type.layout,
                    )
                    off_m = arg_at(instr_ptr, idx, _TM) * BM
                    for k in range(k_lo, k_hi, BK):
                        s = e % P_BUF
                        mbarrier.wait(p_empty.index(s), ((e // P_BUF) & 1) ^ 1)
                        mbarrier.expect(p_ready.index(s), NBYTES)
                        TMA_LOAD(desc, [off_m, k], p_ready.index(s), a_bufs.index(s))
                        e += 1
                else:
                    for _k in range(k_lo, k_hi, BK):
                        s = e % P_BUF
                        mbarrier.wait(p_empty.index(s), ((e // P_BUF) & 1) ^ 1)
                        mbarrier.arrive(p_ready.index(s), count=1)
                        e += 1
                first = pos
                last = e - 1

    @gluon.jit
    def prefill_tile(row, views_ptr, idx, ok, pring, C_DT: gl.constexpr, C_N_UNIT: gl.constexpr,
                     HAS_BIAS: gl.constexpr, BIAS_DT: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        """One large-M matmul instruction: C[rows, cols] (split KS: its fp32 partial) = the K chunk
        of A @ W^T (+ bias), fp32 accumulation by async wgmma from the A/B ring. ok == 0 (a wait
        gave up): every entry is still taken and given back (the MMAs read whatever the slots
        hold), nothing is stored."""
        a_bufs, b_bufs, p_ready, p_empty, ptab_ptr = pring
        P_BUF: gl.constexpr = a_bufs.type.shape[0]
        BM: gl.constexpr = a_bufs.type.shape[1]
        BK: gl.constexpr = a_bufs.type.shape[2]
        BN: gl.constexpr = b_bufs.type.shape[1]
        acc_layout: gl.constexpr = _acc_layout(BM, BN, num_warps)
        k_lo = ptab_field(ptab_ptr, idx, _K_LO)
        k_hi = ptab_field(ptab_ptr, idx, _K_HI)
        pos = ptab_field(ptab_ptr, idx, _POS)
        va = arg(row, idx, _A)
        vc = arg(row, idx, _C)
        N = view_size(views_ptr, vc, 3)
        rn = arg(row, idx, _TN) * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_layout))
        acc = gl.zeros([BM, BN], gl.float32, layout=acc_layout)
        if HAS_BIAS:  # the MMAs accumulate onto the bias: no [BN] vector live in the epilogue
            vb = arg(row, idx, _BIAS)
            bias = gl.load(view_base(views_ptr, vb, BIAS_DT) + rn * view_stride(views_ptr, vb, 3), mask=rn < N)
            acc += bias.to(gl.float32)[None, :]
        e = pos
        for _k in range(k_lo, k_hi, BK):
            s = e % P_BUF
            mbarrier.wait(p_ready.index(s), (e // P_BUF) & 1)
            tok = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, (tok,))  # the previous step's MMA has completed
            if e > pos:
                mbarrier.arrive(p_empty.index((e - 1) % P_BUF), count=1)
            e += 1
        acc = warpgroup_mma_wait(0, (acc,))
        if e > pos:
            mbarrier.arrive(p_empty.index((e - 1) % P_BUF), count=1)
        if ok != 0:
            M = view_size(views_ptr, va, 2)
            rm = arg(row, idx, _TM) * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_layout))
            c_ptr = view_base(views_ptr, vc, C_DT) + arg(row, idx, _KS) * view_stride(views_ptr, vc, 1)
            # A literal unit column stride (C_N_UNIT: the key's) and a row pointer per row: each
            # thread's columns are immediate offsets, not 64 more address registers (with the bias
            # in the epilogue, or a second store path for inner tiles, 128x128 spilled).
            rows = c_ptr + rm * view_stride(views_ptr, vc, 2)
            if C_N_UNIT:
                ptrs = rows[:, None] + rn[None, :]
            else:
                ptrs = rows[:, None] + rn[None, :] * view_stride(views_ptr, vc, 3)
            gl.store(ptrs, acc.to(C_DT), mask=(rm[:, None] < M) & (rn[None, :] < N))
