"""Run the Gluon backend's generated tile routines on the CPU, with torch standing in for `gl`.

Gluon kernels run only on a GPU, but a tile routine's arithmetic (index splits, strided offsets,
cat windows, scatter slots, row reductions) is plain Python over tensors. `GluonShim` executes
the SAME routine text a family emits (Emitted.routines and its call) and the SAME bodies of the
device helpers (views.py, small_ops.py, tiles.sigmoid / add: their functions' code objects,
re-bound to a namespace whose `gl` is torch), on a compiled megakernel's own buffers, views and
instruction rows. Only the encoding readers are replaced (arg, view_base, view_size,
view_stride, view_numel: one table read each, as ir/layout.py defines them) and the layouts
(which only place elements on threads). Pointers are byte addresses into the megakernel's
tensors (the views' ADDR column), as on the GPU.

What this cannot check (layouts, compilation, memory ordering) the offline sm_90 compile and the
GPU tests do.
"""

from __future__ import annotations

import math
import types

import torch

from mkcompiler.ir.layout import NUM_VIEW_FIELDS, Field, ViewField

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int1": torch.bool,
}


def _t(x):
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


class Ptr:
    """A tensor of byte addresses of elements of one dtype (a Gluon pointer tensor)."""

    def __init__(self, addr, dtype: torch.dtype):
        self.addr, self.dtype = _t(addr).to(torch.int64), dtype

    def __add__(self, off):
        return Ptr(self.addr + _t(off).to(torch.int64) * self.dtype.itemsize, self.dtype)

    __radd__ = __add__


