"""Tensor parallelism on GPUs: one process per GPU, each running its rank's megakernel, which
reads its peers' buffers directly (NVLink) through symmetric memory.

    # under torchrun, after dist.init_process_group("nccl") and torch.cuda.set_device(local_rank)
    mk = mkcompiler.compile(model.cuda(), (tokens, pos), tensor_parallel=world)  # this rank's shard
    logits = mk(tokens, pos)                       # every rank gets the same (replicated) outputs

Each rank shards the model (mkcompiler.tp.plan.shard_model: views of the weights) and compiles its
shard through the normal pipeline; every rank's program must be the same (checked: a digest of
the queue and kernel source is compared across ranks). What peers read lives in one arena per
rank allocated with PyTorch symmetric memory (`torch.distributed._symmetric_memory.empty` and
`rendezvous`, peer addresses from `buffer_ptrs`; never multicast): the communication ops'
inputs, the counters (peers wait on them) and the error record (peers stop when it is set).
Every rank's copy of the arena has the same layout, so a buffer's address on rank k is rank
k's arena base plus the buffer's offset; the kernel gets these in the rank's table
(layout.TPField, the kernel's `tp_ptr`; device side: kernel_tp.py, codegen_tp.py).

Launches: counters only grow (count x launch number, as on one GPU), so nothing is reset
between launches; a rank's launch g starts with a wait for every peer to have finished launch
g - 1 (kernel_tp.launch_barrier), so it never overwrites a buffer a peer is still reading.
Host operations that write shared memory outside a launch (reset, poison) first synchronize
every rank (a collective: call them on every rank). A failed launch (a wait gave up) leaves the
ranks' counters out of step: the megakernel refuses further calls; compile it again.

Without GPUs, `compile_world` builds every rank's megakernel in one process for the Triton
interpreter (arenas are host tensors) and `World` runs all ranks' launches at once, one thread
per program (threaded_interp.launch_together): the generated tensor-parallel kernel itself,
remote waits and peer loads included, runs on the CPU.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
import weakref

import numpy as np
import torch

from mkcompiler.errors import MegakernelError
from mkcompiler.ir.graph import BufferKind, Graph
from mkcompiler.ir.layout import LOCAL, MAX_WORLD, NUM_ERROR_FIELDS, ErrorField, TPField, WaitField
from mkcompiler.ir.settings import triton_interprets
from mkcompiler.ops.registry import FAMILIES
from mkcompiler.runtime.megakernel import INTERPRETER_LOCK, Megakernel

# NVLink multicast (NVLS) is off on our machines and must stay off; symmetric memory and NCCL
# read these when they initialise, so set them before either does (scripts set them too).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
ARENA_ALIGN = 256  # bytes: every shared buffer starts 16-byte aligned (wide loads), here on 256


def multicast_off() -> None:
    """Set MULTICAST_OFF's variables where unset; warn about any set otherwise."""
    for name, value in MULTICAST_OFF.items():
        if os.environ.setdefault(name, value) != value:
            warnings.warn(
                f"{name}={os.environ[name]}: mkcompiler never uses NVLink multicast; expected {value}", stacklevel=2
            )


# ---- what peers read: the arena ----


def shared_buffers(graph: Graph) -> list[int]:
    """Buffers peer ranks read: the communication ops' inputs (intermediates of the graph)."""
    shared = []
    for op in graph.ops:
        if not FAMILIES[op.kind].peer_access:
            continue
        b = graph.buffers[op.inputs[0].buffer]
        if b.kind not in (BufferKind.ACT, BufferKind.OUTPUT):
            raise NotImplementedError(
                f"{op.name} reads {b.name!r} ({b.kind.name.lower()}) on its peers: only intermediates of the graph "
                "can be shared between ranks (they live in symmetric memory); compute the value first"
            )
        if b.id not in shared:
            shared.append(b.id)
    return shared


