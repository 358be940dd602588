"""Choose each op's tile shape (recorded in node.attrs; part of the op's opcode key)."""

from __future__ import annotations

from mkcompiler.ir import Graph
from mkcompiler.ops.base import next_pow2
from mkcompiler.settings import Settings


def matmul_tile(m: int, n: int, k: int, settings: Settings) -> tuple[int, int, int]:
    if settings.matmul_tile is not None:
        return tuple(settings.matmul_tile)
    bm = min(64, max(16, next_pow2(m)))
    bn = min(64, max(16, next_pow2(n)))
    bk = min(64, max(16, next_pow2(k)))
    return (bm, bn, bk)


def choose_tiles(graph: Graph, settings: Settings) -> Graph:
    for op in graph.ops:
        if op.kind == "matmul":
            a, b, _ = op.inputs
            op.attrs["tile"] = matmul_tile(a.shape[0], b.shape[1], a.shape[1], settings)
            op.attrs["precision"] = settings.fp32_precision
        elif op.kind == "elementwise":
            op.attrs["block"] = min(settings.elementwise_block, max(16, next_pow2(op.outputs[0].numel)))
        else:  # row ops: BR rows per tile, BC columns per sweep step
            row = op.inputs[0].shape[-1] if op.kind != "embedding" else op.inputs[0].shape[-1]
            op.attrs["tile"] = (settings.row_block, min(settings.row_chunk, max(16, next_pow2(row))))
    return graph
