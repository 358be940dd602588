"""Encode the scheduled DAG as the instruction queue (no code is generated here).

Opcodes are numbered per distinct family key (one kernel branch per op kind and config,
not per layer). Each row: opcode, the op's view ids then its tile coordinates, the wait
range, the signal counter and the task id. Wait rows are (counter, count, rank): LOCAL for
this rank's counters, a rank for a communication tile's waits on its peers (passes/ranks.py).
"""

from __future__ import annotations

import numpy as np
from mkcompiler.ops.registry import FAMILIES
from mkcompiler.passes.schedule import Schedule

from mkcompiler.ir.dag import TileDAG
from mkcompiler.ir.graph import Graph, View
from mkcompiler.ir.layout import (
    LOCAL,
    MAX_RANK,
    NUM_ARGS,
    NUM_FIELDS,
    NUM_VIEW_FIELDS,
    NUM_WAIT_FIELDS,
    Field,
    ViewField,
)
from mkcompiler.ir.queue import Queue


def opcode_name(key: tuple) -> str:
    """A readable, stable name for an opcode (the full key is in Queue.opcode_keys)."""
    return FAMILIES[key.kind].label(key)


class ViewTable:
    def __init__(self):
        self.rows: list[list[int]] = []
        self.index: dict[View, int] = {}

    def id(self, v: View | None) -> int:
        if v is None:
            return -1
        if v not in self.index:
            shape, strides = v.padded(MAX_RANK) if v.rank <= MAX_RANK else _too_many_dims(v)
            row = [0] * NUM_VIEW_FIELDS
            row[ViewField.BUFFER] = v.buffer
            row[ViewField.OFFSET] = v.offset
            row[ViewField.SIZE0 : ViewField.SIZE0 + MAX_RANK] = shape
            row[ViewField.STRIDE0 : ViewField.STRIDE0 + MAX_RANK] = strides
            self.index[v] = len(self.rows)
            self.rows.append(row)
        return self.index[v]


def _too_many_dims(v: View):
    c = v.coalesced()
    if c.rank > MAX_RANK:
        raise NotImplementedError(f"a view of rank {v.rank} ({v.shape}) cannot be expressed in {MAX_RANK} dims")
    return c.padded(MAX_RANK)


def encode(graph: Graph, dag: TileDAG, schedule: Schedule) -> Queue:
    views = ViewTable()
    keys: dict[tuple, int] = {}
    pos = {t: i for i, t in enumerate(schedule.order)}
    rows = np.full((len(schedule.order), NUM_FIELDS), -1, dtype=np.int32)
    waits: list[tuple[int, int, int]] = []
    descs = []
    op_views: dict[int, tuple] = {}  # per op, computed once: its key and view ids (not per tile)
    for i, t in enumerate(schedule.order):
        task = dag.tasks[t]
        if task.op not in op_views:
            op = graph.ops[task.op]
            fam = FAMILIES[op.kind]
            op_views[task.op] = (
                op,
                fam.key(op),
                [views.id(v) for v in fam.view_args(op)],
                [views.id(v) for v in fam.instruction_tail(op)],
            )
        op, key, head, tail = op_views[task.op]
        opcode = keys.setdefault(key, len(keys))
        args = head + list(task.coords) + tail
        assert len(args) <= NUM_ARGS, f"{op.name}: {len(args)} instruction args > {NUM_ARGS}"
        rows[i, Field.OPCODE] = opcode
        rows[i, Field.ARG0 : Field.ARG0 + len(args)] = args
        rows[i, Field.WAIT_BEGIN] = len(waits)
        waits.extend((c, n, LOCAL) for c, n in task.waits)
        waits.extend(task.remote_waits)  # (counter, count, rank): passes/ranks.py
        rows[i, Field.WAIT_END] = len(waits)
        rows[i, Field.SIGNAL] = task.signal
        rows[i, Field.TASK] = t
        descs.append(task.desc)
    begin = np.cumsum([0] + [len(w) for w in schedule.worker_lists]).astype(np.int32)
    order = np.array([pos[t] for w in schedule.worker_lists for t in w], dtype=np.int32)
    key_list = sorted(keys, key=keys.get)
    return Queue(
        rows=rows,
        waits=np.array(waits, dtype=np.int32).reshape(-1, NUM_WAIT_FIELDS),
        views=np.array(views.rows, dtype=np.int64).reshape(-1, NUM_VIEW_FIELDS),
        opcode_keys=key_list,
        opcode_names=[f"{opcode_name(k)}#{i}" for i, k in enumerate(key_list)],
        worker_begin=begin,
        worker_order=order,
        descs=descs,
        num_counters=len(dag.counter_sizes),
    )
