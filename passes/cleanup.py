"""Drop ops nothing reads (e.g. layer_norm statistics a model ignores)."""

from __future__ import annotations

from mkcompiler.ir.graph import BufferKind, Graph, View


def eliminate_dead_ops(graph: Graph) -> Graph:
    live = {v.buffer for v in graph.outputs if isinstance(v, View)}
    live |= {b.id for b in graph.buffers if b.kind == BufferKind.STATE}  # state updates are results too
    kept = []
    for op in reversed(graph.ops):
        # An op writing a slice of a live buffer (cat pieces) is live too.
        if any(o.buffer in live for o in op.outputs):
            kept.append(op)
            live.update(v.buffer for v in op.inputs if v is not None)
    graph.ops = kept[::-1]
    return graph


def check_single_writer_order(graph: Graph) -> None:
    """Invariant: every intermediate buffer is written before it is read."""
    written = {b.id for b in graph.buffers if b.kind.value in ("input", "param", "state")}
    for op in graph.ops:
        for v in op.inputs:
            if v is not None:
                assert v.buffer in written, f"{op.name} reads buffer {v.buffer} before any op writes it"
        written.update(o.buffer for o in op.outputs)
