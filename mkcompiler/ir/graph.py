"""The op graph: buffers, strided views of them, and ops in program order.

A small closed IR. Every tensor an op touches is a `View` (offset, shape, strides in
elements) of a `Buffer`; layout ops (view, permute, slice, expand) make new views of the
same buffer and never copy. Ops are `OpNode`s in program order; `kind` names the op
family in `ops/` that lowers, tiles, generates and references it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace

import torch


class BufferKind(enum.Enum):
    INPUT = "input"  # bound to a user tensor at each call
    PARAM = "param"  # a module parameter/buffer/constant, read in place
    STATE = "state"  # a module buffer the model mutates (a KV cache), updated in place
    ACT = "act"  # an intermediate allocated by the megakernel
    OUTPUT = "output"  # an intermediate that (a view of) a model output lives in


@dataclass(frozen=True)
class Buffer:
    id: int
    name: str
    numel: int
    dtype: torch.dtype
    kind: BufferKind


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class View:
    """A strided window of a buffer. Invariant: every element it addresses is inside the buffer."""

    buffer: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0

    @staticmethod
    def full(buf: Buffer, shape: tuple[int, ...]) -> View:
        assert math.prod(shape) == buf.numel, (shape, buf)
        return View(buf.id, buf.dtype, tuple(shape), contiguous_strides(tuple(shape)), 0)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def is_contiguous(self) -> bool:
        return all(st == cs for sz, st, cs in zip(self.shape, self.strides, contiguous_strides(self.shape)) if sz != 1)

    def permute(self, dims) -> View:
        dims = [d % self.rank for d in dims]
        return replace(self, shape=tuple(self.shape[d] for d in dims), strides=tuple(self.strides[d] for d in dims))

    def slice(self, dim: int, start: int, end: int, step: int = 1) -> View:
        dim %= self.rank
        size = self.shape[dim]
        start, end, _ = slice(start, end, step).indices(size)
        n = max(0, (end - start + step - 1) // step)
        shape = list(self.shape)
        strides = list(self.strides)
        shape[dim] = n
        strides[dim] = self.strides[dim] * step
        return replace(self, shape=tuple(shape), strides=tuple(strides), offset=self.offset + start * self.strides[dim])

    def select(self, dim: int, index: int) -> View:
        dim %= self.rank
        index %= self.shape[dim]
        return replace(
            self,
            shape=self.shape[:dim] + self.shape[dim + 1 :],
            strides=self.strides[:dim] + self.strides[dim + 1 :],
            offset=self.offset + index * self.strides[dim],
        )

    def unsqueeze(self, dim: int) -> View:
        dim %= self.rank + 1
        return replace(
            self,
            shape=self.shape[:dim] + (1,) + self.shape[dim:],
            strides=self.strides[:dim] + (0,) + self.strides[dim:],
        )

    def expand(self, shape: tuple[int, ...]) -> View:
        """Broadcast to `shape` (numpy rules): new leading dims and size-1 dims get stride 0."""
        shape = tuple(shape)
        lead = len(shape) - self.rank
        assert lead >= 0, (self.shape, shape)
        strides = [0] * lead
        for size, (own, st) in zip(shape[lead:], zip(self.shape, self.strides)):
            if own == size:
                strides.append(st)
            elif own == 1:
                strides.append(0)
            else:
                raise ValueError(f"cannot broadcast {self.shape} to {shape}")
        return replace(self, shape=shape, strides=tuple(strides))

    def reshape(self, shape) -> View | None:
        """Same elements in a new shape without copying, or None when strides don't allow it."""
        shape = list(shape)
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape[shape.index(-1)] = self.numel // max(known, 1)
        shape = tuple(shape)
        assert math.prod(shape) == self.numel, (self.shape, shape)
        strides = _reshape_strides(self.shape, self.strides, shape)
        return None if strides is None else replace(self, shape=shape, strides=strides)

    def coalesced(self) -> View:
        """Drop size-1 dims and merge dims that are contiguous with each other."""
        dims = [(sz, st) for sz, st in zip(self.shape, self.strides) if sz != 1]
        merged: list[list[int]] = []
        for sz, st in dims:
            if merged and merged[-1][1] == st * sz:
                merged[-1] = [merged[-1][0] * sz, st]
            else:
                merged.append([sz, st])
        if not merged:
            merged = [[1, 1]]
        return replace(self, shape=tuple(m[0] for m in merged), strides=tuple(m[1] for m in merged))

    def padded(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shape and strides padded on the left with size-1 dims to exactly `rank` dims."""
        lead = rank - self.rank
        assert lead >= 0, f"view of rank {self.rank} exceeds the kernel's {rank}"
        return (1,) * lead + self.shape, (0,) * lead + self.strides

    def offsets(self):
        """Element offsets of every element, in row-major order of the view (numpy int64)."""
        import numpy as np

        off = np.full((1,) * max(self.rank, 1), self.offset, dtype=np.int64)
        for d, (sz, st) in enumerate(zip(self.shape, self.strides)):
            idx = np.arange(sz, dtype=np.int64) * st
            off = off + idx.reshape([-1 if i == d else 1 for i in range(max(self.rank, 1))])
        return off.reshape(-1)

    def span(self) -> tuple[int, int]:
        """[lo, hi) of the elements this view can address."""
        lo = self.offset + sum((sz - 1) * st for sz, st in zip(self.shape, self.strides) if st < 0 and sz > 0)
        hi = self.offset + sum((sz - 1) * st for sz, st in zip(self.shape, self.strides) if st > 0 and sz > 0)
        return lo, hi + 1


def _reshape_strides(old_shape, old_strides, new_shape):
    """Strides for viewing (old_shape, old_strides) as new_shape, or None (torch's computeStride)."""
    if math.prod(old_shape) == 0:
        return contiguous_strides(new_shape)
    old_shape, old_strides = (tuple(old_shape) or (1,)), (tuple(old_strides) or (1,))
    new_strides = [0] * len(new_shape)
    view_d = len(new_shape) - 1
    chunk_base_stride = old_strides[-1]
    tensor_numel = view_numel = 1
    for tensor_d in range(len(old_shape) - 1, -1, -1):
        tensor_numel *= old_shape[tensor_d]
        # A chunk ends where the next-outer dim is not contiguous with this one.
        if tensor_d == 0 or (
            old_shape[tensor_d - 1] != 1 and old_strides[tensor_d - 1] != tensor_numel * chunk_base_stride
        ):
            while view_d >= 0 and (view_numel < tensor_numel or new_shape[view_d] == 1):
                new_strides[view_d] = view_numel * chunk_base_stride
                view_numel *= new_shape[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if tensor_d > 0:
                chunk_base_stride = old_strides[tensor_d - 1]
                tensor_numel = view_numel = 1
    if view_d != -1:
        return None
    return tuple(new_strides)


@dataclass
class OpNode:
    """One op of the graph. `inputs`/`outputs` are views; `attrs` is the op family's own dataclass of
    attributes (defined beside the family in ops/, e.g. ops/matmul.MatmulAttrs; None for a family
    without any): set at capture, completed by passes (tiles, split counts, a folded norm)."""

    kind: str
    inputs: tuple[View | None, ...]
    outputs: tuple[View, ...]
    attrs: object = None
    name: str = ""
    source: str = ""  # the user's source line this op came from

    def __repr__(self):
        return f"OpNode({self.name}: {self.kind})"


@dataclass
class Graph:
    buffers: list[Buffer] = field(default_factory=list)
    ops: list[OpNode] = field(default_factory=list)
    params: dict[int, torch.Tensor] = field(default_factory=dict)  # buffer id -> tensor read in place
    inputs: list[tuple[int, torch.Size, torch.dtype] | None] = field(default_factory=list)  # flat user inputs
    outputs: list = field(default_factory=list)  # flat outputs: View | python scalar
    out_spec: object = None
    in_spec: object = None  # the pytree structure of a call's (args, kwargs), as exported

    def add_buffer(self, name: str, numel: int, dtype: torch.dtype, kind: BufferKind) -> Buffer:
        buf = Buffer(len(self.buffers), name, numel, dtype, kind)
        self.buffers.append(buf)
        return buf

    def output_buffers(self) -> set[int]:
        """Buffers the model returns (their values must be materialised)."""
        return {v.buffer for v in self.outputs if isinstance(v, View)}

    def readers(self) -> dict[int, list]:
        """buffer id -> the ops reading it (an op once per input view that reads it)."""
        found: dict[int, list] = {}
        for op in self.ops:
            for v in op.inputs:
                if v is not None:
                    found.setdefault(v.buffer, []).append(op)
        return found

    def new_tensor(self, name: str, shape, dtype: torch.dtype) -> View:
        buf = self.add_buffer(name, math.prod(shape), dtype, BufferKind.ACT)
        return View.full(buf, tuple(shape))
