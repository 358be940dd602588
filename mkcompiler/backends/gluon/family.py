"""The Gluon backend's op families: which opcode key kinds have a Gluon tile, why an op cannot
run here, and what each writes into the generated kernel (codegen.generate). Kept apart from
codegen.py so a family's module can register itself without importing the generator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mkcompiler.ir.queue import Queue


@dataclass(frozen=True)
class Emitted:
    """What a family adds to the generated source for one opcode: device functions of its own
    (generated text, may be empty) and the statement the compute partition's branch runs. The
    statement sees the compute partition's names: row (tiles.preload_row), views_ptr, tma_ptr, idx, ok, it,
    bufs, ready, empty, num_warps (a statement that consumes ring blocks assigns `it`)."""

    routines: str
    call: str


@dataclass(frozen=True)
class GluonFamily:
    """One op family's place in the Gluon backend: `problem(key)` says why an op of that key
    cannot run here (None: it can); `emit(key, opcode, queue)` writes its branch; `imports`
    are the names the generated source takes from `module`."""

    problem: Callable[[Any], str | None]
    emit: Callable[[Any, int, Queue], Emitted]
    module: str = "mkcompiler.backends.gluon.tiles"
    imports: tuple[str, ...] = ()


# Families with a Gluon tile, by opcode key kind (key[0]). A family module adds itself with
# `register` (codegen imports every family module, so every compile sees them).
GLUON_FAMILIES: dict[str, GluonFamily] = {}


def register(kind: str, family: GluonFamily) -> None:
    GLUON_FAMILIES[kind] = family
