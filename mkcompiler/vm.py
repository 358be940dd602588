"""Reference VM: executes an instruction queue with each op's torch reference.

The executable spec of the queue semantics, independent of the generated kernel: workers
fetch instructions (dynamic: one shared head; static: their own lists), an instruction runs
only once each of its counters has reached count x generation, and then adds 1 to its
signal counter. Which worker moves next is drawn from a seeded RNG (or given by a
`choose` callback, e.g. from hypothesis), so tests explore many interleavings. When no
worker can move and work remains, that is a deadlock: `VMDeadlock` says who waits on what.

Tensor parallelism: `run_ranks` runs the queues of several ranks in one process, each with its
own counters and queue head, interleaving all their workers; waits on another rank's counters
(communication tiles, passes/ranks.py) read that rank's counters. `VMProgram` holds one rank's
memory for programs no kernel runs (mkcompiler/tp/plan.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.utils._pytree as pytree

from mkcompiler.errors import check_input
from mkcompiler.ir.graph import BufferKind, View
from mkcompiler.ir.layout import Field
from mkcompiler.ir.queue import Queue


class VMDeadlock(RuntimeError):
    pass


@dataclass
class VMResult:
    executed: list[int] = field(default_factory=list)  # instruction indices in execution order
    worker_of: dict[int, int] = field(default_factory=dict)
    counters: np.ndarray | None = None
    steps: int = 0


def run_queue(
    queue: Queue,
    execute,
    *,
    dynamic: bool = True,
    seed: int = 0,
    choose=None,
    counters: np.ndarray | None = None,
    generation: int = 1,
    observe=None,
    lookahead: bool = False,
) -> VMResult:
    """Run `queue`; `execute(i)` performs instruction i. `choose(candidates)` -> one of them
    (default: seeded random). `observe(event, i, worker)`, if given, is called with event
    "fetch" (worker took instruction i), "ready" (chosen to run, its waits met) and "end"
    (after its signal), e.g. to stamp a profile. Raises VMDeadlock if the workers get stuck.

    lookahead (dynamic only) models the kernel's fetch-ahead (codegen.LOOP_HEAD): a worker
    holding an instruction first takes the next index from the head, then waits for and runs
    the one it holds; the index it took becomes its next instruction (an index past the end
    means: stop after this one)."""
    if queue.has_remote_waits():
        raise ValueError("the queue waits on other ranks' counters (tensor parallelism): run it with run_ranks")
    rng = random.Random(seed)
    choose = choose or rng.choice
    n, workers = len(queue), queue.num_workers
    counters = np.zeros(max(queue.num_counters, 1), dtype=np.int64) if counters is None else counters
    head = 0
    held: list[int | None] = [None] * workers  # instruction fetched and not yet run
    ahead: list[int | None] = [None] * workers  # lookahead: the next index, taken early
    last = [False] * workers  # lookahead: the early fetch found the queue empty
    lookahead = lookahead and dynamic
    cursor = [int(queue.worker_begin[w]) for w in range(workers)]
    done = [False] * workers
    result = VMResult(counters=counters)

    def must_fetch_ahead(w: int) -> bool:
        return lookahead and held[w] is not None and ahead[w] is None and not last[w]

    def ready(i: int) -> bool:
        return all(counters[c] >= k * generation for c, k in queue.waits_of(i))

    while not all(done):
        moves = []
        for w in range(workers):
            if done[w]:
                continue
            if held[w] is None or must_fetch_ahead(w):
                moves.append(w)  # can fetch (or find the queue empty and stop)
            elif ready(held[w]):
                moves.append(w)
        if not moves:
            stuck = {w: held[w] for w in range(workers) if not done[w]}
            raise VMDeadlock(_deadlock_story(queue, stuck, counters, generation))
        w = choose(moves)
        result.steps += 1
        if must_fetch_ahead(w):
            if head < n:
                ahead[w], head = head, head + 1
                if observe is not None:
                    observe("fetch", ahead[w], w)
            else:
                last[w] = True
            continue
        if held[w] is None:
            if dynamic:
                if head < n:
                    held[w], head = head, head + 1
                else:
                    done[w] = True
            else:
                if cursor[w] < queue.worker_begin[w + 1]:
                    held[w] = int(queue.worker_order[cursor[w]])
                    cursor[w] += 1
                else:
                    done[w] = True
            if observe is not None and held[w] is not None:
                observe("fetch", held[w], w)
            continue
        i = held[w]
        if observe is not None:
            observe("ready", i, w)
        execute(i)
        sig = int(queue.rows[i, Field.SIGNAL])
        if sig >= 0:
            counters[sig] += 1
        if observe is not None:
            observe("end", i, w)
        result.executed.append(i)
        result.worker_of[i] = w
        held[w], ahead[w] = ahead[w], None
        if lookahead and held[w] is None and last[w]:
            done[w] = True
    return result


def _deadlock_story(queue, stuck, counters, generation) -> str:
    lines = ["deadlock: no worker can move"]
    for w, i in stuck.items():
        if i is None:
            continue
        unmet = [(c, k * generation, int(counters[c])) for c, k in queue.waits_of(i) if counters[c] < k * generation]
        lines.append(
            f"  worker {w} holds instruction {i} ({queue.descs[i]}) waiting on "
            + ", ".join(f"counter {c} = {v} < {t}" for c, t, v in unmet)
        )
    return "\n".join(lines)


def run_megakernel(mk, *inputs, seed: int = 0, dynamic: bool | None = None, choose=None, observe=None):
    """Execute a compiled Megakernel's queue with torch references on its own buffers.
    Returns (outputs, VMResult). `observe`: see run_queue (profiling.profile_vm uses it)."""
    from mkcompiler.ops.registry import FAMILIES

    mk._bind(inputs, {})
    q, dag, graph = mk.queue, mk.dag, mk.graph

    def execute(i):
        task = dag.tasks[int(q.rows[i, Field.TASK])]
        op = graph.ops[task.op]
        FAMILIES[op.kind].reference(op, task.coords, mk.tensor_of)

    dynamic = mk.settings.schedule != "static" if dynamic is None else dynamic
    res = run_queue(q, execute, dynamic=dynamic, seed=seed, choose=choose, observe=observe, lookahead=dynamic)
    return mk.outputs(), res


# ---- several ranks (tensor parallelism) ----


@dataclass
class RanksResult:
    executed: list[tuple[int, int]] = field(default_factory=list)  # (rank, instruction) in execution order
    worker_of: dict[tuple[int, int], int] = field(default_factory=dict)  # (rank, instruction) -> worker
    counters: list[np.ndarray] = field(default_factory=list)  # per rank
    steps: int = 0


def run_ranks(
    queues: list[Queue],
    executes,
    *,
    dynamic: bool = True,
    seed: int = 0,
    choose=None,
    counters: list[np.ndarray] | None = None,
    generation: int = 1,
    observe=None,
) -> RanksResult:
    """Run one queue per rank, all ranks' workers interleaved. `executes[r](i)` performs
    instruction i of rank r. A move is (rank, worker): `choose(moves)` picks one (default:
    seeded random). A wait row with a rank waits on that rank's counters (same counter ids on
    every rank: the ranks run the same program). `observe(event, rank, i, worker)` as in
    run_queue. Raises VMDeadlock, naming ranks, workers, instructions and counters, when no
    worker of any rank can move and work remains."""
    world = len(queues)
    assert len(executes) == world, (len(executes), world)
    rng = random.Random(seed)
    choose = choose or rng.choice
    if counters is None:
        counters = [np.zeros(max(q.num_counters, 1), dtype=np.int64) for q in queues]
    # Per rank and instruction: (rank whose counters, counter, target).
    waits = []
    for r, q in enumerate(queues):
        per = []
        for i in range(len(q)):
            items = [(r, c, k * generation) for c, k in q.waits_of(i)]
            for c, k, peer in q.remote_waits_of(i):
                if not 0 <= peer < world:
                    raise ValueError(f"rank {r} instruction {i} waits on rank {peer}, but there are {world} ranks")
                items.append((peer, c, k * generation))
            per.append(list(dict.fromkeys(items)))  # a wait on its own rank's counter is a local one
        waits.append(per)
    heads = [0] * world
    held = [[None] * q.num_workers for q in queues]
    cursor = [[int(q.worker_begin[w]) for w in range(q.num_workers)] for q in queues]
    done = [[False] * q.num_workers for q in queues]
    result = RanksResult(counters=counters)

    def ready(r: int, i: int) -> bool:
        return all(counters[peer][c] >= target for peer, c, target in waits[r][i])

    while True:
        moves = [
            (r, w)
            for r in range(world)
            for w in range(queues[r].num_workers)
            if not done[r][w] and (held[r][w] is None or ready(r, held[r][w]))
        ]
        if not moves:
            if all(all(d) for d in done):
                return result
            raise VMDeadlock(_ranks_deadlock_story(queues, held, done, waits, counters))
        r, w = choose(moves)
        q = queues[r]
        result.steps += 1
        if held[r][w] is None:
            if dynamic:
                if heads[r] < len(q):
                    held[r][w], heads[r] = heads[r], heads[r] + 1
                else:
                    done[r][w] = True
            else:
                if cursor[r][w] < q.worker_begin[w + 1]:
                    held[r][w] = int(q.worker_order[cursor[r][w]])
                    cursor[r][w] += 1
                else:
                    done[r][w] = True
            if observe is not None and held[r][w] is not None:
                observe("fetch", r, held[r][w], w)
            continue
        i = held[r][w]
        if observe is not None:
            observe("ready", r, i, w)
        executes[r](i)
        sig = int(q.rows[i, Field.SIGNAL])
        if sig >= 0:
            counters[r][sig] += 1
        if observe is not None:
            observe("end", r, i, w)
        result.executed.append((r, i))
        result.worker_of[(r, i)] = w
        held[r][w] = None


def _ranks_deadlock_story(queues, held, done, waits, counters) -> str:
    lines = ["deadlock: no worker of any rank can move"]
    for r, q in enumerate(queues):
        for w, i in enumerate(held[r]):
            if i is None or done[r][w]:
                continue
            unmet = [(peer, c, t, int(counters[peer][c])) for peer, c, t in waits[r][i] if counters[peer][c] < t]
            lines.append(
                f"  rank {r} worker {w} holds instruction {i} ({q.descs[i]}) waiting on "
                + ", ".join(
                    f"{'its own' if peer == r else f'rank {peer}'} counter {c} = {v} < {t}" for peer, c, t, v in unmet
                )
            )
    return "\n".join(lines)


class VMProgram:
    """One rank's memory for a compiled graph that only the reference VM runs (no kernel):
    intermediates allocated on the host, parameters and state read in place, inputs bound at
    each call. Mirrors Megakernel's buffers and tensor_of."""

    def __init__(self, compilation, device="cpu"):
        self.compilation = compilation
        self.graph = compilation.graph
        self.buffers: dict[int, torch.Tensor] = {
            b.id: torch.empty(b.numel, dtype=b.dtype, device=device)
            for b in self.graph.buffers
            if b.kind in (BufferKind.ACT, BufferKind.OUTPUT)
        }
        self._bound: dict[int, torch.Tensor] = {}
        self.device = torch.device(device)

    @property
    def queue(self) -> Queue:
        return self.compilation.queue

    @property
    def dag(self):
        return self.compilation.dag

    def bind(self, inputs) -> None:
        flat = pytree.tree_leaves(tuple(inputs))
        expected = self.graph.inputs
        if len(flat) != len(expected):
            raise ValueError(f"expected {len(expected)} tensor inputs, got {len(flat)}")
        for k, (t, (bid, shape, dtype)) in enumerate(zip(flat, expected)):
            check_input(t, f"input {k} ({self.graph.buffers[bid].name!r})", tuple(shape), dtype, self.device)
            self._bound[bid] = t

    def tensor_of(self, v: View) -> torch.Tensor:
        kind = self.graph.buffers[v.buffer].kind
        if kind in (BufferKind.PARAM, BufferKind.STATE):
            base = self.graph.params[v.buffer]
        else:
            base = self._bound[v.buffer] if kind == BufferKind.INPUT else self.buffers[v.buffer]
        return torch.as_strided(base, v.shape, v.strides, base.storage_offset() + v.offset)

    def outputs(self):
        flat = [self.tensor_of(v).clone() if isinstance(v, View) else v for v in self.graph.outputs]
        return pytree.tree_unflatten(flat, self.graph.out_spec)

    def poison(self, value: float = float("nan")) -> None:
        for t in self.buffers.values():
            t.fill_(value if t.dtype.is_floating_point else -1)


def rank_executor(programs: list[VMProgram], rank: int):
    """execute(i) for run_ranks: instruction i of `rank` with its op's torch reference;
    communication ops read the same views on their peers' programs."""
    from mkcompiler.ops.registry import FAMILIES

    prog = programs[rank]
    q, dag, graph = prog.queue, prog.dag, prog.graph

    def peer_tensor_of(k: int, v: View) -> torch.Tensor:
        return programs[k].tensor_of(v)

    def execute(i: int) -> None:
        task = dag.tasks[int(q.rows[i, Field.TASK])]
        op = graph.ops[task.op]
        fam = FAMILIES[op.kind]
        if fam.peer_access:
            fam.reference(op, task.coords, prog.tensor_of, peer_tensor_of=peer_tensor_of, rank=rank)
        else:
            fam.reference(op, task.coords, prog.tensor_of)

    return execute
