"""A model of the Gluon decode kernel's weight ring, and a simulation of whole launches with it.

Per SM, a loader and a compute partition share a ring of D slots with two mbarriers per slot:
  - the loader's t-th load goes to slot t % D; it first waits on `empty[s]` for the slot's
    (t // D)-th release (the first pass finds every slot free), then issues a TMA copy whose
    arrival completes the slot's next `ready` phase. It never waits on a dependency counter.
  - compute's c-th block is in slot c % D: it waits on `ready[s]` for the slot's (c // D + 1)-th
    fill, reads it, and releases the slot (arrives on `empty[s]`).
An instruction's compute first waits on its counters (acquire, as the VM: counter >= count x
generation), then takes its blocks from the ring, then runs and signals (adds 1 to its counter).

`simulate` runs every worker's loader, its copies in flight and its compute as separate actors,
interleaved in any order (a seeded RNG, or `choose`, e.g. from hypothesis), and reports a
completed run or a deadlock naming what each stuck partition waits for. A slot holding a block
other than the one compute expects is a RingError: the two walks disagree (plan.WorkerPlan).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from mkcompiler.backends.gluon.plan import LoaderStep, WorkerPlan
from mkcompiler.ir.layout import Field
from mkcompiler.ir.queue import Queue
from mkcompiler.vm import VMDeadlock


class RingError(RuntimeError):
    """The ring's protocol was broken: a load into a slot not yet released, a read of a slot not
    filled, or a slot holding another block than the reader expects."""


@dataclass
class Slot:
    fills: int = 0  # completed `ready` phases (TMA copies arrived)
    releases: int = 0  # completed `empty` phases (compute released it)
    entry: LoaderStep | None = None  # what the last copy brought


class Ring:
    """D slots between one loader and one consumer; counts, not parities, so any misuse shows."""

    def __init__(self, depth: int):
        if depth < 1:
            raise ValueError(f"a ring needs at least one slot, not {depth}")
        self.depth = depth
        self.slots = [Slot() for _ in range(depth)]
        self.issued = 0  # loads the loader has issued
        self.in_flight: dict[int, LoaderStep] = {}  # load number -> its entry, copied but not arrived
        self.consumed = 0  # blocks compute has taken (and released)

    def slot_of(self, n: int) -> int:
        return n % self.depth

    def can_issue(self) -> bool:
        """Is the slot of the next load free (released by the previous lap's reader)?"""
        return self.slots[self.slot_of(self.issued)].releases >= self.issued // self.depth

    def issue(self, entry: LoaderStep) -> int:
        if not self.can_issue():
            raise RingError(f"load {self.issued} into slot {self.slot_of(self.issued)} before it was released")
        n = self.issued
        self.in_flight[n] = entry
        self.issued += 1
        return n

    def arrive(self, n: int) -> None:
        """Load n's copy lands: its slot's next `ready` phase completes."""
        slot = self.slots[self.slot_of(n)]
        slot.entry = self.in_flight.pop(n)
        slot.fills += 1

    def can_consume(self) -> bool:
        return self.slots[self.slot_of(self.consumed)].fills >= self.consumed // self.depth + 1

    def consume(self, expected: LoaderStep) -> None:
        """Take the next block (it must be `expected`) and release its slot."""
        s = self.slot_of(self.consumed)
        if not self.can_consume():
            raise RingError(f"read {self.consumed} of slot {s} before its copy arrived")
        slot = self.slots[s]
        if slot.entry != expected:
            raise RingError(f"ring entry {self.consumed} (slot {s}) holds {slot.entry}, compute expects {expected}")
        slot.releases += 1
        self.consumed += 1


class Actor(Enum):
    LOADER = "loader"  # issue the next load
    COPY = "copy"  # a load in flight arrives
    COMPUTE = "compute"  # compute's next step: acquire, take a block, or run and signal


@dataclass(frozen=True)
class Move:
    worker: int
    actor: Actor
    load: int = -1  # Actor.COPY: which load arrives


@dataclass
class Stuck:
    worker: int
    actor: Actor
    instruction: int | None
    reason: str

    def __str__(self) -> str:
        at = f" at instruction {self.instruction}" if self.instruction is not None else ""
        return f"worker {self.worker} {self.actor.value}{at}: {self.reason}"


@dataclass
class RingResult:
    executed: list[int] = field(default_factory=list)  # instructions in the order they ran
    worker_of: dict[int, int] = field(default_factory=dict)
    counters: np.ndarray | None = None
    steps: int = 0
    # per worker: the furthest the loader got ahead of compute, in instructions of the list
    max_lead: list[int] = field(default_factory=list)
    stuck: list[Stuck] | None = None  # None: completed

    @property
    def completed(self) -> bool:
        return self.stuck is None

    def story(self) -> str:
        if self.stuck is None:
            return f"completed: {len(self.executed)} instructions in {self.steps} steps"
        return "\n".join(["stuck: no partition can move and work remains"] + [f"  {s}" for s in self.stuck])

    def raise_if_deadlocked(self) -> None:
        if self.stuck is not None:
            raise VMDeadlock(self.story())


class _Worker:
    """One SM: its plan, its ring, and where its compute partition is."""

    def __init__(self, plan: WorkerPlan, depth: int):
        self.plan = plan
        self.ring = Ring(depth)
        self.pc = 0  # compute: position in the list
        self.acquired = False  # compute: the instruction's waits are met
        self.taken = 0  # compute: blocks of the instruction taken
        self.max_lead = 0
        self.position = {i: p for p, i in enumerate(plan.instructions)}

    @property
    def compute_done(self) -> bool:
        return self.pc >= len(self.plan.computes)

    @property
    def loader_done(self) -> bool:
        return self.ring.issued >= len(self.plan.loads)

    def done(self) -> bool:
        """Both walks ended and every load was taken (a CTA must not exit with a copy unread)."""
        return self.compute_done and self.loader_done and self.ring.consumed == self.ring.issued


def simulate(
    queue: Queue,
    plans: list[WorkerPlan] | tuple[WorkerPlan, ...],
    depth: int,
    *,
    seed: int = 0,
    choose=None,
    counters: np.ndarray | None = None,
    generation: int = 1,
    execute=None,
) -> RingResult:
    """Run `queue`'s static lists with one ring of `depth` slots per worker. `plans[w]`: worker w's
    walks (plan.worker_plans). `choose(moves)` -> one Move (default: seeded random); `execute(i)`,
    if given, performs instruction i when it runs. A deadlock is reported (RingResult.stuck), not
    raised; a broken ring protocol (the walks disagree) raises RingError."""
    if queue.has_remote_waits():
        raise ValueError("the queue waits on other ranks' counters (tensor parallelism): not modelled")
    if len(plans) != queue.num_workers:
        raise ValueError(f"{len(plans)} plans for {queue.num_workers} workers")
    rng = random.Random(seed)
    choose = choose or rng.choice
    counters = np.zeros(max(queue.num_counters, 1), dtype=np.int64) if counters is None else counters
    workers = [_Worker(p, depth) for p in plans]
    result = RingResult(counters=counters)

    waits = [queue.waits_of(i) for i in range(len(queue))]

    def met(i: int) -> bool:
        return all(counters[c] >= k * generation for c, k in waits[i])

    def compute_can_move(x: _Worker) -> bool:
        if x.compute_done:
            return False
        if not x.acquired:
            return met(x.plan.computes[x.pc].instruction)
        if x.taken < len(x.plan.computes[x.pc].blocks):
            return x.ring.can_consume()
        return True  # run and signal

    def moves() -> list[Move]:
        out = []
        for w, x in enumerate(workers):
            if not x.loader_done and x.ring.can_issue():
                out.append(Move(w, Actor.LOADER))
            out += [Move(w, Actor.COPY, n) for n in x.ring.in_flight]
            if compute_can_move(x):
                out.append(Move(w, Actor.COMPUTE))
        return out

    while True:
        options = moves()
        if not options:
            break
        m = choose(options)
        result.steps += 1
        x = workers[m.worker]
        if m.actor is Actor.LOADER:
            entry = x.plan.loads[x.ring.issued]
            x.ring.issue(entry)
            x.max_lead = max(x.max_lead, x.position.get(entry.instruction, x.pc) - x.pc)
        elif m.actor is Actor.COPY:
            x.ring.arrive(m.load)
        else:
            _compute_step(queue, x, counters, result, m.worker, execute)
    if not all(x.done() for x in workers):
        result.stuck = [s for w, x in enumerate(workers) for s in _stuck(queue, w, x, counters, generation)]
    result.max_lead = [x.max_lead for x in workers]
    return result


def _compute_step(queue: Queue, x: _Worker, counters: np.ndarray, result: RingResult, w: int, execute) -> None:
    step = x.plan.computes[x.pc]
    if not x.acquired:
        x.acquired = True
    elif x.taken < len(step.blocks):
        x.ring.consume(LoaderStep(step.instruction, step.blocks[x.taken]))
        x.taken += 1
    else:
        i = step.instruction
        if execute is not None:
            execute(i)
        sig = int(queue.rows[i, Field.SIGNAL])
        if sig >= 0:
            counters[sig] += 1
        result.executed.append(i)
        result.worker_of[i] = w
        x.pc, x.acquired, x.taken = x.pc + 1, False, 0


def _stuck(queue: Queue, w: int, x: _Worker, counters: np.ndarray, generation: int) -> list[Stuck]:
    out = []
    ring = x.ring
    if not x.compute_done:
        step = x.plan.computes[x.pc]
        i = step.instruction
        if not x.acquired:
            unmet = [(c, k * generation) for c, k in queue.waits_of(i) if counters[c] < k * generation]
            why = ", ".join(f"counter {c} = {int(counters[c])} < {t}" for c, t in unmet)
        else:
            s = ring.slot_of(ring.consumed)
            why = (
                f"block {x.taken} of {len(step.blocks)} (ring entry {ring.consumed}, slot {s}) not loaded: "
                f"the loader has issued {ring.issued} of {len(x.plan.loads)} loads"
            )
        out.append(Stuck(w, Actor.COMPUTE, i, why))
    if x.compute_done and x.loader_done and ring.consumed < ring.issued:
        out.append(
            Stuck(w, Actor.LOADER, None, f"loads {ring.consumed}..{ring.issued - 1} were never taken by compute")
        )
    if not x.loader_done:
        entry = x.plan.loads[ring.issued]
        s = ring.slot_of(ring.issued)
        state = "has finished" if x.compute_done else f"has taken {ring.consumed} blocks"
        out.append(
            Stuck(
                w,
                Actor.LOADER,
                entry.instruction,
                f"load {ring.issued} waits for slot {s} to be released; compute {state}",
            )
        )
    return out
