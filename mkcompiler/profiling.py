"""Per-instruction profiles: who ran what, when, and how long it waited.

A profile is one row per instruction: (worker, fetch, ready, end) stamps, where `fetch` is when
the worker took the instruction, `ready` when its waits were met and `end` after its signal.
The GPU kernel stamps with %globaltimer (ns); the interpreter with a shared atomic tick counter
(a logical clock: order, not duration); the VM with time.perf_counter_ns().
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mkcompiler.queue import Queue

# Column layout of Profile.stamps (one definition: codegen and the VM write these columns).
WORKER, FETCH, READY, END = range(4)
NUM_STAMPS = 4


@dataclass
class Profile:
    queue: Queue
    stamps: np.ndarray  # int64 [n_instructions, NUM_STAMPS]
    unit: str  # "ns" (GPU globaltimer, VM clock) or "tick" (interpreter logical clock)
    source: str  # "gpu", "interpreter" or "vm"
    device_name: str = ""
    compilation: object | None = None  # passes.pipeline.Compilation (graph and DAG for bytes/FLOPs)