def _align(n: int) -> int:
    return -(-n // ARENA_ALIGN) * ARENA_ALIGN


def arena_layout(graph: Graph, num_counters: int) -> tuple[dict[int, int], int, int, int]:
    """Byte offsets in a rank's arena: ({shared buffer: offset}, counters, error record, size).
    The counters are num_counters int32 (the queue's, then the EXIT counter)."""
    offsets, pos = {}, 0
    for bid in shared_buffers(graph):
        b = graph.buffers[bid]
        offsets[bid] = pos
        pos = _align(pos + b.numel * b.dtype.itemsize)
    counters = pos
    err = _align(counters + 4 * num_counters)
    return offsets, counters, err, _align(err + 4 * NUM_ERROR_FIELDS)


def program_digest(queue, source: str) -> str:
    """What every rank must agree on: the queue and the kernel source."""
    h = hashlib.sha256(source.encode())
    for a in (queue.rows, queue.waits, queue.views, queue.worker_begin, queue.worker_order):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ---- peer memory: torch.distributed + symmetric memory, or every rank in one process ----


class SymmetricMemory:
    """The ranks of a torch.distributed group (one process per GPU): arenas from PyTorch
    symmetric memory."""

    def __init__(self, group=None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "tensor_parallel needs an initialised torch.distributed process group: run under torchrun and call "
                "torch.distributed.init_process_group('nccl') (after torch.cuda.set_device(local_rank)) first"
            )
        self.dist = dist
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.handles = []  # keeps the rendezvous handles (and the peers' mappings) alive

    def allocate(self, nbytes: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """This rank's arena (uint8) and every rank's arena address (as this rank maps it)."""
        import torch.distributed._symmetric_memory as symm_mem

        multicast_off()
        backend = os.environ.get("MKCOMPILER_SYMM_BACKEND")  # "CUDA", "NVSHMEM" or "NCCL"; default: torch's
        try:
            if backend and not self.handles and hasattr(symm_mem, "set_backend"):
                symm_mem.set_backend(backend)
            local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
            handle = symm_mem.rendezvous(local, self.group.group_name)
        except Exception as e:  # say where it failed: tests/test_tp_gpu.py and tp_check.sh look for it
            raise RuntimeError(
                f"symmetric memory setup failed on rank {self.rank} (backend {backend or 'default'}): "
                f"{type(e).__name__}: {e}"
            ) from e
        self.handles.append(handle)
        bases = [int(p) for p in handle.buffer_ptrs]
        if len(bases) != self.world or bases[self.rank] != local.data_ptr():
            raise RuntimeError(f"symmetric memory: peer addresses {bases} do not match rank {self.rank}'s arena")
        return local, bases

    def check_same(self, digest: str) -> None:
        digests: list = [None] * self.world
        self.dist.all_gather_object(digests, digest, group=self.group)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise AssertionError(
                f"ranks {differ} compiled a different program than rank 0: tensor-parallel ranks must match "
                "(same model, plan, inputs' shapes and options on every rank)"
            )

    def barrier(self, device: torch.device) -> None:
        """Every rank's work so far (its kernels included) has finished."""
        torch.cuda.synchronize(device)
        self.dist.barrier(group=self.group, device_ids=[device.index])


class LocalWorld:
    """Every rank in this process (the CPU interpreter): arenas are host tensors. The i-th
    allocation of each rank belongs to the i-th set (one per compiled program, same size on
    every rank), allocated for all ranks by whichever rank asks first."""

    def __init__(self, world: int):
        self.world = world
        self.arenas: list[list[torch.Tensor]] = []
        self._ranks: dict[int, _LocalRank] = {}

    def rank(self, r: int) -> _LocalRank:
        if not 0 <= r < self.world:
            raise ValueError(f"rank {r} is not in [0, {self.world})")
        return self._ranks.setdefault(r, _LocalRank(self, r))


class _LocalRank:
    def __init__(self, world: LocalWorld, rank: int):
        self.local_world, self.rank, self.world = world, rank, world.world
        self.allocations = 0

    def allocate(self, nbytes: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        w, i = self.local_world, self.allocations
        self.allocations += 1
        if i == len(w.arenas):
            w.arenas.append([torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(self.world)])
        arenas = w.arenas[i]
        if arenas[self.rank].numel() != nbytes:
            raise AssertionError(f"rank {self.rank}'s program {i} differs from its peers' (arena size)")
        return arenas[self.rank], [a.data_ptr() for a in arenas]

    def check_same(self, digest: str) -> None:
        pass  # compile_world's compile_tp compares the ranks' programs

    def barrier(self, device: torch.device) -> None:
        pass  # World runs every rank's launch to its end before returning


# ---- one rank's megakernel ----


class TPMegakernel(Megakernel):
    """One rank's megakernel: its shard's program, with the buffers peers read in the rank's
    arena and the rank's table (layout.TPField) passed to the kernel as `tp_ptr`."""

    def __init__(self, compilation, source: str, device: torch.device, peers):
        self._tp_ready = self._profile_compiled = False
        self.broken: str | None = None
        self.peers = peers
        self.rank, self.world = peers.rank, peers.world
        if not 1 <= self.world <= MAX_WORLD:
            raise NotImplementedError(f"tensor parallelism over {self.world} ranks (1 to {MAX_WORLD} supported)")
        super().__init__(compilation, source, device)
        q, g = self.queue, self.graph
        peers.check_same(program_digest(q, source))
        self.exit_counter = q.num_counters
        offsets, c_off, e_off, nbytes = arena_layout(g, q.num_counters + 1)
        self.arena, bases = peers.allocate(nbytes, device)
        for bid, off in offsets.items():  # the shared buffers move into the arena
            b = g.buffers[bid]
            self.buffers[bid] = self.arena[off : off + b.numel * b.dtype.itemsize].view(b.dtype)
            self._addrs_host[bid] = self.buffers[bid].data_ptr()
        self.addrs = self._addrs_host.to(device)
        self.counters = self.arena[c_off : c_off + 4 * (q.num_counters + 1)].view(torch.int32)
        self.err = self.arena[e_off : e_off + 4 * NUM_ERROR_FIELDS].view(torch.int32)
        self.tp_table = self._table(offsets, bases, c_off, e_off).to(device)
        self.extra_args = (self.tp_table,)
        self._tp_ready = True
        self.reset()  # collective: the arenas start uninitialised
        if not self.interpret:
            self._compile_kernel()
            peers.barrier(device)  # no rank starts waiting on a peer still compiling its kernel

    def _table(self, offsets: dict[int, int], bases: list[int], c_off: int, e_off: int) -> torch.Tensor:
        q, n_buffers = self.queue, len(self.graph.buffers)
        sys_flags = int(TPField.PEER_ADDRS) + self.world * n_buffers
        table = torch.zeros(sys_flags + q.num_counters + 1, dtype=torch.int64)
        table[TPField.RANK], table[TPField.WORLD], table[TPField.N_BUFFERS] = self.rank, self.world, n_buffers
        table[TPField.EXIT], table[TPField.SYS_FLAGS] = self.exit_counter, sys_flags
        for k, base in enumerate(bases):
            table[TPField.PEER_COUNTERS + k] = base + c_off
            table[TPField.PEER_ERRS + k] = base + e_off
            for bid, off in offsets.items():
                table[TPField.PEER_ADDRS + k * n_buffers + bid] = base + off
        remote = q.waits[q.waits[:, WaitField.RANK] != LOCAL, WaitField.COUNTER] if len(q.waits) else []
        for c in set(int(c) for c in remote) | {self.exit_counter}:
            table[sys_flags + c] = 1  # peers wait on it: signals release it at system scope
        return table

    def _compile_kernel(self, prof: torch.Tensor | None = None) -> None:
        """Compile and load the kernel (`prof`: its profiling variant) without running it: the
        first launch then starts at once on every rank (a rank still compiling would make its
        peers' waits give up)."""
        generation = self.generation
        grid, args, kwargs = recorded_launch(self, prof)
        self.generation = generation  # nothing ran
        kernel = self._kernel.warmup(*args, grid=grid, **kwargs)
        kernel = kernel.result() if hasattr(kernel, "result") else kernel
        if hasattr(kernel, "_init_handles"):
            kernel._init_handles()  # the launcher and the module load, else done by the first launch

    def upload_queue(self, check: bool = True) -> None:
        super().upload_queue(check)
        if self.device.type == "cpu":
            # On the CPU the uploaded tables share memory with the queue's arrays, which all the
            # ranks of compile_world share; the view table's ADDR column is each rank's own.
            for name in ("instr", "waits", "views", "order", "worker_begin"):
                setattr(self, name, getattr(self, name).clone())

    # ---- launches across ranks ----
    def reset(self) -> None:
        """Zero counters, queue head and error record on every rank (a collective: every rank
        must call it; peers may be reading this rank's counters until all have finished)."""
        if not self._tp_ready:
            super().reset()
            return
        self.peers.barrier(self.device)
        super().reset()
        self.peers.barrier(self.device)

    def poison(self, value: float = float("nan")) -> None:
        """Megakernel.poison, once no peer reads this rank's buffers (a collective)."""
        self.peers.barrier(self.device)
        super().poison(value)
        self.peers.barrier(self.device)

    def launch(self, prof: torch.Tensor | None = None) -> None:
        if self.broken is not None:
            raise MegakernelError(f"refused: an earlier launch failed. {self.broken}")
        if prof is not None and not self._profile_compiled and not self.interpret:
            self._compile_kernel(prof)  # a separate compile: not inside the launch (see _compile_kernel)
            self._profile_compiled = True
            self.peers.barrier(self.device)
        if self.generation == 0:
            self.peers.barrier(self.device)  # the ranks' first launches start together
        super().launch(prof)

    def check(self) -> None:
        if self.broken is not None:
            raise MegakernelError(f"refused: an earlier launch failed. {self.broken}")
        err = self.err.cpu().tolist()
        if err[ErrorField.FLAG]:
            self.broken = (
                self._describe_error(err) + " A tensor-parallel megakernel cannot go on after a failed launch "
                "(its ranks' counters are out of step): compile it again."
            )
            raise MegakernelError(self.broken)

    def _describe_error(self, err) -> str:
        i, c, value, target = (
            err[f] for f in (ErrorField.INSTRUCTION, ErrorField.COUNTER, ErrorField.VALUE, ErrorField.TARGET)
        )
        peer, worker = err[ErrorField.PEER] - 1, err[ErrorField.WORKER]
        head = f"rank {self.rank} of {self.world}: "
        if peer < 0:
            return head + super()._describe_error(err).replace("; counters were reset", "")
        how = (
            f"stopped: rank {peer} had stopped first (see its error)"
            if err[ErrorField.FLAG] == 2
            else f"gave up after {self.max_spin} polls"
        )
        if i < 0:
            return head + (
                f"the launch barrier of launch {self.generation} on worker {worker}: rank {peer}'s workers had not "
                f"all finished launch {self.generation - 1} (exit counter {value} < {target}); it {how}."
            )
        q = self.queue
        what = f"{q.opcode_name(i)} {q.descs[i]}" if 0 <= i < len(q) else "?"
        return head + (
            f"instruction {i} ({what}) on worker {worker} waited for rank {peer}'s counter {c} to reach {target} "
            f"but it was {value} (launch {self.generation}); it {how}."
        )


class _Recorder:
    """Stands in for a Megakernel's kernel for one launch: keeps the grid and arguments."""

    call: tuple | None = None

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.call = (grid, args, kwargs)

        return record


def recorded_launch(mk: Megakernel, prof: torch.Tensor | None = None) -> tuple:
    """(grid, args, kwargs) of mk's next launch (its generation advanced), without running it."""
    kernel, mk._kernel = mk._kernel, _Recorder()
    try:
        Megakernel.launch(mk, prof)
        return mk._kernel.call
    finally:
        mk._kernel = kernel


# ---- torchrun: this process's rank ----


# model -> {(rank, world, plan id, group name): (plan, the rank's shard)}: the compiles of one model
# (prefill and decode) share its shard, whose state (KV caches) is the rank's own.
_SHARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rank_shard(model: torch.nn.Module, rank: int, world: int, plan: dict | None, group_name: str) -> torch.nn.Module:
    """This rank's shard of `model` (mkcompiler.tp.plan.shard_model), the same one for every compile."""
    from mkcompiler.tp.plan import shard_model

    shards = _SHARDS.setdefault(model, {})
    key = (rank, world, id(plan), group_name)
    if key not in shards:
        shards[key] = (plan, shard_model(model, rank, world, plan))  # keeps `plan` alive: its id stays unique
    return shards[key][1]


def prepare_rank(model: torch.nn.Module, world: int, plan: dict | None = None, group=None) -> tuple:
    """(this rank's shard of `model`, a Megakernel constructor for it) for mkcompiler.compile.
    `group`: a torch.distributed group (default: the world), or a rank of a LocalWorld (every
    rank in this process, interpreter only: World runs them)."""
    local = isinstance(group, _LocalRank)
    if not local:
        multicast_off()
    peers = group if local else SymmetricMemory(group)
    if peers.world != world:
        raise ValueError(f"tensor_parallel={world} but the process group has {peers.world} ranks")

    def make(compilation, source, device) -> TPMegakernel:
        if compilation.settings.interpret and not local:
            raise ValueError("tensor_parallel under torchrun runs on GPUs; use mkcompiler.tp.runtime.compile_world")
        return TPMegakernel(compilation, source, device, peers)

    group_name = f"local-{id(peers.local_world)}" if local else peers.group.group_name
    return rank_shard(model, peers.rank, world, plan, group_name), make


# ---- every rank in one process (the CPU interpreter) ----


class World:
    """Every rank's TPMegakernel in this process; a call launches them all at once."""

    def __init__(self, megakernels: list[TPMegakernel]):
        self.ranks = megakernels
        self.world = len(megakernels)
        self._lock = threading.Lock()

    @property
    def queue(self):
        return self.ranks[0].queue

    @property
    def source(self) -> str:
        return self.ranks[0].source

    def poison(self, value: float = float("nan")) -> None:
        for mk in self.ranks:
            mk.poison(value)

    def run(self, *inputs) -> list:
        """One launch on every rank with the same (replicated) inputs; every rank's outputs."""
        with self._lock:
            for mk in self.ranks:
                if mk.broken is not None:
                    raise MegakernelError(f"refused: an earlier launch failed. {mk.broken}")
                mk._bind(inputs, {})
            launches = []
            for mk in self.ranks:
                grid, args, kwargs = recorded_launch(mk)
                launches.append((mk._kernel, grid, args, kwargs))
            from mkcompiler.backends.triton import threaded_interp

            with INTERPRETER_LOCK:
                threaded_interp.launch_together(launches)
            errors = []
            for mk in self.ranks:  # every rank's story, not only the first
                try:
                    mk.check()
                except MegakernelError as e:
                    errors.append(str(e))
            if errors:
                raise MegakernelError("\n".join(errors))
            return [mk.outputs() for mk in self.ranks]

    def __call__(self, *inputs):
        return self.run(*inputs)[0]


def compile_world(shards: list[torch.nn.Module], example_inputs, **options) -> World:
    """Every rank's megakernel for the Triton interpreter (CPU tensors), in this process.
    Options: mkcompiler.tp.plan.compile_tp's (each_rank, num_workers) and Settings fields."""
    from mkcompiler.backends.triton.codegen import generate
    from mkcompiler.tp.plan import compile_tp

    if not triton_interprets() or options.get("interpret", True) is not True:
        raise RuntimeError("compile_world runs the ranks in the Triton interpreter (TRITON_INTERPRET=1, CPU)")
    tpc = compile_tp(shards, example_inputs, **{**options, "interpret": True})
    source = generate(tpc.queue)
    local = LocalWorld(tpc.world)
    cpu = torch.device("cpu")
    return World([TPMegakernel(c, source, cpu, local.rank(r)) for r, c in enumerate(tpc.compilations)])
