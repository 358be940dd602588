"""The pass pipeline, listed once, in order. Each pass is timed, can be dumped, and (with
settings.debug >= 1) is followed by its invariant check."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from mkcompiler.passes.canonicalize import canonicalize
from mkcompiler.passes.cleanup import check_single_writer_order, eliminate_dead_ops
from mkcompiler.passes.counters import assign_counters, check_counters
from mkcompiler.passes.dependencies import build_dag, check_dag
from mkcompiler.passes.encode import encode
from mkcompiler.passes.fuse import fuse_elementwise
from mkcompiler.passes.fuse_norm import fuse_norm_into_matmul
from mkcompiler.passes.ranks import add_remote_waits, check_remote_waits, choose_comm_tiles
from mkcompiler.passes.schedule import Schedule, list_schedule
from mkcompiler.passes.split_k import split_k
from mkcompiler.passes.split_kv import split_kv
from mkcompiler.passes.tile import choose_tiles
from mkcompiler.passes.verify import check_dynamic, check_static

from mkcompiler.ir.dag import TileDAG
from mkcompiler.ir.graph import Graph
from mkcompiler.ir.queue import Queue
from mkcompiler.ir.settings import Settings


@dataclass
class Compilation:
    graph: Graph
    settings: Settings
    num_workers: int
    dag: TileDAG | None = None
    schedule: Schedule | None = None
    queue: Queue | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cache: str = "off"  # the on-disk cache (mkcompiler/tools/cache.py): "off", "miss", "hit" (no capture), "graph hit"


def _verify(c: Compilation) -> None:
    check_dynamic(c.dag, c.schedule.order)
    if c.settings.schedule == "static":
        check_static(c.dag, c.schedule.worker_lists, c.schedule.order)


# (name, step, invariant check or None)
PIPELINE = [
    # Every spelling of a norm, softmax or activation -> the op the fusions expect (passes/canonicalize.py).
    (
        "canonicalize",
        lambda c: setattr(c, "graph", canonicalize(c.graph)),
        lambda c: check_single_writer_order(c.graph),
    ),
    (
        "eliminate_dead_ops",
        lambda c: setattr(c, "graph", eliminate_dead_ops(c.graph)),
        lambda c: check_single_writer_order(c.graph),
    ),
    (
        "split_k",
        lambda c: setattr(c, "graph", split_k(c.graph, c.settings, c.num_workers)),
        lambda c: check_single_writer_order(c.graph),
    ),
    (
        "fuse_elementwise",
        lambda c: setattr(c, "graph", fuse_elementwise(c.graph)),
        lambda c: check_single_writer_order(c.graph),
    ),
    (
        "fuse_norm_into_matmul",
        lambda c: setattr(c, "graph", fuse_norm_into_matmul(c.graph) if c.settings.fuse_norm else c.graph),
        lambda c: check_single_writer_order(c.graph),
    ),
    ("choose_tiles", lambda c: setattr(c, "graph", choose_tiles(c.graph, c.settings, c.num_workers)), None),
    # Tensor parallelism (passes/ranks.py): both are no-ops without communication ops.
    ("choose_comm_tiles", lambda c: setattr(c, "graph", choose_comm_tiles(c.graph, c.settings, c.num_workers)), None),
    (
        "split_kv",
        lambda c: setattr(c, "graph", split_kv(c.graph, c.settings, c.num_workers)),
        lambda c: check_single_writer_order(c.graph),
    ),
    ("build_dag", lambda c: setattr(c, "dag", build_dag(c.graph)), lambda c: check_dag(c.dag)),
    ("assign_counters", lambda c: setattr(c, "dag", assign_counters(c.dag)), lambda c: check_counters(c.dag)),
    (
        "remote_waits",
        lambda c: setattr(c, "dag", add_remote_waits(c.graph, c.dag)),
        lambda c: check_remote_waits(c.graph, c.dag),
    ),
    ("schedule", lambda c: setattr(c, "schedule", list_schedule(c.dag, c.num_workers)), None),
    ("verify_schedule", _verify, None),  # always runs: never launch a schedule that could deadlock
    ("encode", lambda c: setattr(c, "queue", encode(c.graph, c.dag, c.schedule)), None),
]


def run_pipeline(graph: Graph, settings: Settings, num_workers: int, on_pass=None) -> Compilation:
    """`on_pass(name)`, if given, is called as each pass starts (progress reports)."""
    c = Compilation(graph, settings, num_workers)
    for name, step, check in PIPELINE:
        if on_pass is not None:
            on_pass(name)
        t0 = time.perf_counter()
        step(c)
        c.timings[name] = time.perf_counter() - t0
        if check is not None and settings.debug >= 1:
            check(c)
        if settings.dump_dir:
            _dump(c, name, settings.dump_dir)
    return c


def _dump(c: Compilation, name: str, root: str) -> None:
    os.makedirs(root, exist_ok=True)
    index = [n for n, _, _ in PIPELINE].index(name)
    path = os.path.join(root, f"{index:02d}_{name}.txt")
    with open(path, "w") as f:
        if c.queue is not None:
            f.write(c.queue.table())
        elif c.dag is not None:
            for t, task in enumerate(c.dag.tasks):
                f.write(f"{t} {task.desc} <- {sorted(c.dag.predecessors(t))}\n")
        else:
            for op in c.graph.ops:
                f.write(f"{op.name}: {op.kind} {op.attrs} in={op.inputs} out={op.outputs}\n")
