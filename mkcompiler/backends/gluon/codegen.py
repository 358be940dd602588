"""Generate the Gluon (warp-specialized, sm_90) persistent decode kernel from a compiled Queue.

The kernel runs the SAME queue as the Triton backend (rows, wait rows, views, counters and the
static worker lists), so capture, passes, the VM and the runtime's bookkeeping stay as they are.
One CTA per worker (one per SM), two partitions joined by a shared-memory weight ring:

  * loader (1 warp, generated: the TMA descriptors are kernel arguments, picked by a static
    if-chain since Gluon cannot index a descriptor array): walks the worker's list and TMA-loads
    each matmul instruction's weight blocks (plan.py's loader walk), blocking only on a free ring
    slot, never on a dependency counter, so it streams ahead through every wait;
  * compute (the default warps): per instruction a bounded wait on its counters (acquire),
    dispatch on the opcode (each family's tile: tiles.matmul_tile taking its blocks from the
    ring; the others in elementwise.py, attention.py, small_ops.py, Gluon twins of the Triton
    routines reading the same instruction args and views), the stores, the release signal. A wait that gives up records the error (kernel_lib's record) and from then on the
    worker only drains its ring blocks, so its loader ends and the launch returns.

Both partitions read the K chunk of each instruction's blocks from one per-instruction table
(tiles.TMA_*, `tma_table`), built from the plan's loader walk after `DecodePlan.check` proved it
equal to the compute walk derived from the ops: the ring is a FIFO, the two must agree.

What the backend runs (family.GLUON_FAMILIES; `unsupported` names the rest and the compile then
falls back to Triton): decode matmuls (BM <= 16 rows, bf16 weights read in place as whole
row-major [N, K] parameters, one ring box for all, split-K partials, bias, a folded RMSNorm),
elementwise ops (strided views, cat windows), decode attention and its split-KV combine,
embedding, the KV-cache scatter, row reductions, argmax and softmax. Large-M matmuls (prefill,
large batch: more than DECODE_ROWS rows) run from a second ring with two more loader warps and
async wgmma (prefill.py); a kernel with them is generated with prefill.source_parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from mkcompiler.backends.gluon import prefill, tiles
from mkcompiler.backends.gluon.family import GLUON_FAMILIES, Emitted, GluonFamily, register
from mkcompiler.backends.gluon.plan import STREAMED_KINDS, DecodePlan, decode_plan, kernel_stacks, stack_key
from mkcompiler.ir.dag import TileDAG
from mkcompiler.ir.graph import Graph
from mkcompiler.ir.layout import Field, ViewField
from mkcompiler.ir.queue import Queue
from mkcompiler.ops.base import next_pow2, tl_dtype
from mkcompiler.ops.registry import FAMILIES

LOADER_WARPS = 1
LOADER_REGS = 48
MAX_DESCRIPTORS = 8  # TMA descriptors per launch (kernel arguments)
RING_BYTES = 160 * 1024  # shared memory for the weight ring (Hopper: 227 KiB per CTA)
MIN_BUF, MAX_BUF = 2, 8
MATMUL = "matmul"


class GluonUnsupported(RuntimeError):
    """The graph has something the Gluon backend cannot run (the message names it)."""


# ---- what runs here ----


def _matmul_problem(key) -> str | None:
    if prefill.large(key):  # more than DECODE_ROWS rows: a large-M tile (prefill.py)
        return prefill.problem(key)
    if key.b != torch.bfloat16:
        return f"{key.b} weights (the ring holds bf16)"
    norm = key.norm
    if norm is not None and (not norm.rms or norm.bias_dtype is not None):
        return "a folded LayerNorm or norm bias"
    return None


def _emit_matmul(key, opcode: int, queue: Queue) -> Emitted:
    if prefill.large(key):
        return prefill.emit(key, opcode, queue)
    return Emitted("", matmul_call(key, _row_counts(queue).get(opcode, 1)))


def _problem(key) -> str | None:
    family = GLUON_FAMILIES.get(key[0])
    return "no Gluon tile" if family is None else family.problem(key)


def unsupported(graph: Graph, queue: Queue) -> list[str]:
    """What keeps this compiled graph off the Gluon backend, one line per op (empty: it runs)."""
    if not tiles.HAVE_GLUON:
        return ["triton.experimental.gluon is not importable"]
    if queue.has_remote_waits():
        return ["tensor-parallel waits"]
    problems: dict[str, list[str]] = {}
    for op in graph.ops:
        why = _problem(FAMILIES[op.kind].key(op))
        if why is None and op.kind == MATMUL:
            b = op.inputs[1]
            if graph.buffers[b.buffer].kind not in STREAMED_KINDS:
                why = "a weight that is not a parameter"
            elif b.strides[0] != 1 or (b.shape[1] > 1 and b.strides[1] != b.shape[0]) or b.offset != 0:
                why = "a weight that is not a whole row-major [N, K] parameter"
        if why is not None:
            problems.setdefault(f"{op.kind} ({why})", []).append(op.name)
    if not any(op.kind == MATMUL for op in graph.ops):
        problems.setdefault("no matmul (nothing to stream)", [])
    return [f"{what}: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}" for what, names in problems.items()]


# ---- the plan's tables ----


@dataclass(frozen=True)
class GluonKernel:
    """What a launch needs besides the queue: the source, the plan (weights, stacks), the
    descriptors' (stack group) in argument order, the ring's box and depth, the TMA table."""

    source: str
    plan: DecodePlan
    groups: tuple[int, ...]  # descriptor d covers stack group groups[d]
    box: tuple[int, int]  # (BN, BK) of every ring slot
    num_buf: int
    tma: np.ndarray  # int32 [n_instr, tiles.NUM_TMA_FIELDS]
    # Large-M matmuls (prefill.py; empty without): their plan, B descriptors' stack groups (after
    # the decode ones in argument order), A/B ring depth and per-instruction table.
    prefill_plan: DecodePlan | None = None
    prefill_groups: tuple[int, ...] = ()
    prefill_buf: int = 0
    ptab: np.ndarray | None = None
    num_warps: int = 4  # the compute partition's (Settings.num_warps); the loaders' are fixed


def tma_table(queue: Queue, plan: DecodePlan, groups: Sequence[int]) -> np.ndarray:
    """Per instruction: (descriptor, first row in its stacked buffer, K_LO, K_HI) of its blocks, from
    the loader walk (blocks of one instruction are consecutive BK steps of one weight rows box)."""
    table = np.zeros((len(queue), tiles.NUM_TMA_FIELDS), dtype=np.int32)
    desc_of = {g: d for d, g in enumerate(groups)}
    for p in plan.workers:
        for step in p.loads:
            i, b = step.instruction, step.block
            group, row, _ = plan.stacks.locate(b)
            if table[i, tiles.TMA_K_HI] == 0:
                table[i, tiles.TMA_DESC] = desc_of[group]
                table[i, tiles.TMA_ROW] = row
                table[i, tiles.TMA_K_LO] = b.k0
            table[i, tiles.TMA_K_HI] = b.k1
    return table


def ring_depth(box: tuple[int, int], ring_bytes: int = RING_BYTES) -> int:
    slot = box[0] * box[1] * torch.bfloat16.itemsize
    return max(MIN_BUF, min(MAX_BUF, ring_bytes // slot))


def build(graph: Graph, dag: TileDAG, queue: Queue, num_warps: int) -> GluonKernel:
    """The Gluon kernel of a compiled queue, its compute partition `num_warps` wide;
    GluonUnsupported if it has what the backend lacks (`unsupported`), or a plan it cannot run
    (several boxes, too many descriptors, a weight that cannot be stacked). The plan's walks are
    checked equal (plan.PlanError otherwise)."""
    return replace(_build(graph, dag, queue), num_warps=num_warps)


def _build(graph: Graph, dag: TileDAG, queue: Queue) -> GluonKernel:
    problems = unsupported(graph, queue)
    if problems:
        raise GluonUnsupported("; ".join(problems))
    if prefill.has_large(queue):
        return _build_large(graph, dag, queue)
    plan = decode_plan(graph, dag, queue, check=True)
    descriptors = plan.descriptors()
    boxes = {box for _, box in descriptors}
    if len(boxes) != 1:
        raise GluonUnsupported(f"matmul weight boxes {sorted(boxes)}: the ring holds one box shape")
    if len(descriptors) > MAX_DESCRIPTORS:
        raise GluonUnsupported(f"{len(descriptors)} TMA descriptors (at most {MAX_DESCRIPTORS})")
    if any(stack_key(w) is None for w in plan.weights):
        raise GluonUnsupported("a weight that cannot be stacked")
    groups = tuple(g for g, _ in descriptors)
    (box,) = boxes
    tma = tma_table(queue, plan, groups)
    source = generate(queue, len(groups))
    return GluonKernel(source, plan, groups, box, ring_depth(box), tma)


def _build_large(graph: Graph, dag: TileDAG, queue: Queue) -> GluonKernel:
    """build() for a queue with large-M matmuls: two plans (decode, large-M) over one stack layout,
    each walk pair checked; decode descriptors then the large-M B descriptors, MAX_DESCRIPTORS in
    all; each ring sized for what the kernel has (both: SHARED_RING_BYTES each)."""
    stacks = kernel_stacks(graph, dag, queue)
    plan = decode_plan(graph, dag, queue, check=True, stacks=stacks)
    large = decode_plan(graph, dag, queue, check=True, large=True, stacks=stacks)
    descriptors, pdescriptors = plan.descriptors(), large.descriptors()
    boxes = {box for _, box in descriptors}
    if len(boxes) > 1:
        raise GluonUnsupported(f"matmul weight boxes {sorted(boxes)}: the ring holds one box shape")
    if len(descriptors) + len(pdescriptors) > MAX_DESCRIPTORS:
        raise GluonUnsupported(
            f"{len(descriptors)} + {len(pdescriptors)} TMA descriptors (decode + large-M; at most {MAX_DESCRIPTORS})"
        )
    if any(stack_key(w) is None for w in plan.weights):
        raise GluonUnsupported("a weight that cannot be stacked")
    groups = tuple(g for g, _ in descriptors)
    pgroups = tuple(g for g, _ in pdescriptors)
    box = next(iter(boxes), (0, 0))  # (0, 0): no decode matmuls, no weight ring
    ring_bytes = prefill.SHARED_RING_BYTES if groups else prefill.RING_BYTES
    num_buf = ring_depth(box, prefill.SHARED_RING_BYTES) if groups else 0
    source = generate(queue, len(groups), len(pgroups))
    tma = tma_table(queue, plan, groups)
    ptab = prefill.prefill_table(queue, large, pgroups)
    return GluonKernel(source, plan, groups, box, num_buf, tma, large, pgroups, prefill.ring_depth(ring_bytes), ptab)


def _row_counts(queue: Queue) -> dict[int, int]:
    """Per matmul opcode: the most rows (M) any of its instructions has (A's padded dim 2)."""
    most: dict[int, int] = {}
    for i in range(len(queue)):
        o = int(queue.rows[i, Field.OPCODE])
        if queue.opcode_keys[o][0] == MATMUL:
            va = int(queue.rows[i, Field.ARG0 + tiles.MatmulArg.A])
            most[o] = max(most.get(o, 1), int(queue.views[va, ViewField.SIZE0 + 2]))
    return most


# ---- the source ----


def gl_dtype(dtype: torch.dtype) -> str:
    return tl_dtype(dtype).replace("tl.", "gl.")


HEADER = """\
# Generated by mkcompiler (backends/gluon/codegen.py): the warp-specialized decode kernel.
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from mkcompiler.backends.gluon.tiles import (
    TMA_LOAD,
    add,
    arg,
    field,
    matmul_tile,
    now,
    preload_row,
    sigmoid,
    signal,
    stamp,
    tma_field,
    view_base,
    view_numel,
    wait_rows,
)

OPCODE = gl.constexpr({opcode})
W_BEGIN = gl.constexpr({w_begin})
W_END = gl.constexpr({w_end})
T_DESC = gl.constexpr({t_desc})
T_ROW = gl.constexpr({t_row})
T_K_LO = gl.constexpr({t_k_lo})
T_K_HI = gl.constexpr({t_k_hi})
LOADER_WARPS = gl.constexpr({loader_warps})
LOADER_REGS = gl.constexpr({loader_regs})
"""

LOADER = '''

@gluon.jit
def loader({descs}, order_ptr, worker_begin_ptr, tma_ptr, bufs, ready, empty, load_ptr, PROFILE: gl.constexpr):
    """The worker's matmul weight blocks, in list order, into the ring; waits only for free slots.
    PROFILE: load_ptr[idx] = when the instruction's first block was issued."""
    NUM_BUF: gl.constexpr = bufs.type.shape[0]
    BK: gl.constexpr = bufs.type.shape[2]
    NBYTES: gl.constexpr = w0.block_type.nbytes
    pid = gl.program_id(0)
    it = 0
    for cursor in range(gl.load(worker_begin_ptr + pid), gl.load(worker_begin_ptr + pid + 1)):
        idx = gl.load(order_ptr + cursor)
        d = tma_field(tma_ptr, idx, T_DESC)
        row = tma_field(tma_ptr, idx, T_ROW)
        for k in range(tma_field(tma_ptr, idx, T_K_LO), tma_field(tma_ptr, idx, T_K_HI), BK):
            s = it % NUM_BUF
            mbarrier.wait(empty.index(s), ((it // NUM_BUF) & 1) ^ 1)  # first lap: free at once
            mbarrier.expect(ready.index(s), NBYTES)
{issue}            if PROFILE:
                if k == tma_field(tma_ptr, idx, T_K_LO):
                    gl.store(load_ptr + idx, now())
            it += 1
'''

ISSUE = """\
            if d == {d}:
                TMA_LOAD(w{d}, [row, k], ready.index(s), bufs.index(s))
"""

COMPUTE_HEAD = '''

@gluon.jit
def compute(instr_ptr, waits_ptr, counters_ptr, err_ptr, views_ptr, order_ptr, worker_begin_ptr, tma_ptr, generation,
            bufs, ready, empty, prof_ptr, MAX_SPIN: gl.constexpr, PROFILE: gl.constexpr, num_warps: gl.constexpr):
    """The worker's list: wait (bounded), run the tile, signal; after a wait gave up (ok == 0),
    only take and release ring blocks. PROFILE: the Triton backend's stamps (ir/layout.StampField)
    of every instruction that ran."""
    pid = gl.program_id(0)
    it = 0
    ok = 1
    begin = gl.load(worker_begin_ptr + pid)
    end = gl.load(worker_begin_ptr + pid + 1)
    idx = gl.load(order_ptr + begin, mask=begin < end, other=0)
    op = field(instr_ptr, idx, OPCODE)
    w_begin = field(instr_ptr, idx, W_BEGIN)
    w_end = field(instr_ptr, idx, W_END)
    for cursor in range(begin, end):
        # Gluon pipelines nothing: the next instruction's index is asked for before this one's
        # wait, its header after it, so both latencies hide behind the wait and the tile.
        n_idx = gl.load(order_ptr + cursor + 1, mask=cursor + 1 < end, other=0)
        t_fetch = 0
        t_ready = 0
        if PROFILE:
            t_fetch = now()
        row = preload_row(instr_ptr, idx)  # the tile's args, in flight during the wait
        if ok != 0:
            ok = wait_rows(waits_ptr, counters_ptr, err_ptr, idx, w_begin, w_end, generation, MAX_SPIN)
        if PROFILE:
            t_ready = now()
        n_op = field(instr_ptr, n_idx, OPCODE)
        n_w_begin = field(instr_ptr, n_idx, W_BEGIN)
        n_w_end = field(instr_ptr, n_idx, W_END)
'''

COMPUTE_TAIL = """\
        if ok != 0:
            signal(instr_ptr, counters_ptr, idx)
            if PROFILE:
                stamp(prof_ptr, idx, pid, t_fetch, t_ready, now())
        idx = n_idx
        op = n_op
        w_begin = n_w_begin
        w_end = n_w_end
"""

KERNEL = """

@gluon.jit(do_not_specialize=["generation"])
def megakernel({descs}, instr_ptr, waits_ptr, counters_ptr, err_ptr, views_ptr, order_ptr, worker_begin_ptr, tma_ptr,
               prof_ptr, load_ptr, generation, MAX_SPIN: gl.constexpr, NUM_BUF: gl.constexpr, PROFILE: gl.constexpr,
               num_warps: gl.constexpr):
{decode_ring}    gl.warp_specialize(
        [
            (compute, (instr_ptr, waits_ptr, counters_ptr, err_ptr, views_ptr, order_ptr, worker_begin_ptr, tma_ptr,
                       generation, bufs, ready, empty, prof_ptr, MAX_SPIN, PROFILE, num_warps)),
{decode_loader}        ],
        [LOADER_WARPS],
        [LOADER_REGS],
    )
"""


def matmul_call(key, rows: int) -> str:
    norm = key.norm
    mode = tiles.NORM_NONE if norm is None else (tiles.NORM_RMS_IN_LOOP if norm.in_loop else tiles.NORM_RMS_SWEEP)
    has_nw = norm is not None and norm.weight_dtype is not None
    return (
        "it = matmul_tile(row, views_ptr, tma_ptr, idx, ok, it, bufs, ready, empty, "
        f"{gl_dtype(key.a)}, {gl_dtype(key.c)}, {gl_dtype(key.dot)}, {key.bias is not None}, "
        f"{gl_dtype(key.bias if key.bias is not None else torch.float32)}, {mode}, "
        f"{norm.eps if norm is not None else 0.0!r}, {gl_dtype(norm.h_dtype if norm else torch.float32)}, {has_nw}, "
        f"{gl_dtype(norm.weight_dtype if has_nw else torch.float32)}, {next_pow2(rows)}, num_warps)"
    )


def generate(queue: Queue, num_descriptors: int, num_prefill: int = 0) -> str:
    """The kernel's source: one branch per opcode, written by its family (GLUON_FAMILIES).
    `num_prefill`: large-M B descriptors (prefill.py's ring and loaders; 0: the decode kernel)."""
    if not 1 <= num_descriptors + num_prefill <= MAX_DESCRIPTORS:
        raise GluonUnsupported(f"{num_descriptors} TMA descriptors (1..{MAX_DESCRIPTORS})")
    descs = ", ".join(f"w{d}" for d in range(num_descriptors))
    routines, branches = [], []
    imports: dict[str, set[str]] = {}
    for opcode, key in enumerate(queue.opcode_keys):
        family = GLUON_FAMILIES.get(key[0])
        if family is None:
            raise GluonUnsupported(f"opcode {opcode} ({queue.opcode_names[opcode]}): no Gluon tile")
        emitted = family.emit(key, opcode, queue)
        if family.imports:
            imports.setdefault(family.module, set()).update(family.imports)
        routines.append(emitted.routines)
        call = emitted.call.replace("\n", "\n            ")
        branches.append(f"        if op == {opcode}:  # {queue.opcode_names[opcode]}\n            {call}\n")
    header = HEADER.format(
        opcode=int(Field.OPCODE),
        w_begin=int(Field.WAIT_BEGIN),
        w_end=int(Field.WAIT_END),
        t_desc=tiles.TMA_DESC,
        t_row=tiles.TMA_ROW,
        t_k_lo=tiles.TMA_K_LO,
        t_k_hi=tiles.TMA_K_HI,
        loader_warps=LOADER_WARPS,
        loader_regs=LOADER_REGS,
    )
    issue = "".join(ISSUE.format(d=d) for d in range(num_descriptors))
    extra = "".join(f"from {module} import {', '.join(sorted(names))}\n" for module, names in sorted(imports.items()))
    if num_prefill:
        parts = prefill.source_parts(num_descriptors, num_prefill, LOADER_WARPS, LOADER_REGS)
        old, new = prefill.COMPUTE_PARAMS
        if COMPUTE_HEAD.count(old) != 1:
            raise AssertionError(f"COMPUTE_HEAD's signature lost {old!r}: prefill.COMPUTE_PARAMS must follow it")
        loader = LOADER.format(descs=descs, issue=issue) if num_descriptors else ""
        head = COMPUTE_HEAD.replace(old, new)
        body = "".join(routines) + loader + parts["loader"] + head + "".join(branches) + COMPUTE_TAIL
        return header + extra + parts["imports"] + body + parts["kernel"]
    return (
        header
        + extra
        + "".join(routines)
        + LOADER.format(descs=descs, issue=issue)
        + COMPUTE_HEAD
        + "".join(branches)
        + COMPUTE_TAIL
        + KERNEL.format(
            decode_ring=prefill.DECODE_RING, decode_loader=prefill.DECODE_LOADER.format(descs=descs), descs=descs
        )
    )


# ---- offline compile (CPU only) ----


PTX_OPS = (
    "cp.async.bulk.tensor",
    "mbarrier.try_wait",
    "mbarrier.arrive",
    "expect_tx",
    "ld.volatile.global",
    "ld.global.gpu.acquire",  # a wait's final acquire (the atomic add of 0 compiles to it)
    "atom.global.gpu.release",
    "globaltimer",
)


def weight_layout(box: tuple[int, int]):
    from triton.experimental.gluon import language as gl

    return gl.NVMMASharedLayout.get_default_for(list(box), gl.bfloat16)


def compile_offline(
    kernel: GluonKernel, max_spin: int, arch: int = 90, keep_asm: bool = False, profile: bool = False
) -> dict:
    """Compile the generated kernel (its profiling variant with `profile`) for sm_`arch` without a
    GPU (ptxas.compile_report): registers, spills, shared memory, PTX op counts."""
    import importlib.util
    import os
    import sys
    import tempfile

    from mkcompiler.backends.gluon.ptxas import compile_report

    # Gluon's JIT reads a kernel's source from its file: import the source from one.
    name = f"mkcompiler_gluon_offline_{abs(hash(kernel.source)):x}"
    path = os.path.join(tempfile.mkdtemp(prefix="mkcompiler-gluon-"), name + ".py")
    with open(path, "w") as f:
        f.write(kernel.source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    desc = f"tensordesc<bf16[{kernel.box[0]}, {kernel.box[1]}],{weight_layout(kernel.box)!r}>"
    sig = {f"w{d}": desc for d in range(len(kernel.groups))}
    pdesc = f"tensordesc<bf16[{prefill.TILE[1]}, {prefill.TILE[2]}],{prefill.b_layout()!r}>"
    sig.update({f"p{d}": pdesc for d in range(len(kernel.prefill_groups))})
    pointers = ("instr_ptr", "waits_ptr", "counters_ptr", "err_ptr", "views_ptr", "order_ptr", "worker_begin_ptr")
    sig.update({p: "*i32" for p in pointers}, views_ptr="*i64", tma_ptr="*i32")
    if kernel.prefill_groups:
        sig.update(ptab_ptr="*i32")
    sig.update(prof_ptr="*i64", load_ptr="*i64", generation="i32")
    sig.update(MAX_SPIN="constexpr", NUM_BUF="constexpr", PROFILE="constexpr", num_warps="constexpr")
    attrs = {p: [["tt.divisibility", 16]] for p in (*pointers, "tma_ptr")}
    cst = {"MAX_SPIN": max_spin, "NUM_BUF": kernel.num_buf, "PROFILE": profile, "num_warps": kernel.num_warps}
    if kernel.prefill_groups:
        sig.update(P_BUF="constexpr")
        cst.update(P_BUF=kernel.prefill_buf)
        attrs.update(ptab_ptr=[["tt.divisibility", 16]])
    r = compile_report(module.megakernel, sig, cst, attrs, kernel.num_warps, arch, PTX_OPS, GluonUnsupported, keep_asm)
    r.update(box=kernel.box, num_buf=kernel.num_buf, descriptors=len(kernel.groups))
    r.update(prefill_buf=kernel.prefill_buf, prefill_descriptors=len(kernel.prefill_groups))
    return r


# The families this file writes; the others' modules register themselves when imported (below).
register(MATMUL, GluonFamily(_matmul_problem, _emit_matmul))
from mkcompiler.backends.gluon import attention as _attention  # noqa: E402,F401  registers its families
from mkcompiler.backends.gluon import elementwise as _elementwise  # noqa: E402,F401  registers its family
from mkcompiler.backends.gluon import small_ops as _small_ops  # noqa: E402,F401  registers its families
from mkcompiler.backends.gluon.elementwise import gluon_source  # noqa: E402,F401  (moved there; tests use it)
