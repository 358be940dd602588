"""Reference VM: executes an instruction queue with each op's torch reference.

The executable spec of the queue semantics, independent of the generated kernel: workers
fetch instructions (dynamic: one shared head; static: their own lists), an instruction runs
only once each of its counters has reached count x generation, and then adds 1 to its
signal counter. Which worker moves next is drawn from a seeded RNG (or given by a
`choose` callback, e.g. from hypothesis), so tests explore many interleavings. When no
worker can move and work remains, that is a deadlock: `VMDeadlock` says who waits on what.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from mkcompiler.layout import Field
from mkcompiler.queue import Queue


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
) -> VMResult:
    """Run `queue`; `execute(i)` performs instruction i. `choose(candidates)` -> one of them
    (default: seeded random). `observe(event, i, worker)`, if given, is called with event
    "fetch" (worker took instruction i), "ready" (chosen to run, its waits met) and "end"
    (after its signal), e.g. to stamp a profile. Raises VMDeadlock if the workers get stuck."""
    rng = random.Random(seed)
    choose = choose or rng.choice
    n, workers = len(queue), queue.num_workers
    counters = np.zeros(max(queue.num_counters, 1), dtype=np.int64) if counters is None else counters
    head = 0
    held: list[int | None] = [None] * workers  # instruction fetched and not yet run
    cursor = [int(queue.worker_begin[w]) for w in range(workers)]
    done = [False] * workers
    result = VMResult(counters=counters)

    def ready(i: int) -> bool:
        return all(counters[c] >= k * generation for c, k in queue.waits_of(i))

    while not all(done):
        moves = []
        for w in range(workers):
            if done[w]:
                continue
            if held[w] is None:
                moves.append(w)  # can fetch (or find the queue empty and stop)
            elif ready(held[w]):
                moves.append(w)
        if not moves:
            stuck = {w: held[w] for w in range(workers) if not done[w]}
            raise VMDeadlock(_deadlock_story(queue, stuck, counters, generation))
        w = choose(moves)
        result.steps += 1
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
        held[w] = None
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
        node = dag.nodes[int(q.rows[i, Field.TASK])]
        op = graph.ops[node["op"]]
        FAMILIES[op.kind].reference(op, node["coords"], mk.tensor_of)

    dynamic = mk.settings.schedule == "dynamic" if dynamic is None else dynamic
    res = run_queue(q, execute, dynamic=dynamic, seed=seed, choose=choose, observe=observe)
    return mk.outputs(), res
