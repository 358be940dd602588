"""Split-K for matmuls with too few output tiles to occupy every worker (decode: M = 1).

A matmul whose BM x BN tiles number fewer than the workers is split into S chunks of K:
it writes fp32 partial sums into a [S, M, N] buffer and an elementwise op adds them (plus
the bias) into the original output. The sum is an ordinary elementwise op, so the fuse pass
can merge it with what follows (e.g. the residual add), and it finishes as soon as its rows'
partials are in: the next layer can start tile by tile.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from mkcompiler.ops.base import cdiv
from mkcompiler.ops.elementwise import ElementwiseAttrs
from mkcompiler.ops.matmul import DECODE_ROWS
from mkcompiler.passes.tile import dot_config, matmul_tile

from mkcompiler.ir.graph import Graph, OpNode, View
from mkcompiler.ir.settings import Settings

MAX_SPLITS = 6  # the sum's inputs (S partials + bias) must fit an instruction (fuse.MAX_INPUTS)
MIN_K_CHUNK = 512  # at least this many K per chunk, or splitting costs more than it saves


WIDE_FILL = 0.9  # BN=128 when its tiles still give at least this share of the workers one each


def _tile_count(m: int, ns: list[int], tile) -> int:
    """Output tiles of a group of matmuls with M rows and Ns columns, at `tile`."""
    return sum(cdiv(m, tile[0]) * cdiv(n, tile[1]) for n in ns)


def _splits(m: int, ns: list[int], k: int, settings: Settings, num_workers: int, tile) -> int:
    if settings.split_k is not None:
        return max(1, min(settings.split_k, MAX_SPLITS))
    bk = tile[2]
    tiles = _tile_count(m, ns, tile)
    if tiles >= num_workers:
        return 1
    return max(1, min(num_workers // tiles, k // max(bk, MIN_K_CHUNK), MAX_SPLITS))


def decode_tiling(graph: Graph, settings: Settings, num_workers: int) -> dict[int, tuple[int | None, int]]:
    """id(op) -> (decode BN or None, splits) for every matmul.

    Matmuls reading the same A (Q/K/V of a layer, gate/up) are one stage: they run side by
    side, so their tiles are sized together: BN=128 (fewer, larger tiles: the per-tile cost of
    wait, setup and pipeline fill is paid half as often) while the group still has a tile for
    nearly every worker, and one split count for the group, chosen so that all its tiles (not
    each matmul's) about fill the workers with tiles of equal size."""
    groups: dict[tuple, list] = {}
    for op in graph.ops:
        if op.kind == "matmul":
            a = op.inputs[0]
            groups.setdefault((a.buffer, a.offset, a.shape, a.strides), []).append(op)
    plan = {}
    for ops in groups.values():
        a, b = ops[0].inputs[:2]
        m, k, ns = a.shape[0], a.shape[1], [op.inputs[1].shape[1] for op in ops]
        half = dot_config(a.dtype, b.dtype, settings)[0] in (torch.bfloat16, torch.float16)
        bn = None
        # The Gluon backend's weight ring holds one box shape: every decode matmul keeps BN=64
        # (with BK=256 in bf16 the box its streamer measured fastest, GLUON_BACKEND.md).
        if m <= DECODE_ROWS and settings.matmul_tile is None and settings.backend != "gluon":
            wide = matmul_tile(m, max(ns), k, settings, half, 128)
            if _tile_count(m, ns, wide) >= WIDE_FILL * num_workers:
                bn = 128
        tile = matmul_tile(m, max(ns), k, settings, half, bn)
        s = _splits(m, ns, k, settings, num_workers, tile)
        for op in ops:
            plan[id(op)] = (bn, s)
    return plan


def split_k(graph: Graph, settings: Settings, num_workers: int) -> Graph:
    plan = decode_tiling(graph, settings, num_workers)
    ops: list[OpNode] = []
    for op in graph.ops:
        ops.append(op)
        if op.kind != "matmul":
            continue
        a, b, bias = op.inputs  # no folded norm yet (passes/fuse_norm.py runs later)
        c = op.outputs[0]
        bn, s = plan[id(op)]
        op.attrs.bn = bn  # choose_tiles keeps the group's BN
        if s == 1:
            continue
        partial = graph.new_tensor(f"{op.name}_partial", (s, *c.shape), torch.float32)
        op.inputs = (a, b, None)
        op.outputs = (partial,)  # the split count is its leading dim (Matmul.splits)
        pieces = [replace(partial.select(0, i)) for i in range(s)]
        inputs: list[View] = pieces + ([bias.expand(c.shape)] if bias is not None else [])
        expr = ("in", 0)
        for i in range(1, len(inputs)):
            expr = ("op", "add", torch.float32, expr, ("in", i))
        expr = ("op", "copy", c.dtype, expr)
        ops.append(
            OpNode("elementwise", tuple(inputs), (c,), ElementwiseAttrs(expr), name=f"{op.name}_sum", source=op.source)
        )
    graph.ops = ops
    return graph
