"""Megakernel: buffers + queue + counters + the compiled persistent kernel.

Per call: validate and bind inputs (one address-table update), launch one program per
worker, check the error record, return outputs shaped like the model's. Counters and the
dynamic queue head are never reset between calls: targets scale with the launch number.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import importlib.util
import os
import sys
import threading

import numpy as np
import torch
import torch.utils._pytree as pytree

from mkcompiler.errors import InputError, MegakernelError, check_input, flatten_call, pytree_children
from mkcompiler.ir.graph import BufferKind, View
from mkcompiler.ir.layout import NUM_ERROR_FIELDS, NUM_STAMPS, NUM_VIEW_FIELDS, ErrorField, Field, ViewField
from mkcompiler.ir.settings import WAIT_MANY_MODE, WAIT_MODES, default_max_spin, register_cap, triton_interprets
from mkcompiler.ops.base import ALIGN_BYTES
from mkcompiler.passes.verify import check_queue
from mkcompiler.tools.profiling import Profile

COUNTER_LIMIT = 2**31 - 1
# Triton's interpreter is not thread-safe: a launch sets a global grid index and patches
# triton.language for its duration (and restores it at the end, under any other launch).
INTERPRETER_LOCK = threading.Lock()


def cache_dir() -> str:
    root = os.environ.get("MKCOMPILER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mkcompiler")
    os.makedirs(root, mode=0o700, exist_ok=True)  # owner only: tools/cache.py skips a directory others can write
    return root


def _holds(path: str, source: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == source
    except (OSError, UnicodeDecodeError):
        return False


def load_source(source: str):
    """Import generated source as a module (Triton reads a jit function's source from its file)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    name = f"mkcompiler_kernel_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(cache_dir(), name + ".py")
    if not _holds(path, source):  # absent, or not our source (planted, truncated): never imported as found
        tmp = f"{path}.{os.getpid()}.tmp"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def wait_mode(waits: str, interpret: bool, most_rows: int) -> int:
    """The kernel's WAIT_MODE (kernel_lib.wait_all's MODE): 0 in the interpreter (no inline asm),
    else Settings.waits' index, "acquire" becoming WAIT_MANY_MODE when an instruction waits on
    more than three counters (one per thread then; code other kernels do without)."""
    if interpret:
        return 0
    mode = WAIT_MODES.index(waits)
    return WAIT_MANY_MODE if waits == "acquire" and most_rows > 3 else mode


def max_workers(device: torch.device, interpret: bool, per_sm: int = 1) -> int | None:
    """How many persistent programs may be asked for (None: no limit). Workers spin-wait on
    each other, so a worker that never gets an SM would hang the rest: `per_sm` programs per SM
    (Settings.workers_per_sm). The launch is cooperative: the driver refuses a grid that cannot
    be resident at once (registers, shared memory), and launch() says so."""
    if interpret:
        return None  # interpreted programs run one after another (or one thread each)
    return torch.cuda.get_device_properties(device).multi_processor_count * per_sm


def check_num_workers(num_workers, device: torch.device, interpret: bool, per_sm: int = 1) -> None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
    if isinstance(per_sm, bool) or not isinstance(per_sm, int) or per_sm < 1:
        raise ValueError(f"workers_per_sm must be a positive integer, got {per_sm!r}")
    limit = max_workers(device, interpret, per_sm)
    if limit is not None and num_workers > limit:
        raise ValueError(
            f"num_workers={num_workers} is more than can be co-resident on {device} ({limit // per_sm} SMs x "
            f"workers_per_sm={per_sm}): every worker of a persistent kernel must run at once; use num_workers <= "
            f"{limit} or raise workers_per_sm"
        )


@contextlib.contextmanager
def _cooperative_errors(mk):
    """A grid too large to be resident at once: say which knobs decide it."""
    try:
        yield
    except RuntimeError as e:
        if "cooperative" not in str(e).lower() and "too many blocks" not in str(e).lower():
            raise
        raise MegakernelError(
            f"{mk.num_workers} workers cannot all be resident on {mk.device} at once (the launch is cooperative: "
            f"{e}); with workers_per_sm={mk.settings.workers_per_sm} and num_warps={mk.settings.num_warps}, "
            "each worker needs 1/workers_per_sm of an SM's registers and shared memory: lower workers_per_sm "
            "or num_warps, or pass a smaller num_workers"
        ) from e


class Megakernel:
    extra_args: tuple = ()  # kernel arguments after prof_ptr (tensor parallelism: tp_runtime.TPMegakernel)

    def __init__(self, compilation, source: str, device: torch.device):
        self.compilation = compilation
        self.graph = compilation.graph
        self.settings = compilation.settings
        self.source = source
        self.device = device
        if self.settings.interpret is None:
            raise ValueError("the compilation's Settings.interpret is unresolved (Settings.for_target)")
        self.interpret = self.settings.interpret  # the target the source was generated for
        # A GPU kernel generated where Triton interprets (interpret=False without a GPU): its
        # source can be read and compiled offline (mkcompiler/tools/offline.py), not launched.
        self.launchable = self.interpret == triton_interprets()
        self.num_workers = compilation.num_workers
        self.max_spin = self.settings.max_spin or default_max_spin(self.interpret)
        self._kernel = load_source(source).megakernel
        g = self.graph
        self._bound: dict[int, torch.Tensor] = {}
        # The host's address table. Invariant: written in place only (never replaced), so
        # _addrs_np, a numpy view of its memory, always reads its current values; per-call code
        # reads it there (a host comparison, no tensor op).
        self._addrs_host = torch.zeros(len(g.buffers), dtype=torch.int64)
        self._addrs_np = self._addrs_host.numpy()
        for bid, t in g.params.items():
            self._addrs_host[bid] = t.data_ptr()
        self.addrs = self._addrs_host.to(device)
        # Intermediates get memory when a view of the queue (upload_queue) or an output names them.
        self.buffers: dict[int, torch.Tensor] = {}
        self._allocate(v.buffer for v in g.outputs if isinstance(v, View))
        self.counters = torch.zeros(max(self.queue.num_counters, 1), dtype=torch.int32, device=device)
        self.head = torch.zeros(1, dtype=torch.int32, device=device)
        self.err = torch.zeros(NUM_ERROR_FIELDS, dtype=torch.int32, device=device)
        self.generation = 0
        self._lock = threading.Lock()
        # Settings.errors == "deferred": the error record's copy on its way to the host, the event
        # that marks its arrival (one, reused), and whether a copy is pending.
        self._err_host = torch.zeros(NUM_ERROR_FIELDS, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._err_event = torch.cuda.Event() if device.type == "cuda" else None
        self._err_pending = False
        self.upload_queue(check=False)

    # ---- what users inspect ----
    @property
    def queue(self):
        return self.compilation.queue

    @property
    def dag(self):
        """The tile DAG (mkcompiler.ir.dag.TileDAG): `dag.tasks[t]` is tile task t (op, coords, cost,
        counters); `dag.graph` is its dependencies as a networkx DiGraph over task ids."""
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
        # A copy even on the CPU: the runtime writes the ADDR column, the queue's rows stay as compiled.
        self.views = torch.from_numpy(np.array(q.views, dtype=np.int64)).reshape(-1).to(dev)
        self._track_view_addrs(q.views)
        self.order = torch.from_numpy(np.ascontiguousarray(q.worker_order)).to(dev)
        self.worker_begin = torch.from_numpy(np.ascontiguousarray(q.worker_begin)).to(dev)
        self._max_count = int(q.waits[:, 1].max()) if len(q.waits) else 1
        rows = q.rows[:, Field.WAIT_END] - q.rows[:, Field.WAIT_BEGIN]
        self.wait_mode = wait_mode(self.settings.waits, self.interpret, int(rows.max()) if len(rows) else 0)
        self.reset()

    def _track_view_addrs(self, views: np.ndarray) -> None:
        """Per view: its buffer and byte offset, for the ADDR column (layout.ViewField.ADDR)
        that _sync_view_addrs keeps equal to the buffer's address plus the offset."""
        itemsize = np.array([b.dtype.itemsize for b in self.graph.buffers], dtype=np.int64)
        self._view_buffer = views[:, ViewField.BUFFER].astype(np.int64)
        self._allocate(np.unique(self._view_buffer).tolist())
        self._view_offset_bytes = views[:, ViewField.OFFSET] * itemsize[self._view_buffer]
        order = np.argsort(self._view_buffer, kind="stable")
        starts = np.searchsorted(self._view_buffer[order], np.arange(len(itemsize) + 1))
        self._views_of_buffer = [order[starts[b] : starts[b + 1]] for b in range(len(itemsize))]
        self._addrs_synced = np.full(len(itemsize), -1, dtype=np.int64)  # nothing synced yet

    def _allocate(self, bids) -> None:
        """Memory for the intermediate and output buffers among `bids` that have none yet. Only
        buffers that a view of the queue or an output names are allocated: ops the passes fold
        away (a norm, RoPE or attention spelled out in many ops, canonicalized into one) leave
        their buffers in the graph, and those would otherwise take memory (77 MB for a written-out
        Llama-3.2-1B) and a place in every call's overlap check (_written)."""
        new = False
        for bid in bids:
            b = self.graph.buffers[bid]
            if bid in self.buffers or b.kind not in (BufferKind.ACT, BufferKind.OUTPUT):
                continue
            self.buffers[bid] = torch.empty(b.numel, dtype=b.dtype, device=self.device)
            self._addrs_host[bid] = self.buffers[bid].data_ptr()
            new = True
        if new:
            self.addrs.copy_(self._addrs_host)
            for cached in ("_written", "_written_spans"):  # recomputed with the new buffers
                self.__dict__.pop(cached, None)

    def _sync_view_addrs(self) -> None:
        """Rewrite the ADDR of every view whose buffer moved since the last launch (all of them
        at the first; a bound input that is a new tensor; tensor parallelism moving buffers into
        its arena): one host comparison per launch, a small upload when something moved."""
        addrs = self._addrs_np
        moved = np.nonzero(addrs != self._addrs_synced)[0]
        if len(moved) == 0:
            return
        rows = np.concatenate([self._views_of_buffer[b] for b in moved])
        values = addrs[self._view_buffer[rows]] + self._view_offset_bytes[rows]
        update = torch.from_numpy(np.stack([rows, values])).to(self.device)
        self.views.view(-1, NUM_VIEW_FIELDS)[update[0], ViewField.ADDR] = update[1]
        self._addrs_synced = addrs.copy()

    def reset(self) -> None:
        """Zero counters, the queue head and the error record (after an error, or to start over)."""
        self.counters.zero_()
        self.head.zero_()
        self.err.zero_()
        self.generation = 0

    # ---- calling ----
    def input_names(self) -> list[str]:
        """The flat user inputs' names: the forward's parameter names, as torch.export keeps them."""
        return list(self._input_names)

    @functools.cached_property
    def _input_names(self) -> tuple[str, ...]:
        return tuple(self.graph.buffers[bid].name for bid, _, _ in self.graph.inputs)

    @functools.cached_property
    def _checks(self) -> tuple[tuple[str, tuple, torch.dtype], ...]:
        """Per flat input: (what an error calls it, expected shape, dtype): built once, not per call."""
        return tuple(
            (f"input {i} ({self.graph.buffers[bid].name!r})", tuple(shape), dtype)
            for i, (bid, shape, dtype) in enumerate(self.graph.inputs)
        )

    @functools.cached_property
    def _positional_leaves(self) -> int:
        """N when a call's structure is N tensors as positional arguments (in_spec: a tuple of N
        leaves, no keyword arguments): such a call's flat inputs are its args as they are, and
        flatten_call (which reports any other structure) is not needed. -1 otherwise."""
        args_spec, kwargs_spec = pytree_children(self.in_spec)
        leaves = pytree_children(args_spec)
        if kwargs_spec.num_children or not all(c.is_leaf() for c in leaves):
            return -1
        return len(leaves)

    @functools.cached_property
    def in_spec(self) -> pytree.TreeSpec:
        """The pytree structure a call's (args, kwargs) must have: the example inputs' (the graph's
        `in_spec` where capture records it), else the graph's flat user inputs as positional arguments."""
        spec = self.graph.in_spec
        return spec if spec is not None else pytree.tree_structure((tuple(range(len(self.graph.inputs))), {}))

    def _bind(self, args, kwargs) -> None:
        """Point the address table at the call's inputs, once every input has been checked:
        a refused call changes nothing (no binding, no launch, counters and state untouched)."""
        expected = self.graph.inputs
        if not kwargs and len(args) == self._positional_leaves:
            flat = args
        else:
            flat = flatten_call(args, kwargs, self.in_spec, self.input_names())
        for t, (what, shape, dtype) in zip(flat, self._checks):
            check_input(t, what, shape, dtype, self.device)
        self._check_overlaps(flat)
        changed = False
        for t, (bid, _, _) in zip(flat, expected):
            if t.data_ptr() % ALIGN_BYTES:
                t = t.clone()  # kernels assume 16-byte aligned buffers (wide loads)
            self._bound[bid] = t
            if self._addrs_np[bid] != t.data_ptr():
                self._addrs_np[bid] = t.data_ptr()
                changed = True
        if changed:
            self.addrs.copy_(self._addrs_host)

    @functools.cached_property
    def _written(self) -> list[tuple[int, int, str]]:
        return self._written_ranges()  # buffers never move: computed once, not per call

    @functools.cached_property
    def _written_spans(self) -> tuple[list[int], list[int]]:
        """_written as (starts, ends) of disjoint ranges sorted by start (overlapping or touching
        ranges merged): both lists increase, so whether [lo, hi) meets any written range is one
        bisection (_meets_written), whatever the number of buffers."""
        starts: list[int] = []
        ends: list[int] = []
        for start, end, _ in sorted(self._written):
            if starts and start <= ends[-1]:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        return starts, ends

    def _meets_written(self, lo: int, hi: int) -> bool:
        """Whether [lo, hi) shares a byte with a range of _written (start < hi and lo < end): the
        last merged range starting below hi has the largest end of all that do."""
        starts, ends = self._written_spans
        i = bisect.bisect_left(starts, hi) - 1
        return i >= 0 and ends[i] > lo

    def _written_ranges(self) -> list[tuple[int, int, str]]:
        """[start, end) byte ranges of the memory the kernel writes: its intermediates and outputs,
        and model state updated in place (KV caches). An input there would change under the kernel."""
        ranges = [
            (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), self.graph.buffers[bid].name)
            for bid, t in self.buffers.items()
        ]
        for bid, t in self.graph.params.items():
            b = self.graph.buffers[bid]
            if b.kind == BufferKind.STATE:
                ranges.append((t.data_ptr(), t.data_ptr() + b.numel * t.element_size(), f"{b.name} (model state)"))
        return ranges

    def _check_overlaps(self, flat: list[torch.Tensor]) -> None:
        """Inputs are read while the kernel writes elsewhere: each input must have memory of its
        own, shared with no other input and with nothing the kernel writes."""
        names = self._input_names
        spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in flat]
        for i, (lo, hi) in enumerate(spans):
            if lo == hi:
                continue  # an empty tensor reads nothing
            for j in range(i):
                if spans[j][0] < hi and lo < spans[j][1]:
                    raise InputError(
                        f"input {i} ({names[i]!r}) overlaps input {j} ({names[j]!r}): they share memory; "
                        f"expected inputs in separate memory, got bytes [{lo:#x}, {hi:#x}) and "
                        f"[{spans[j][0]:#x}, {spans[j][1]:#x}); pass a .clone()"
                    )
            if not self._meets_written(lo, hi):
                continue
            for start, end, what in self._written:  # which one, for the message
                if start < hi and lo < end:
                    raise InputError(
                        f"input {i} ({names[i]!r}) overlaps the megakernel's buffer {what!r}, which the kernel "
                        "writes (with copy_outputs=False, outputs are views of such buffers); expected an input "
                        "in memory of its own; pass a .clone()"
                    )

    def launch(self, prof: torch.Tensor | None = None) -> None:
        """One launch of the kernel on the bound inputs (no checks: see __call__). With `prof`
        (int64 [n * NUM_STAMPS + 1]), the profiling variant of the kernel stamps into it."""
        if not self.launchable:
            raise MegakernelError(
                "this megakernel was generated for a GPU (interpret=False) in a process where Triton runs kernels in "
                "its interpreter: it cannot be launched here. Read mk.source, or compile it for sm_90 with "
                "mkcompiler.tools.offline.compile_sm90(mk.source); to run it, compile the model on a GPU"
            )
        if (self.generation + 1) * self._max_count >= COUNTER_LIMIT or (
            (self.generation + 1) * (len(self.queue) + self.num_workers) >= COUNTER_LIMIT
        ):
            self.reset()
        self.generation += 1
        self._sync_view_addrs()
        kwargs = dict(
            MAX_SPIN=self.max_spin,
            DYNAMIC=self.settings.schedule != "static",
            PROFILE=prof is not None,
            LOGICAL_CLOCK=self.interpret,
            WAIT_MODE=self.wait_mode,
        )
        if not self.interpret:
            kwargs.update(
                num_warps=self.settings.num_warps,
                num_stages=self.settings.num_stages,
                maxnreg=register_cap(self.settings.num_warps, self.settings.workers_per_sm),
                launch_cooperative_grid=True,
            )
        # The interpreter keeps global state (grid index, patched triton.language): one launch at a time.
        with INTERPRETER_LOCK if self.interpret else contextlib.nullcontext(), _cooperative_errors(self):
            self._kernel[(self.num_workers,)](
                self.instr,
                len(self.queue),
                self.waits,
                self.counters,
                self.head,
                self.err,
                self.addrs,
                self.views,
                self.order,
                self.worker_begin,
                self.generation,
                self.err if prof is None else prof,
                *self.extra_args,
                **kwargs,
            )

    def check(self) -> None:
        """Wait for the launches so far and raise MegakernelError if one of them failed."""
        self._err_pending = False
        self._raise_if_failed(self.err.cpu().tolist())

    def _raise_if_failed(self, err: list[int]) -> None:
        if err[ErrorField.FLAG]:
            message = self._describe_error(err)  # before reset(), which zeroes the launch number
            self.reset()
            raise MegakernelError(message)

    def _check_arrived(self) -> None:
        """errors="deferred": raise if the last record sent to the host has arrived and shows a
        failure. A failed launch's record stays set on the device (later launches stop at once,
        kernel_lib.aborted) until reset(), so a later copy still shows it."""
        if self._err_pending and self._err_event.query():
            self._err_pending = False
            self._raise_if_failed(self._err_host.tolist())

    def _send_record(self) -> None:
        self._err_host.copy_(self.err, non_blocking=True)
        self._err_event.record(torch.cuda.current_stream(self.device))
        self._err_pending = True

    def __call__(self, *args, **kwargs):
        # One call at a time per Megakernel: bind, launch, check and outputs share its buffers.
        with self._lock:
            self._bind(args, kwargs)
            deferred = self.settings.errors == "deferred" and not self.interpret
            if deferred:
                self._check_arrived()
            self.launch()
            if deferred:
                self._send_record()
            else:
                self.check()
            return self.outputs()

    def profile(self, *args, **kwargs) -> Profile:
        """Run once with per-instruction stamps (a separately compiled variant of the kernel, so
        normal calls carry no timing code). Returns a Profile (profiling.py): trace(), gantt(),
        summary(). Outputs of this run are in `profile.outputs`."""
        with self._lock:
            self._bind(args, kwargs)
            n = len(self.queue)
            prof = torch.full((n * NUM_STAMPS + 1,), -1, dtype=torch.int64, device=self.device)
            prof[-1] = 0  # the interpreter's logical clock
            self.launch(prof)
            self.check()
            outputs = self.outputs()
        stamps = prof[:-1].reshape(n, NUM_STAMPS).cpu().numpy()
        name = "Triton interpreter (CPU)" if self.interpret else torch.cuda.get_device_name(self.device)
        result = Profile(
            self.queue,
            stamps,
            unit="tick" if self.interpret else "ns",
            source="interpreter" if self.interpret else "gpu",
            device_name=name,
            compilation=self.compilation,
        )
        result.outputs = outputs
        return result

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
