"""Large-M matmul for Hopper: a persistent, warp-specialized Gluon kernel (sm_90).

    C[M, N] = A[M, K] @ B[N, K]^T (+ R[M, N])

A, B, R and C are bf16 (B in nn.Linear's weight layout, K contiguous); products accumulate in
fp32 (wgmma) and C is rounded to bf16 once, after the optional residual add (also in fp32).

Per program (one CTA per SM, persistent over output tiles):
  * loader partition (1 warp, few registers): walks the program's tiles and TMA-loads the A block
    [BM, BK] and the B block [BN, BK] of every K step into a STAGES-deep shared-memory ring
    (mbarrier `ready` / `empty` per slot). It blocks only on a free slot, so it runs ahead into
    the next tile while compute finishes the current one. With a residual it also TMA-loads the
    tile's R block into the epilogue buffer once compute has given that buffer back.
  * compute partition (the default warps: one warpgroup up to a 128x128 tile, two beyond; the
    fp32 accumulator lives in registers, at most 128 per thread): per K step waits `ready`,
    issues an async wgmma (A and B straight from shared memory; B's [BN, BK] block viewed as
    [BK, BN], which is wgmma's native K-major B), then waits until at most that one MMA is in
    flight, so the MMA of the previous step has completed and ITS slot is released. Epilogue:
    fp32 accumulator (+ R) -> bf16 -> the epilogue buffer -> TMA store, left in flight while
    the next tile's K loop runs.

Tiles are taken in a grouped order (GROUP_M row blocks share a column block before moving on:
B blocks are reused from L2 across those rows): tile t runs on program t % programs, in
increasing t; both partitions walk the same sequence (the ring is a FIFO between them).
Ragged edges need no masks: TMA loads fill rows/columns outside A, B, R with zeros (zero
products in the K tail) and TMA stores clip at C's edges.

Invariants (the hazards of an async pipeline):
  * a ring slot is given back only after the wgmma that read it completed (warpgroup_mma_wait);
    with two compute warpgroups, both must have passed that wait (a partition barrier) before
    the one elected thread arrives on `empty`;
  * the epilogue buffer is rewritten only after the previous tile's TMA store has read it
    (tma.store_wait(0) + a partition barrier); with a residual, compute signals `c_free` for tile
    i only then (early in tile i's K loop, so the loader's R load overlaps the MMAs), and the
    loader waits on it before loading R(i) into the buffer;
  * generic-proxy writes to shared memory (the epilogue's stores) are fenced
    (fence_async_shared) before the TMA store (async proxy) reads them.

Importing this module does no CUDA work and never fails without Gluon (`HAVE_GLUON` says if it
is there). Gluon does not run in Triton's interpreter: `gluon_matmul` needs a Hopper GPU.
`compile_offline` compiles the kernel for sm_90 on a CPU-only machine and reports registers,
spills and shared memory (python -m mkcompiler.backends.gluon.matmul [--json]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mkcompiler.backends.gluon.ptxas import compile_report

LOADER_WARPS = 1
LOADER_REGS = 40
DEFAULT_BLOCK = (128, 128, 64)
DEFAULT_STAGES = 4
DEFAULT_GROUP_M = 8
# Hopper's shared memory per block (227 KiB opt-in); the kernel's need is checked against it before
# a launch, so an oversized (block, stages) fails with a clear message instead of a launch error.
MAX_SHARED_BYTES = 232448

try:  # Gluon (triton.experimental.gluon, 3.6 API); only defines functions, no CUDA work
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    HAVE_GLUON = hasattr(gluon, "constexpr_function")  # the tile-shape helpers below need it
except Exception:  # noqa: BLE001  (old Triton, or no Triton: the CPU suite must still import this)
    HAVE_GLUON = False


class GluonMatmulError(ValueError):
    pass


@dataclass(frozen=True)
class MatmulConfig:
    """One compiled variant: tile (BM, BN, BK), ring depth, tile grouping, compute warps
    (`warps`: 4 or 8, one or two warpgroups; 0 = `num_warps`' default)."""

    BM: int = DEFAULT_BLOCK[0]
    BN: int = DEFAULT_BLOCK[1]
    BK: int = DEFAULT_BLOCK[2]
    stages: int = DEFAULT_STAGES
    group_m: int = DEFAULT_GROUP_M
    warps: int = 0

    @property
    def num_warps(self) -> int:
        """Compute warps: by default one warpgroup up to 128x128 and two beyond (at most 128 fp32
        accumulator registers per thread)."""
        if self.warps:
            return self.warps
        return 8 if self.BM * self.BN > 128 * 128 else 4

    def tiles(self, M: int, N: int) -> int:
        """Output tiles of an M x N product."""
        return -(-M // self.BM) * -(-N // self.BN)

    def shared_bytes(self) -> int:
        """The ring (A and B blocks per stage) plus the epilogue buffer, bf16, plus barriers."""
        ring = self.stages * (self.BM + self.BN) * self.BK * 2
        return ring + self.BM * self.BN * 2 + (2 * self.stages + 2) * 8

    def check(self) -> None:
        if self.BM not in (64, 128):
            raise GluonMatmulError(f"BM must be 64 or 128 (one or two wgmma row groups of 64), got {self.BM}")
        if self.BN not in (64, 128, 256):
            raise GluonMatmulError(f"BN must be 64, 128 or 256, got {self.BN}")
        if self.BK not in (32, 64, 128):
            raise GluonMatmulError(f"BK must be 32, 64 or 128, got {self.BK}")
        if not 2 <= self.stages <= 8:
            raise GluonMatmulError(f"stages must be 2..8, got {self.stages}")
        if self.warps not in (0, 4, 8):
            raise GluonMatmulError(f"warps must be 4 or 8 (0: the default), got {self.warps}")
        if self.BM * self.BN // (self.num_warps * 32) > 128:
            raise GluonMatmulError(
                f"a {self.BM}x{self.BN} fp32 accumulator over {self.num_warps} warps needs more than 128 registers "
                "per thread (spills): 8 warps"
            )
        if self.group_m < 1:
            raise GluonMatmulError(f"group_m must be >= 1, got {self.group_m}")
        if self.shared_bytes() > MAX_SHARED_BYTES:
            raise GluonMatmulError(
                f"block {(self.BM, self.BN, self.BK)} with {self.stages} stages needs {self.shared_bytes()} B of "
                f"shared memory (> {MAX_SHARED_BYTES}): fewer stages or a smaller tile"
            )


def config_of(
    block=DEFAULT_BLOCK, stages: int = DEFAULT_STAGES, group_m: int = DEFAULT_GROUP_M, warps: int = 0
) -> MatmulConfig:
    if len(block) != 3:
        raise GluonMatmulError(f"block must be (BM, BN, BK), got {block!r}")
    cfg = MatmulConfig(int(block[0]), int(block[1]), int(block[2]), int(stages), int(group_m), int(warps))
    cfg.check()
    return cfg


if HAVE_GLUON:
    # 3.6 names first (the later renames raise or differ in 3.6)
    _PART_BARRIER = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
    _TMA_LOAD = tma.async_copy_global_to_shared if hasattr(tma, "async_copy_global_to_shared") else tma.async_load
    _TMA_STORE = tma.async_copy_shared_to_global if hasattr(tma, "async_copy_shared_to_global") else tma.async_store
    _LOADER_WARPS = gl.constexpr(LOADER_WARPS)
    _LOADER_REGS = gl.constexpr(LOADER_REGS)

    @gluon.constexpr_function
    def _acc_layout(BM, BN, num_warps):
        """wgmma accumulator layout: warps stacked along M (16 rows each, a warpgroup per 64 rows),
        the rest along N; the instruction's N is the largest multiple of 8 (<= 256) that tiles a
        warp column's share of BN."""
        warps_m = min(num_warps, BM // 16)
        warps_n = num_warps // warps_m
        n = min(256, BN // warps_n)
        while BN % n or n % 8:
            n -= 8
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps_m, warps_n], instr_shape=[16, n, 16])

    @gluon.jit
    def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
        """(pid_m, pid_n) of a linear tile index in the grouped order: GROUP_M row blocks walk a
        column block together (the last group may be shorter)."""
        in_group = GROUP_M * num_pid_n
        first_m = (tile // in_group) * GROUP_M
        group_rows = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % group_rows
        pid_n = (tile % in_group) // group_rows
        return pid_m, pid_n

    @gluon.jit
    def _loader(a_desc, b_desc, r_desc, ring, epilogue, HAS_RES: gl.constexpr, GROUP_M: gl.constexpr):
        a_bufs, b_bufs, ready, empty = ring
        c_buf, c_free, r_ready = epilogue
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        NBYTES: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        M = a_desc.shape[0]
        K = a_desc.shape[1]
        N = b_desc.shape[0]
        num_pid_m = gl.cdiv(M, BM)
        num_pid_n = gl.cdiv(N, BN)
        it = 0  # ring position over all of this program's K steps
        i = 0  # this program's tile count
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            off_m = pid_m * BM
            off_n = pid_n * BN
            for k in range(0, K, BK):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # first pass: free at once
                mbarrier.expect(ready.index(s), NBYTES)
                _TMA_LOAD(a_desc, [off_m, k], ready.index(s), a_bufs.index(s))
                _TMA_LOAD(b_desc, [off_n, k], ready.index(s), b_bufs.index(s))
                it += 1
            if HAS_RES:
                # After this tile's K loads (not before): compute gives the epilogue buffer back
                # early in the tile's K loop, which needs those loads.
                mbarrier.wait(c_free, i & 1)
                mbarrier.expect(r_ready, r_desc.block_type.nbytes)
                _TMA_LOAD(r_desc, [off_m, off_n], r_ready, c_buf)
            i += 1

    @gluon.jit
    def _compute(a_desc, b_desc, c_desc, ring, epilogue, HAS_RES: gl.constexpr, GROUP_M: gl.constexpr,
                 num_warps: gl.constexpr):  # fmt: skip
        a_bufs, b_bufs, ready, empty = ring
        c_buf, c_free, r_ready = epilogue
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        BM: gl.constexpr = c_desc.block_type.shape[0]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        acc_layout: gl.constexpr = _acc_layout(BM, BN, num_warps)
        M = a_desc.shape[0]
        K = a_desc.shape[1]
        N = b_desc.shape[0]
        num_pid_m = gl.cdiv(M, BM)
        num_pid_n = gl.cdiv(N, BN)
        k_steps = gl.cdiv(K, BK)
        it = 0
        i = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            acc = gl.zeros([BM, BN], gl.float32, layout=acc_layout)
            for ki in range(k_steps):
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                tok = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(1, (tok,))  # the previous step's MMA has completed
                if ki > 0:
                    _release(empty.index((it - 1) % STAGES), num_warps)
                elif HAS_RES:
                    # The previous tile's TMA store has read the epilogue buffer: the loader may
                    # fill it with this tile's R.
                    tma.store_wait(0)
                    _PART_BARRIER()
                    mbarrier.arrive(c_free, count=1)
                it += 1
            acc = warpgroup_mma_wait(0, (acc,))
            _release(empty.index((it - 1) % STAGES), num_warps)
            if HAS_RES:
                mbarrier.wait(r_ready, i & 1)
                acc = acc + c_buf.load(acc_layout).to(gl.float32)
                _PART_BARRIER()  # every thread has read R before any overwrites it with C
            else:
                tma.store_wait(0)  # the previous tile's store has read the buffer (long since)
                _PART_BARRIER()
            c_buf.store(acc.to(c_desc.dtype))
            fence_async_shared()  # generic-proxy stores before the async-proxy (TMA) read
            _TMA_STORE(c_desc, [pid_m * BM, pid_n * BN], c_buf)
            i += 1
        tma.store_wait(0)

    @gluon.jit
    def _release(bar, num_warps: gl.constexpr):
        """Give a ring slot back. One elected thread arrives; with two warpgroups both must have
        passed their wgmma wait first (each warpgroup's MMA reads the slot)."""
        if num_warps > 4:
            _PART_BARRIER()
        mbarrier.arrive(bar, count=1)

    @gluon.jit
    def gluon_matmul_kernel(a_desc, b_desc, c_desc, r_desc, HAS_RES: gl.constexpr, STAGES: gl.constexpr,
                            GROUP_M: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        c_buf = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        epi = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        for j in gl.static_range(2):
            mbarrier.init(epi.index(j), count=1)
        ring = (a_bufs, b_bufs, ready, empty)
        epilogue = (c_buf, epi.index(0), epi.index(1))  # the buffer, c_free, r_ready
        gl.warp_specialize(
            [
                (_compute, (a_desc, b_desc, c_desc, ring, epilogue, HAS_RES, GROUP_M, num_warps)),
                (_loader, (a_desc, b_desc, r_desc, ring, epilogue, HAS_RES, GROUP_M)),
            ],
            [_LOADER_WARPS],
            [_LOADER_REGS],
        )


def _require_gluon():
    if not HAVE_GLUON:
        raise GluonMatmulError("triton.experimental.gluon (Triton 3.6 API) is not importable")


def _layouts(cfg: MatmulConfig):
    """NVMMA shared layouts of the A, B and C (= R) blocks (the TMA boxes)."""
    _require_gluon()
    a = gl.NVMMASharedLayout.get_default_for([cfg.BM, cfg.BK], gl.bfloat16)
    b = gl.NVMMASharedLayout.get_default_for([cfg.BN, cfg.BK], gl.bfloat16)
    c = gl.NVMMASharedLayout.get_default_for([cfg.BM, cfg.BN], gl.bfloat16)
    return a, b, c


# ---- host side ----


def _check_operand(name: str, t, shape: tuple[int, int] | None = None) -> None:
    """A 2-D bf16 tensor TMA can address: last dim contiguous, rows 16-byte aligned (bf16: a
    multiple of 8 elements), base 16-byte aligned."""
    import torch

    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise GluonMatmulError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}")
    if t.dtype != torch.bfloat16:
        raise GluonMatmulError(f"{name} must be bf16, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise GluonMatmulError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise GluonMatmulError(f"{name} is empty {tuple(t.shape)}")
    if t.shape[1] % 8:
        raise GluonMatmulError(
            f"{name}'s last dimension ({t.shape[1]}) must be a multiple of 8: TMA needs 16-byte aligned rows"
        )
    if t.stride(1) != 1 or (t.stride(0) * 2) % 16 or (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
        raise GluonMatmulError(f"{name} must be row-major with 16-byte aligned rows, got strides {t.stride()}")
    if t.data_ptr() % 16:
        raise GluonMatmulError(f"{name}'s base address must be 16-byte aligned")


def check_operands(a, b, residual=None, out=None) -> tuple[int, int, int]:
    """(M, N, K) of a valid call, else GluonMatmulError saying what is wrong; device-agnostic
    (the shape, dtype and TMA alignment rules only)."""
    _check_operand("a", a)
    M, K = a.shape
    _check_operand("b", b)
    N = b.shape[0]
    if b.shape[1] != K:
        raise GluonMatmulError(f"b is [N, K] (nn.Linear's weight): got {tuple(b.shape)} for a of {tuple(a.shape)}")
    if residual is not None:
        _check_operand("residual", residual, (M, N))
    if out is not None:
        _check_operand("out", out, (M, N))
    elif N % 8:
        raise GluonMatmulError(f"N ({N}) must be a multiple of 8: TMA needs 16-byte aligned rows of C")
    return M, N, K


def prepare_gluon_matmul(a, b, residual=None, out=None, cfg: MatmulConfig | None = None, num_programs=None):
    """Validate once and build the TMA descriptors; return a no-argument callable that launches
    the kernel and returns `out` (what a benchmark times or a CUDA graph captures: the tensors
    stay bound, so keep them alive and in place). Arguments as for `gluon_matmul`."""
    import os

    import torch

    _require_gluon()
    cfg = cfg or MatmulConfig()
    cfg.check()
    M, N, _ = check_operands(a, b, residual, out)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        raise GluonMatmulError("gluon_matmul needs a CUDA GPU (Gluon does not run in Triton's interpreter)")
    if out is None:
        out = torch.empty(M, N, device=a.device, dtype=torch.bfloat16)
    tensors = [t for t in (a, b, residual, out) if t is not None]
    if not all(t.is_cuda for t in tensors) or len({t.device for t in tensors}) != 1:
        raise GluonMatmulError(f"all tensors must be on one CUDA device, got {[str(t.device) for t in tensors]}")
    major, minor = torch.cuda.get_device_capability(a.device)
    if major != 9:
        raise GluonMatmulError(f"gluon_matmul is written for Hopper (sm_90: wgmma), this GPU is sm_{major}{minor}")
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    a_lay, b_lay, c_lay = _layouts(cfg)
    a_desc = TensorDescriptor.from_tensor(a, [cfg.BM, cfg.BK], a_lay)
    b_desc = TensorDescriptor.from_tensor(b, [cfg.BN, cfg.BK], b_lay)
    c_desc = TensorDescriptor.from_tensor(out, [cfg.BM, cfg.BN], c_lay)
    r_desc = c_desc if residual is None else TensorDescriptor.from_tensor(residual, [cfg.BM, cfg.BN], c_lay)
    if num_programs is None:
        num_programs = torch.cuda.get_device_properties(a.device).multi_processor_count
    grid = (max(1, min(int(num_programs), cfg.tiles(M, N))),)
    has_res = residual is not None

    def launch():
        gluon_matmul_kernel[grid](
            a_desc,
            b_desc,
            c_desc,
            r_desc,
            HAS_RES=has_res,
            STAGES=cfg.stages,
            GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps,
        )
        return out

    launch.programs = grid[0]
    launch.out = out
    return launch


def gluon_matmul(
    a,
    b,
    residual=None,
    *,
    block=DEFAULT_BLOCK,
    stages: int = DEFAULT_STAGES,
    group_m: int = DEFAULT_GROUP_M,
    warps: int = 0,
    out=None,
    num_programs=None,
):
    """C = a @ b.T (+ residual), bf16 in and out, fp32 accumulation; one persistent launch.

    a: [M, K] bf16 CUDA tensor; b: [N, K] bf16 (nn.Linear weight layout); residual: optional
    [M, N] bf16, added in fp32 before the single rounding to bf16; out: optional [M, N] bf16
    (may be `residual` itself: each tile reads its R block before writing C there). K and N must
    be multiples of 8 and every row 16-byte aligned (TMA); M is free. block = (BM, BN, BK):
    BM in {64, 128}, BN in {64, 128, 256}, BK in {32, 64, 128}; stages: ring depth (shared
    memory must fit: (BM + BN) * BK * 2 B per stage plus a BM x BN bf16 epilogue buffer);
    group_m: row blocks that walk a column block together (L2 reuse of B); warps: compute warps
    (4 or 8; 0: 4 up to a 128x128 tile, else 8). num_programs: CTAs (default: one per SM).
    Needs a Hopper GPU (sm_90)."""
    cfg = config_of(block, stages, group_m, warps)
    return prepare_gluon_matmul(a, b, residual, out, cfg, num_programs)()


# ---- offline compile (CPU only) ----


PTX_OPS = (  # counted in an offline report
    "wgmma.mma_async",
    "wgmma.wait_group",
    "cp.async.bulk.tensor.2d.shared::cluster.global",  # TMA loads
    "cp.async.bulk.tensor.2d.global.shared::cta",  # TMA stores
    "cp.async.bulk.wait_group",
    "fence.proxy.async",
    "mbarrier.try_wait",
    "mbarrier.arrive",
    "expect_tx",
    "bar.sync",
    "ld.local",
    "st.local",
)


def compile_offline(
    block=DEFAULT_BLOCK,
    stages: int = DEFAULT_STAGES,
    group_m: int = DEFAULT_GROUP_M,
    residual: bool = False,
    warps: int = 0,
    arch: int = 90,
    keep_asm: bool = False,
) -> dict:
    """Compile gluon_matmul_kernel for sm_`arch` without a GPU; report registers (ptxas: the
    whole CTA's allocation before setmaxnreg), spills, shared memory and PTX op counts."""
    _require_gluon()
    cfg = config_of(block, stages, group_m, warps)
    a_lay, b_lay, c_lay = _layouts(cfg)
    sig = {
        "a_desc": f"tensordesc<bf16[{cfg.BM}, {cfg.BK}],{a_lay!r}>",
        "b_desc": f"tensordesc<bf16[{cfg.BN}, {cfg.BK}],{b_lay!r}>",
        "c_desc": f"tensordesc<bf16[{cfg.BM}, {cfg.BN}],{c_lay!r}>",
        "r_desc": f"tensordesc<bf16[{cfg.BM}, {cfg.BN}],{c_lay!r}>",
        "HAS_RES": "constexpr",
        "STAGES": "constexpr",
        "GROUP_M": "constexpr",
        "num_warps": "constexpr",
    }
    cst = {"HAS_RES": residual, "STAGES": cfg.stages, "GROUP_M": cfg.group_m, "num_warps": cfg.num_warps}
    r = compile_report(gluon_matmul_kernel, sig, cst, {}, cfg.num_warps, arch, PTX_OPS, GluonMatmulError, keep_asm)
    r.update(
        block=[cfg.BM, cfg.BN, cfg.BK],
        stages=cfg.stages,
        group_m=cfg.group_m,
        residual=residual,
        shared_estimate=cfg.shared_bytes(),
    )
    return r


def format_report(r: dict) -> str:
    bm, bn, bk = r["block"]
    return (
        f"sm_{r['arch']} gluon_matmul {bm}x{bn}x{bk} stages={r['stages']} group_m={r['group_m']} "
        f"residual={r['residual']} warps={r['num_warps']}: {r['regs']} regs, {r['spilled_bytes']} B spilled, "
        f"{r['shared']} B shared, setmaxnreg {r['setmaxnreg']}, {r['ptx_counts']}, {r['compile_s']:.1f} s"
    )


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Compile the Gluon matmul kernel for sm_90 (no GPU needed).")
    p.add_argument("--block", default="128,128,64", help="BM,BN,BK")
    p.add_argument("--stages", type=int, default=DEFAULT_STAGES)
    p.add_argument("--group-m", type=int, default=DEFAULT_GROUP_M)
    p.add_argument("--residual", action="store_true")
    p.add_argument("--warps", type=int, default=0, help="compute warps, 4 or 8 (default: by tile size)")
    p.add_argument("--dump", metavar="PREFIX", help="write PREFIX.ptx / PREFIX.ttgir")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    block = tuple(int(v) for v in a.block.split(","))
    r = compile_offline(block, a.stages, a.group_m, a.residual, a.warps, keep_asm=bool(a.dump))
    if a.dump:
        for ext in ("ptx", "ttgir"):
            with open(f"{a.dump}.{ext}", "w") as f:
                f.write(r.pop(ext))
        r.pop("ptxas_log")
    print(json.dumps(r) if a.json else format_report(r))


if __name__ == "__main__":
    main()
