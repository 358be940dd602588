"""Every knob in one typed place. Options passed to `mkcompiler.compile(**options)` override
the defaults; MKCOMPILER_DEBUG / MKCOMPILER_DUMP environment variables set debug and dumps.
Everything here that changes generated code or the queue is part of `Settings.key()`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

# Fields that change neither the queue nor the generated code.
UNKEYED = ("debug", "dump_dir", "cache", "progress", "errors")
# Settings.waits; the kernel's WAIT_MODE constexpr is the index (kernel_lib.wait_all's MODE).
WAIT_MODES = ("atomic", "fence", "acquire")
# The kernel's WAIT_MODE past WAIT_MODES: "acquire" with kernel_lib.wait_many (runtime.wait_mode).
WAIT_MANY_MODE = len(WAIT_MODES)
BACKENDS = ("triton", "gluon")  # Settings.backend
# Settings.num_warps unless set, per backend. Gluon's compute partition: 4 (Llama-3.2-1B decode
# step on an H100, session 12: 2.25 ms at 4 warps, 3.07 ms at 8; memory-latency-bound tiles, and a
# warpgroup is what wgmma needs).
DEFAULT_WARPS = {"triton": 8, "gluon": 4}


def triton_interprets() -> bool:
    """Whether Triton runs kernels in its CPU interpreter in this process (TRITON_INTERPRET=1, which
    `import mkcompiler` sets without a GPU; Triton reads it when kernels are defined). What
    Settings.interpret defaults to; the passes read the setting, never this."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_max_spin(interpret: bool) -> int:
    """Polls before a wait gives up (Settings.max_spin's default): a few hundred ms on a GPU; in
    the interpreter a poll is slow and programs run one after another, so give up sooner."""
    return 2000 if interpret else 1 << 22


def register_cap(num_warps: int, workers_per_sm: int = 1) -> int:
    """Registers per thread the kernel may use (Triton's maxnreg): all an SM's 64K shared by its
    workers, at most 255. Without it ptxas often settles on 128 for 8 warps and spills."""
    return min(255, 65536 // (32 * num_warps * workers_per_sm) // 8 * 8)


@dataclass(frozen=True)
class Settings:
    num_workers: int | None = None  # persistent programs; default: the GPU's SMs x workers_per_sm, 4 on the CPU
    # "static" (per-worker lists) or "dynamic" (atomic queue head); default: static on a GPU (no
    # atomic round trip per fetch), dynamic in the interpreter (it runs programs one after another,
    # and a static list could wait on a later one)
    schedule: str | None = None
    max_spin: int | None = None  # polls before a wait gives up; default: default_max_spin(interpret)
    fp32_precision: str = "ieee"  # tl.dot precision for fp32 operands: "ieee" or "tf32"
    matmul_tile: tuple[int, int, int] | None = None  # (BM, BN, BK); default chosen per shape
    split_kv: int | None = None  # key chunks per decode attention; default: enough to give every worker a tile
    split_k: int | None = None  # K chunks per matmul; default: enough to give every worker a tile
    elementwise_block: int | None = None  # elements per elementwise tile; default: by size (passes/tile.py)
    row_block: int = 4  # rows per tile for norms, reductions, softmax, embedding
    row_chunk: int = 1024  # columns per step of a row sweep (max)
    # warps per worker (Gluon backend: its compute partition; the loader warps come on top);
    # default DEFAULT_WARPS[backend], filled in by for_target
    num_warps: int | None = None
    num_stages: int = 3  # software-pipeline depth of tile loops (3: faster on decode than 2 or 4)
    # Large-M matmuls: tiles in the queue (and so, in dynamic fetch, in execution order) by groups
    # of this many tile rows, column by column within a group, so that the tiles running together
    # share A rows and B columns in L2 instead of re-streaming B for every few rows. 1: row-major.
    matmul_group_rows: int = 8
    # fold LayerNorm/RMSNorm into decode matmuls, the statistics summed in the K loop (passes/fuse_norm.py)
    fuse_norm: bool = True
    # matmul tiles wait for their inputs themselves, after asking for their first weight block
    # and addressing their views (OpFamily.early_wait, codegen.generate)
    early_weights: bool = True
    # How a wait acquires its producers' writes (kernel_lib.wait_all; one of WAIT_MODES): "atomic"
    # (acquire atomics; the interpreter always), "fence" (GPU: polls, a barrier vote, fence.acq_rel),
    # "acquire" (GPU, the default: every poll an ld.acquire)
    waits: str = "acquire"
    preload_args: bool = True  # load an instruction's args before its wait (codegen.generate)
    workers_per_sm: int = 1  # default num_workers = SMs x this (co-resident: registers and shared memory permitting)
    # Generate for Triton's CPU interpreter (True) or a GPU (False); default (None): as Triton runs
    # in this process (triton_interprets()), resolved by mkcompiler.compile (Settings.for_target).
    # A GPU kernel generated where Triton interprets can be inspected and compiled offline, not run.
    interpret: bool | None = None
    copy_outputs: bool = True  # return fresh tensors (not views of the megakernel's buffers)
    # When a call looks at the kernel's error record: "sync" waits for the launch and raises at
    # once; "deferred" returns without waiting (the host runs ahead, as with CUDA's own errors)
    # and raises at the first later call to find the record arrived, or at mk.check()
    errors: str = "sync"
    fallback: str = "error"  # unsupported ops: "error" raises; "eager" runs them eagerly between megakernels
    debug: int = int(os.environ.get("MKCOMPILER_DEBUG", "0"))  # 1: check pass invariants; 2: print
    dump_dir: str | None = os.environ.get("MKCOMPILER_DUMP") or None
    cache: bool = True  # reuse compiled queues from the on-disk cache (MKCOMPILER_CACHE, mkcompiler/tools/cache.py)
    progress: bool = True  # a progress line on stderr (a terminal only) once a compile takes over 2 s
    # The kernel's generator: "triton" (backends/triton) or "gluon" (backends/gluon/codegen.py: the
    # warp-specialized sm_90 decode kernel; a graph it cannot run compiles on Triton, with a warning)
    backend: str = "triton"

    def replace(self, **changes) -> Settings:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(
                f"unknown mkcompiler options: {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(self)]}"
            )
        s = dataclasses.replace(self, **changes)
        if s.schedule not in ("dynamic", "static", None):
            raise ValueError(f"schedule must be 'dynamic' or 'static', not {s.schedule!r}")
        if s.fp32_precision not in ("ieee", "tf32"):
            raise ValueError(f"fp32_precision must be 'ieee' or 'tf32', not {s.fp32_precision!r}")
        if s.waits not in WAIT_MODES:
            raise ValueError(f"waits must be one of {WAIT_MODES}, not {s.waits!r}")
        if s.errors not in ("sync", "deferred"):
            raise ValueError(f"errors must be 'sync' or 'deferred', not {s.errors!r}")
        if s.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {s.backend!r}")
        if s.fallback not in ("error", "eager"):
            raise ValueError(f"fallback must be 'error' or 'eager', not {s.fallback!r}")
        return s

    def for_target(self) -> Settings:
        """These settings with the target's defaults filled in: interpret (triton_interprets()
        unless set) and schedule (see Settings.schedule). What the passes are given."""
        interpret = triton_interprets() if self.interpret is None else self.interpret
        schedule = self.schedule or ("dynamic" if interpret else "static")
        warps = self.num_warps or DEFAULT_WARPS[self.backend]
        return dataclasses.replace(self, interpret=interpret, schedule=schedule, num_warps=warps)

    def key(self) -> tuple:
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in UNKEYED)
