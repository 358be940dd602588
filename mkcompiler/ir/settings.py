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


def register_cap(num_warps: int, workers_per_sm: int = 1) -> int:
    """Registers per thread the kernel may use (Triton's maxnreg): all an SM's 64K shared by its
    workers, at most 255. Without it ptxas often settles on 128 for 8 warps and spills (a decode
    MLP kernel: 128 registers and 96 B of spills, against 230 and none with the cap)."""
    return min(255, 65536 // (32 * num_warps * workers_per_sm) // 8 * 8)


@dataclass(frozen=True)
class Settings:
    num_workers: int | None = None  # persistent programs; default: SM count (GPU) or 4 (interpreter)
    # "static" (per-worker lists) or "dynamic" (atomic queue head). Default: static on a GPU
    # (1.67 against 2.48 ms, 1B decode, H200: no atomic round trip per fetch); dynamic in the
    # interpreter, which runs programs one after another (a static list can wait on a later one).
    schedule: str | None = None
    max_spin: int | None = None  # polls before a wait gives up; default 2**22 (GPU), 2000 (interpreter)
    fp32_precision: str = "ieee"  # tl.dot precision for fp32 operands: "ieee" or "tf32"
    matmul_tile: tuple[int, int, int] | None = None  # (BM, BN, BK); default chosen per shape
    split_kv: int | None = None  # key chunks per decode attention; default: enough to give every worker a tile
    split_k: int | None = None  # K chunks per matmul; default: enough to give every worker a tile
    elementwise_block: int | None = None  # elements per elementwise tile; default: by size (passes/tile.py)
    row_block: int = 4  # rows per tile for norms, reductions, softmax, embedding
    row_chunk: int = 1024  # columns per step of a row sweep (max)
    num_warps: int = 8  # 4 spills registers once prefill-sized tiles and attention share the kernel
    # software-pipeline depth of tile loops: 3 is 8% faster than 2 (1B decode, H200); 4: 1.621
    # against 1.586 ms (H100)
    num_stages: int = 3
    # Large-M matmuls: tiles in the queue (and so, in dynamic fetch, in execution order) by groups
    # of this many tile rows, column by column within a group, so that the tiles running together
    # share A rows and B columns in L2 (a wave of 132 tiles of an 8B-prefill gate projection: 8
    # rows x 16 columns, 41 MB of operands, instead of 2.4 rows x 56 columns, 120 MB: B
    # re-streamed from HBM for every 2.4 rows). 1: row-major. Not yet measured on a GPU.
    matmul_group_rows: int = 8
    # fold LayerNorm/RMSNorm into decode matmuls (passes/fuse_norm.py): with the statistics summed
    # in the K loop, 1.586 against 1.672 ms (1B decode, H100, same device call)
    fuse_norm: bool = True
    # matmul tiles wait for their inputs themselves, after asking for their first weight block
    # and addressing their views (OpFamily.early_wait, codegen.generate): 1.478 against 1.571 ms
    # (1B decode, H100, same call)
    early_weights: bool = True
    # How a wait acquires its producers' writes (kernel_lib.wait_all; one of WAIT_MODES): "atomic"
    # (acquire atomics; the interpreter always), "fence" (GPU: polls, a barrier vote, fence.acq_rel:
    # no faster on 1B decode), "acquire" (GPU: every poll an ld.acquire: 1.672 against 1.728 ms
    # for "atomic", 1B decode, H100, same device call).
    waits: str = "acquire"
    preload_args: bool = True  # load an instruction's args before its wait (codegen.generate)
    workers_per_sm: int = 1  # default num_workers = SMs x this (co-resident: registers and shared memory permitting)
    interpret: bool | None = None  # run in the Triton interpreter; default: when there is no GPU
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
        if s.fallback not in ("error", "eager"):
            raise ValueError(f"fallback must be 'error' or 'eager', not {s.fallback!r}")
        return s

    def key(self) -> tuple:
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in UNKEYED)
