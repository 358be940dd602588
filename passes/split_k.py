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
from mkcompiler.passes.tile import matmul_tile

from mkcompiler.ir import Graph, OpNode, View
from mkcompiler.settings import Settings

MAX_SPLITS = 6  # the sum's inputs (S partials + bias) must fit an instruction (fuse.MAX_INPUTS)
MIN_K_CHUNK = 512  # at least this many K per chunk, or splitting costs more than it saves


def choose_splits(m: int, n: int, k: int, settings: Settings, num_workers: int) -> int:
    if settings.split_k is not None:
        return max(1, min(settings.split_k, MAX_SPLITS))
    bm, bn, bk = matmul_tile(m, n, k, settings)
    tiles = cdiv(m, bm) * cdiv(n, bn)
    if tiles >= num_workers:
        return 1
    return max(1, min(num_workers // tiles, k // max(bk, MIN_K_CHUNK), MAX_SPLITS))


def split_k(graph: Graph, settings: Settings, num_workers: int) -> Graph:
    ops: list[OpNode] = []
    for op in graph.ops:
        ops.append(op)
        if op.kind != "matmul":
            continue
        a, b, bias = op.inputs
        c = op.outputs[0]
        s = choose_splits(a.shape[0], b.shape[1], a.shape[1], settings, num_workers)
        if s == 1:
            continue
        partial = graph.new_tensor(f"{op.name}_partial", (s, *c.shape), torch.float32)
        op.inputs = (a, b, None)
        op.outputs = (partial,)
        op.attrs["split"] = s
        pieces = [replace(partial.select(0, i)) for i in range(s)]
        inputs: list[View] = pieces + ([bias.expand(c.shape)] if bias is not None else [])
        expr = ("in", 0)
        for i in range(1, len(inputs)):
            expr = ("op", "add", torch.float32, expr, ("in", i))
        expr = ("op", "copy", c.dtype, expr)
        ops.append(OpNode("elementwise", tuple(inputs), (c,), {"expr": expr}, name=f"{op.name}_sum", source=op.source))
    graph.ops = ops
    return graph
