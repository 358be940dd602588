"""Split-KV for decode attention: too few (batch, kv head, packed query-block) tiles to occupy
the workers and a long context. Each tile then covers one chunk of the keys and writes an
unnormalised partial output plus its running max and sum (fp32); an attention_combine op
merges the chunks (flash-decoding). Runs after choose_tiles (it needs the attention tile).

Chunks are a multiple of BN keys; chosen automatically, none is empty (only the last may be short)."""

from __future__ import annotations

import torch
from mkcompiler.ops.attention import ATTENTION_KINDS, kv_chunk
from mkcompiler.ops.base import cdiv
from mkcompiler.ops.registry import FAMILIES

from mkcompiler.ir.graph import Graph, OpNode
from mkcompiler.ir.settings import Settings

MAX_SPLITS = 16
MIN_KEYS_PER_SPLIT = 128  # shorter chunks cost more in merging than they save


def choose_kv_splits(tiles: int, keys: int, bn: int, settings: Settings, num_workers: int) -> int:
    """Key chunks per attention tile. A forced count (settings.split_kv) is kept as given (its
    last chunks may be empty). Otherwise: enough chunks for the workers, at most MAX_SPLITS and
    about one per MIN_KEYS_PER_SPLIT keys; the chunk is then rounded up to a multiple of BN and
    the count recomputed, so every chunk holds keys (the kernel derives the same chunk from the
    count: Attention.kv_range)."""
    if settings.split_kv is not None:
        return max(1, settings.split_kv)
    if tiles >= num_workers:
        return 1
    p = max(1, min(cdiv(num_workers, tiles), cdiv(keys, MIN_KEYS_PER_SPLIT), MAX_SPLITS))
    return cdiv(keys, kv_chunk(keys, p, bn))


def split_kv(graph: Graph, settings: Settings, num_workers: int) -> Graph:
    ops: list[OpNode] = []
    for op in graph.ops:
        ops.append(op)
        if op.kind not in ATTENTION_KINDS:
            continue
        q, family = op.inputs[0], FAMILIES[op.kind]
        b, h, sq, d = q.shape[0], q.shape[1], q.shape[2], op.outputs[0].shape[3]
        bm, bn = op.attrs.tile
        keys = family.keys(op)
        tiles = b * family.kv_heads(op) * cdiv(op.attrs.group * sq, bm)  # (batch, kv head, packed row block)
        p = choose_kv_splits(tiles, keys, bn, settings, num_workers)
        # A tile whose keys fit one block gains nothing from a software pipeline, whose buffers
        # cost registers and shared memory in the whole kernel (ops/attention.py STAGES).
        op.attrs.stages = 1 if kv_chunk(keys, p, bn) <= bn else settings.num_stages
        if p == 1:
            continue
        out = op.outputs[0]
        partials = graph.new_tensor(f"{op.name}_partials", (p * b, h, sq, d), torch.float32)
        max_and_sum = graph.new_tensor(f"{op.name}_max_sum", (p * b, h, sq, 2), torch.float32)
        op.outputs = (partials, max_and_sum)
        op.attrs.split = p
        ops.append(
            OpNode("attention_combine", (partials, max_and_sum), (out,), name=f"{op.name}_combine", source=op.source)
        )
    graph.ops = ops
    return graph