class Memory:
    """Typed reads and writes at byte addresses inside a set of tensors' storages."""

    def __init__(self, tensors):
        self.regions = []
        seen = set()
        for t in tensors:
            s = t.untyped_storage()
            if s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            u8 = torch.empty(0, dtype=torch.uint8).set_(s)
            self.regions.append((s.data_ptr(), s.nbytes(), u8))

    def _each(self, addr, mask):
        found = torch.zeros_like(addr, dtype=torch.bool)
        for start, nbytes, u8 in self.regions:
            sel = mask & (addr >= start) & (addr < start + nbytes)
            if sel.any():
                found |= sel
                yield sel, u8, start
        if not bool(found.eq(mask).all()):
            raise IndexError(f"a masked-in address outside every buffer: {addr[mask & ~found][:4].tolist()}")

    def load(self, ptr: Ptr, mask, other):
        addr = ptr.addr
        mask = torch.ones_like(addr, dtype=torch.bool) if mask is None else _t(mask).expand(addr.shape)
        out = torch.full(addr.shape, 0 if other is None else other, dtype=ptr.dtype)
        size = ptr.dtype.itemsize
        for sel, u8, start in self._each(addr, mask):
            out[sel] = u8.view(ptr.dtype)[(addr[sel] - start) // size]
        return out

    def store(self, ptr: Ptr, value, mask):
        addr = ptr.addr
        mask = torch.ones_like(addr, dtype=torch.bool) if mask is None else _t(mask).expand(addr.shape)
        value = _t(value).expand(addr.shape).to(ptr.dtype)
        size = ptr.dtype.itemsize
        for sel, u8, start in self._each(addr, mask):
            u8.view(ptr.dtype)[(addr[sel] - start) // size] = value[sel]


class _Gl(types.SimpleNamespace):
    """`gl` over torch tensors: what the routines and helpers call."""

    def __getattr__(self, name):
        fn = getattr(torch, name)  # exp, cos, erf, floor...: elementwise math of the same name
        return lambda *a: fn(*(_t(x) for x in a))


def _reduce(x, axis, combine):
    return {"add": lambda: x.sum(axis), "maximum": lambda: x.amax(axis), "minimum": lambda: x.amin(axis)}[
        combine.__name__
    ]()


def _gl(memory: Memory) -> _Gl:
    return _Gl(
        **_DTYPES,
        constexpr=lambda v: v,
        BlockedLayout=lambda *a, **k: None,
        SliceLayout=lambda *a, **k: None,
        arange=lambda lo, hi, layout=None: torch.arange(lo, hi, dtype=torch.int32),
        zeros=lambda shape, dtype, layout=None: torch.zeros(shape, dtype=dtype),
        full=lambda shape, value, dtype, layout=None: torch.full(shape, value, dtype=dtype),
        where=lambda c, a, b: torch.where(_t(c), _t(a), _t(b)),
        maximum=lambda a, b: torch.maximum(_t(a), _t(b)),
        minimum=lambda a, b: torch.minimum(_t(a), _t(b)),
        reduce=_reduce,
        load=lambda p, mask=None, other=None, cache_modifier="", **k: memory.load(p, mask, other),
        store=lambda p, value, mask=None, **k: memory.store(p, value, mask),
    )


class GluonShim:
    """Runs Gluon tile routines for a compiled (Triton or Gluon) megakernel's queue on the CPU:
    `run(i, emitted)` executes instruction i with the branch a family emitted for its opcode."""

    def __init__(self, mk):
        from mkcompiler.backends.gluon import small_ops, tiles, views

        self.rows = mk.queue.rows
        mk._sync_view_addrs()
        self.views = mk.views.view(-1, NUM_VIEW_FIELDS).cpu()
        tensors = [*mk.buffers.values(), *mk.graph.params.values(), *mk._bound.values()]
        tensors += [self.views, *getattr(mk, "stacks", [])]
        ns: dict = {}
        for module in (tiles, views, small_ops):
            for name, value in vars(module).items():
                fn = getattr(value, "fn", None)
                if isinstance(fn, types.FunctionType):  # a @gluon.jit function: its body, re-bound
                    ns[name] = types.FunctionType(fn.__code__, ns, name, fn.__defaults__, fn.__closure__)
                elif type(value).__name__ == "constexpr":
                    ns[name] = value.value
        ns.update(gl=_gl(Memory(tensors)), gluon=types.SimpleNamespace(jit=lambda f: f))
        ns.update(self._encoding(), flat_layout=lambda *a: None, rows_layout=lambda *a: None)
        self.ns = ns

    def _encoding(self) -> dict:
        rows, views = self.rows, self.views

        def field(v, f):
            return views[int(v), f].clone()

        def view_base(views_ptr, v, dt):
            return Ptr(field(v, ViewField.ADDR), dt)

        def view_numel(views_ptr, v):
            return _t(math.prod(int(field(v, ViewField.SIZE0 + d)) for d in range(4)))

        def row_shape(views_ptr, vx, x_dt, x_flat):
            c = field(vx, ViewField.SIZE0 + 3)
            return c, view_numel(views_ptr, vx) // c

        return dict(
            arg=lambda row, ins, i: torch.tensor(int(rows[int(ins), Field.ARG0 + i]), dtype=torch.int32),
            view_base=view_base,
            view_base_aligned=view_base,
            view_size=lambda views_ptr, v, d: field(v, ViewField.SIZE0 + d),
            view_stride=lambda views_ptr, v, d: field(v, ViewField.STRIDE0 + d),
            view_numel=view_numel,
            row_shape=row_shape,
        )

    def run(self, i: int, emitted, ok: int = 1) -> None:
        """Instruction i through `emitted` (its opcode's Emitted): the routines defined, then the
        branch's statement with the compute partition's names bound (ok = 0: a wait gave up)."""
        key = emitted.routines
        if key and key not in self.ns.setdefault("_defined", set()):
            exec(emitted.routines, self.ns)
            self.ns["_defined"].add(key)
        scope = dict(row=None, views_ptr=None, tma_ptr=None, idx=i, ok=ok, num_warps=4)
        exec(emitted.call, self.ns, scope)


def run_with_gluon_tiles(mk, inputs, kinds, seed: int = 0):
    """The megakernel's queue on the CPU (vm.run_queue, static lists): instructions of `kinds`
    through their Gluon routines (GluonShim), the rest through their ops' torch references.
    Returns (outputs, opcodes run through Gluon routines)."""
    from mkcompiler.ops.registry import FAMILIES

    from mkcompiler.backends.gluon.family import GLUON_FAMILIES
    from mkcompiler.vm import run_queue

    mk._bind(tuple(inputs), {})
    shim = GluonShim(mk)
    q, dag, graph = mk.queue, mk.dag, mk.graph
    emitted = {}
    for o, key in enumerate(q.opcode_keys):
        if key[0] in kinds:
            emitted[o] = GLUON_FAMILIES[key[0]].emit(key, o, q)

    def execute(i):
        o = int(q.rows[i, Field.OPCODE])
        if o in emitted:
            shim.run(i, emitted[o])
        else:
            task = dag.tasks[int(q.rows[i, Field.TASK])]
            op = graph.ops[task.op]
            FAMILIES[op.kind].reference(op, task.coords, mk.tensor_of)

    run_queue(q, execute, dynamic=False, seed=seed)
    return mk.outputs(), sorted(emitted)
