"""Megakernel: buffers + queue + counters + the compiled persistent kernel.

Per call: validate and bind inputs (one address-table update), launch one program per
worker, check the error record, return outputs shaped like the model's. Counters and the
dynamic queue head are never reset between calls: targets scale with the launch number.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys

import numpy as np
import torch
import torch.utils._pytree as pytree

from mkcompiler.errors import InputError, MegakernelError
from mkcompiler.ir import BufferKind, View
from mkcompiler.layout import NUM_ERROR_FIELDS, ErrorField, Field
from mkcompiler.passes.verify import check_queue

COUNTER_LIMIT = 2**31 - 1


def cache_dir() -> str:
    root = os.environ.get("MKCOMPILER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mkcompiler")
    os.makedirs(root, exist_ok=True)
    return root


def load_source(source: str):
    """Import generated source as a module (Triton reads a jit function's source from its file)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    name = f"mkcompiler_kernel_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(cache_dir(), name + ".py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Megakernel:
    def __init__(self, compilation, source: str, device: torch.device, interpret: bool):
        self.compilation = compilation
        self.graph = compilation.graph
        self.settings = compilation.settings
        self.source = source
        self.device = device
        self.interpret = interpret
        self.num_workers = compilation.num_workers
        self.max_spin = self.settings.max_spin or (2000 if interpret else 1 << 22)
        self._kernel = load_source(source).megakernel
        g = self.graph
        self.buffers: dict[int, torch.Tensor] = {}
        for b in g.buffers:
            if b.kind in (BufferKind.ACT, BufferKind.OUTPUT):
                self.buffers[b.id] = torch.empty(b.numel, dtype=b.dtype, device=device)
        self._bound: dict[int, torch.Tensor] = {}
        self._addrs_host = torch.zeros(len(g.buffers), dtype=torch.int64)
        for bid, t in {**self.buffers, **g.params}.items():
            self._addrs_host[bid] = t.data_ptr()
        self.addrs = self._addrs_host.to(device)
        self.counters = torch.zeros(max(self.queue.num_counters, 1), dtype=torch.int32, device=device)
        self.head = torch.zeros(1, dtype=torch.int32, device=device)
        self.err = torch.zeros(NUM_ERROR_FIELDS, dtype=torch.int32, device=device)
        self.generation = 0
        self.upload_queue(check=False)

    # ---- what users inspect ----
    @property
    def queue(self):
        return self.compilation.queue

    @property
    def dag(self):
        return self.compilation.dag

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.compilation.timings)

    def __repr__(self):
        return f"<Megakernel {len(self.queue)} instructions, {len(self.queue.opcode_keys)} opcodes, {self.num_workers} workers on {self.device}>"

    # ---- queue ----
    def upload_queue(self, check: bool = True) -> None:
        """Send (a possibly edited) `self.queue` to the device. `check` refuses a queue whose
        waits are not met exactly by its signals before launching it."""
        q = self.queue
        if check:
            check_queue(q, static=self.settings.schedule == "static")
        dev = self.device
        self.instr = torch.from_numpy(np.ascontiguousarray(q.rows)).to(dev)
        self.waits = torch.from_numpy(np.ascontiguousarray(q.waits)).reshape(-1).to(dev)
        if self.waits.numel() == 0:
            self.waits = torch.zeros(2, dtype=torch.int32, device=dev)
        self.views = torch.from_numpy(np.ascontiguousarray(q.views)).reshape(-1).to(dev)
        self.order = torch.from_numpy(np.ascontiguousarray(q.worker_order)).to(dev)
        self.worker_begin = torch.from_numpy(np.ascontiguousarray(q.worker_begin)).to(dev)
        self._max_count = int(q.waits[:, 1].max()) if len(q.waits) else 1
        self.reset()

    def reset(self) -> None:
        """Zero counters, the queue head and the error record (after an error, or to start over)."""
        self.counters.zero_()
        self.head.zero_()
        self.err.zero_()
        self.generation = 0

    # ---- calling ----
    def _bind(self, args, kwargs) -> None:
        flat = pytree.tree_leaves((args, kwargs))
        expected = self.graph.inputs
        if len(flat) != len(expected):
            raise InputError(f"expected {len(expected)} tensor inputs, got {len(flat)}")
        changed = False
        for i, (t, (bid, shape, dtype)) in enumerate(zip(flat, expected)):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"input {i}: expected a tensor, got {type(t).__name__}")
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise InputError(
                    f"input {i}: expected shape {tuple(shape)} {dtype}, got {tuple(t.shape)} {t.dtype} "
                    "(a megakernel is compiled for one shape; compile another for a new shape)"
                )
            if t.device != self.device:
                raise InputError(f"input {i}: expected a tensor on {self.device}, got {t.device}")
            t = t.contiguous()
            self._bound[bid] = t
            if self._addrs_host[bid] != t.data_ptr():
                self._addrs_host[bid] = t.data_ptr()
                changed = True
        if changed:
            self.addrs.copy_(self._addrs_host)

    def launch(self) -> None:
        if (self.generation + 1) * self._max_count >= COUNTER_LIMIT or (
            (self.generation + 1) * (len(self.queue) + self.num_workers) >= COUNTER_LIMIT
        ):
            self.reset()
        self.generation += 1
        kwargs = dict(MAX_SPIN=self.max_spin, DYNAMIC=self.settings.schedule == "dynamic")
        if not self.interpret:
            kwargs.update(num_warps=self.settings.num_warps, num_stages=self.settings.num_stages,
                          launch_cooperative_grid=True)
        self._kernel[(self.num_workers,)](
            self.instr, len(self.queue), self.waits, self.counters, self.head, self.err, self.addrs,
            self.views, self.order, self.worker_begin, self.generation, **kwargs,
        )

    def check(self) -> None:
        err = self.err.cpu().tolist()
        if err[ErrorField.FLAG]:
            message = self._describe_error(err)  # before reset(), which zeroes the launch number
            self.reset()
            raise MegakernelError(message)

    def __call__(self, *args, **kwargs):
        self._bind(args, kwargs)
        self.launch()
        self.check()
        return self.outputs()

    def tensor_of(self, v: View) -> torch.Tensor:
        """A strided tensor over the memory a view names (buffers, parameters or bound inputs)."""
        kind = self.graph.buffers[v.buffer].kind
        if kind in (BufferKind.PARAM, BufferKind.STATE):
            base = self.graph.params[v.buffer]
            return torch.as_strided(base, v.shape, v.strides, base.storage_offset() + v.offset)
        base = self._bound[v.buffer] if kind == BufferKind.INPUT else self.buffers[v.buffer]
        return torch.as_strided(base, v.shape, v.strides, base.storage_offset() + v.offset)

    def outputs(self):
        flat = []
        for v in self.graph.outputs:
            if isinstance(v, View):
                t = self.tensor_of(v)
                flat.append(t.clone() if self.settings.copy_outputs else t)
            else:
                flat.append(v)
        return pytree.tree_unflatten(flat, self.graph.out_spec)

    def poison(self, value: float = float("nan")) -> None:
        """Fill every intermediate with `value` (NaN): an unwritten tile then shows in outputs."""
        for t in self.buffers.values():
            t.fill_(value if t.dtype.is_floating_point else -1)

    def _describe_error(self, err) -> str:
        q = self.queue
        i, c = err[ErrorField.INSTRUCTION], err[ErrorField.COUNTER]
        producers = [int(k) for k in np.nonzero(q.rows[:, Field.SIGNAL] == c)[0]]
        what = f"{q.opcode_name(i)} {q.descs[i]}" if 0 <= i < len(q) else "?"
        return (
            f"megakernel wait gave up after {self.max_spin} polls: instruction {i} ({what}) on worker "
            f"{err[ErrorField.WORKER]} waited for counter {c} to reach {err[ErrorField.TARGET]} but it was "
            f"{err[ErrorField.VALUE]} (launch {self.generation}); instructions that signal counter {c}: "
            f"{producers[:16]}{' ...' if len(producers) > 16 else ''}. The kernel stopped; counters were reset."
        )
