"""The instruction queue: what the persistent kernel (and the VM) executes.

Rows are int32 [n, NUM_FIELDS] laid out by layout.Field; instruction i is the i-th of the
global (topological) order. Static per-worker lists are `worker_order[worker_begin[w]:
worker_begin[w+1]]` (instruction indices). Views are int64 rows (layout.ViewField).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mkcompiler.ir.layout import LOCAL, Field, WaitField


@dataclass
class Queue:
    rows: np.ndarray  # int32 [n, NUM_FIELDS]
    waits: np.ndarray  # int32 [n_waits, NUM_WAIT_FIELDS]
    views: np.ndarray  # int64 [n_views, NUM_VIEW_FIELDS]
    opcode_keys: list[tuple]  # opcode -> family key (kind first)
    opcode_names: list[str]
    worker_begin: np.ndarray  # int32 [num_workers + 1]
    worker_order: np.ndarray  # int32 [n]
    descs: list[str]  # per instruction: the tile, readable
    num_counters: int

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_workers(self) -> int:
        return len(self.worker_begin) - 1

    def worker_of(self) -> np.ndarray:
        """Worker that runs each instruction in the static schedule."""
        out = np.empty(len(self), dtype=np.int64)
        for w in range(self.num_workers):
            out[self.worker_order[self.worker_begin[w] : self.worker_begin[w + 1]]] = w
        return out

    def waits_of(self, i: int) -> list[tuple[int, int]]:
        """(counter, count) of instruction i's waits on this rank's own counters."""
        b, e = self.rows[i, Field.WAIT_BEGIN], self.rows[i, Field.WAIT_END]
        rows = self.waits[b:e, [WaitField.COUNTER, WaitField.COUNT, WaitField.RANK]].tolist()
        return [(c, n) for c, n, r in rows if r == LOCAL]

    def remote_waits_of(self, i: int) -> list[tuple[int, int, int]]:
        """(counter, count, rank) of instruction i's waits on the counters of rank `rank`
        (tensor parallelism: communication tiles; empty in a single-rank queue)."""
        b, e = self.rows[i, Field.WAIT_BEGIN], self.rows[i, Field.WAIT_END]
        rows = self.waits[b:e, [WaitField.COUNTER, WaitField.COUNT, WaitField.RANK]].tolist()
        return [(c, n, r) for c, n, r in rows if r != LOCAL]

    def has_remote_waits(self) -> bool:
        return bool(len(self.waits)) and bool((self.waits[:, WaitField.RANK] != LOCAL).any())

    def opcode_name(self, i: int) -> str:
        return self.opcode_names[self.rows[i, Field.OPCODE]]

    def table(self, limit: int | None = None) -> str:
        workers = self.worker_of()
        lines = [f"{'index':>6} {'worker':>6}  {'opcode':<22} {'tile':<34} {'waits (counter>=n*gen)':<26} signal"]
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(n):
            waits = " ".join(
                [f"c{c}>={k}" for c, k in self.waits_of(i)] + [f"r{r}:c{c}>={k}" for c, k, r in self.remote_waits_of(i)]
            )
            waits = waits or "-"
            sig = int(self.rows[i, Field.SIGNAL])
            lines.append(
                f"{i:>6} {workers[i]:>6}  {self.opcode_name(i):<22} {self.descs[i]:<34} {waits:<26} "
                + (f"c{sig}+1" if sig >= 0 else "-")
            )
        if n < len(self):
            lines.append(f"... {len(self) - n} more instructions")
        lines.append(
            f"{len(self)} instructions, {len(self.opcode_names)} opcodes, {self.num_counters} counters, "
            f"{len(self.views)} views, {self.num_workers} workers"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"<Queue {len(self)} instructions, {self.num_counters} counters, {self.num_workers} workers>"
