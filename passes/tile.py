"""Choose each op's tile shape (recorded in the op's attrs; part of its opcode key)."""

from __future__ import annotations

import torch
from mkcompiler.ops.attention import ATTENTION_KINDS
from mkcompiler.ops.base import next_pow2
from mkcompiler.ops.matmul import DECODE_ROWS
from mkcompiler.ops.reduce import RowAttrs

from mkcompiler.ir.graph import Graph
from mkcompiler.ir.settings import Settings

DECODE_STEP_BYTES = 32 * 1024  # weight bytes per K step of a decode tile (all a worker has in flight)
# Deepest decode K block: BN=32 tiles at 512 (DECODE_STEP_BYTES) spilled 652 B with a folded norm.
DECODE_MAX_BK = 256
# The Gluon backend's large-M tile (backends/gluon/prefill.py): one 4-warp wgmma warpgroup, a
# 128x128 fp32 accumulator, 64-deep K steps; its standalone twin (gluon/matmul.py) measured 86-103%
# of cuBLAS at M=512..2048 on Llama-3.1-8B shapes (RESULTS.md, issue 18 groundwork). 128x256 needs
# 8 compute warps. One shape for every large-M matmul: one A/B ring box per kernel.
GLUON_LARGE_TILE = (128, 128, 64)


def matmul_tile(m: int, n: int, k: int, settings: Settings, half: bool = True, bn: int | None = None):
    """(BM, BN, BK) of a matmul. Decode (m <= DECODE_ROWS): BN is 64 unless decode_tiling chose
    128 for the op's sibling group; BK keeps DECODE_STEP_BYTES of weights per step (a 256-deep
    block at BN=64 in bf16 runs near HBM rate per SM; fp32 dots, on FMA units, get half). Large M
    with half operands on the Gluon backend: GLUON_LARGE_TILE."""
    if settings.matmul_tile is not None:
        return tuple(settings.matmul_tile)
    bm = min(64, max(16, next_pow2(m)))
    if m > DECODE_ROWS and half and settings.backend == "gluon":
        return GLUON_LARGE_TILE
    if m > DECODE_ROWS:
        bn = min(128 if m > 64 else 64, max(16, next_pow2(n)))  # large M (prefill): fewer, wider tiles
        return (bm, bn, min(64, max(16, next_pow2(k))))
    bn = min(bn or 64, max(16, next_pow2(n)))
    bk = min(DECODE_STEP_BYTES // (bn * (2 if half else 4)), DECODE_MAX_BK)
    return (bm, bn, min(bk, max(16, next_pow2(k))))


def dot_config(a: torch.dtype, b: torch.dtype, settings: Settings) -> tuple[torch.dtype, str]:
    """(operand dtype, precision) for tl.dot. Half-precision pairs use the tensor cores with
    fp32 accumulation; anything else is fp32. Triton 3.6's interpreter computes bf16 dots
    wrongly, so there half operands are widened to fp32 (exact: products of halves fit).
    The target is settings.interpret (Settings.for_target resolves it before the passes)."""
    if a == b and a in (torch.bfloat16, torch.float16):
        if settings.interpret is None:
            raise ValueError("Settings.interpret is unresolved: the passes need Settings.for_target()")
        if not settings.interpret:
            return a, "tf32"  # precision is ignored for half operands
    return torch.float32, settings.fp32_precision


ELEMENTWISE_MAX_BLOCK = 4096  # beyond this the widest fused chains start to spill registers


def elementwise_block(numel: int, settings: Settings, num_workers: int) -> int:
    """Elements per tile: the setting if given, else about two tiles per worker, 1024..4096."""
    if settings.elementwise_block is not None:
        return min(settings.elementwise_block, max(16, next_pow2(numel)))
    target = next_pow2(max(1, numel // (2 * num_workers)))
    return min(max(16, next_pow2(numel)), min(ELEMENTWISE_MAX_BLOCK, max(1024, target)))


def choose_tiles(graph: Graph, settings: Settings, num_workers: int = 1) -> Graph:
    written = {v.buffer for op in graph.ops for v in op.outputs}
    for op in graph.ops:
        if op.kind == "matmul":
            a, b = op.inputs[:2]
            op.attrs.b_fixed = b.buffer not in written  # its loads may precede the wait (Matmul.early_wait)
            norm = op.attrs.norm
            a_dtype = norm.h_dtype if norm is not None else a.dtype  # a folded norm's output dtype
            op.attrs.dot = dot_config(a_dtype, b.dtype, settings)
            half = op.attrs.dot[0] in (torch.bfloat16, torch.float16)
            # split_k may have chosen a decode BN for the op's sibling group (split_k.decode_tiling)
            op.attrs.tile = matmul_tile(a.shape[0], b.shape[1], a.shape[1], settings, half, op.attrs.bn)
            op.attrs.group_rows = max(1, settings.matmul_group_rows)  # queue order of its tiles
        elif op.kind in ATTENTION_KINDS:
            q, k = op.inputs[0], op.inputs[1]
            # A tile's rows are the packed rows of the query heads sharing one kv head (group x
            # Sq, ops/attention.py). Decode (few of them): wider key blocks, fewer dependent steps.
            op.attrs.tile = (16, 128) if op.attrs.group * q.shape[2] <= 16 else (64, 64)
            op.attrs.stages = settings.num_stages  # split_kv lowers it for one-block tiles
            op.attrs.dot = dot_config(q.dtype, k.dtype, settings)[0]
        elif op.kind == "elementwise":
            op.attrs.block = elementwise_block(op.outputs[0].numel, settings, num_workers)
            if settings.elementwise_block is None:  # about one tile per worker for big tensors
                blocks = -(-op.outputs[0].numel // op.attrs.block)
                op.attrs.blocks_per_tile = max(1, -(-blocks // num_workers))
        elif isinstance(op.attrs, RowAttrs):  # row ops: BR rows per tile, BC columns per sweep step
            row = op.inputs[0].shape[-1]  # embedding: inputs[0] is the weight, its rows are the output rows
            op.attrs.tile = (settings.row_block, min(settings.row_chunk, max(16, next_pow2(row))))
        # Others have no tile to choose: scatters (rows of the update, ops/scatter.py), communication
        # (passes/ranks.choose_comm_tiles), attention_combine (a (batch, head) each).
    return graph
