"""The Gluon backend's megakernel (Settings.backend="gluon"): the Triton backend's runtime
(buffers, inputs, counters x launch number, the error record, outputs) launching the kernel
backends/gluon/codegen.py generates, with its TMA descriptors and TMA table.

Weights: the kernel reaches them through few TMA descriptors, one per stacked buffer
(plan.stack_weights). At compile time each stack group's parameters are copied once into one
[L*N, K] buffer and RE-BOUND as views of it (the module's parameters and the graph's tensors):
nothing is duplicated and later in-place updates of the parameters stay visible to the kernel.
A group streamed by both rings (decode and large-M, backends/gluon/prefill.py) is stacked once and
gets a descriptor per ring box.

Large-M matmuls build their A operand's descriptor on the device (global scratch: one per CTA,
given through Triton's allocator for the launch only, from a buffer the megakernel keeps).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from mkcompiler.backends.gluon import prefill
from mkcompiler.backends.gluon.codegen import GluonKernel, GluonUnsupported, build, weight_layout
from mkcompiler.errors import MegakernelError
from mkcompiler.runtime.megakernel import COUNTER_LIMIT, Megakernel, _cooperative_errors


class GluonFallbackWarning(UserWarning):
    """backend="gluon" was asked for a graph it cannot run: the Triton backend runs it."""


def compile_gluon(comp, model: torch.nn.Module, device: torch.device) -> GluonMegakernel | None:
    """The Gluon megakernel of a compilation, or None after a GluonFallbackWarning naming what
    the backend lacks (the caller then generates the Triton kernel)."""
    why = None
    if comp.settings.interpret:
        why = "Triton's interpreter (Gluon kernels run only on a GPU)"
    elif comp.settings.schedule != "static":
        why = f"a {comp.settings.schedule} schedule (it runs static worker lists)"
    else:
        try:
            kernel = build(comp.graph, comp.dag, comp.queue, comp.settings.num_warps)
        except GluonUnsupported as e:
            why = str(e)
    if why is not None:
        warnings.warn(
            f"mkcompiler: backend='gluon' cannot run {why}; compiling on the Triton backend",
            GluonFallbackWarning,
            stacklevel=4,
        )
        return None
    stacks = stack_parameters(comp.graph, kernel, model)
    return GluonMegakernel(comp, kernel, [stacks[g] for g in kernel.groups], device, stacks)


def stack_parameters(graph, kernel: GluonKernel, model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """One [rows, K] tensor per stack group a descriptor reads (kernel.groups, then
    kernel.prefill_groups; each group once): a group of one weight is the weight itself; a larger
    one a new buffer its members are copied into and re-bound to (graph.params and the module's
    parameters sharing their memory)."""
    params = list(model.parameters()) if model is not None else []
    out = {}
    for g in dict.fromkeys(kernel.groups + kernel.prefill_groups):
        group = kernel.plan.stacks.groups[g]
        first = group.members[0]
        if len(group.members) == 1:
            out[g] = graph.params[first.buffer].reshape(first.n, first.k)
            continue
        old = graph.params[first.buffer]
        stacked = torch.empty(group.rows, first.k, dtype=old.dtype, device=old.device)
        for m in group.members:
            row0 = kernel.plan.stacks.slots[m].row0
            tensor = graph.params[m.buffer]
            view = stacked[row0 : row0 + m.n]
            view.copy_(tensor.reshape(m.n, m.k))
            for p in params:
                if p.data_ptr() == tensor.data_ptr() and p.shape == view.shape:
                    p.data = view
            graph.params[m.buffer] = view
        out[g] = stacked
    return out


class _Scratch:
    """Triton's allocator for a launch's global scratch (the large-M A descriptors): one buffer
    kept across launches, grown when a launch asks for more (launches of one megakernel are
    serialized on its stream, so they may share it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer = torch.empty(0, dtype=torch.int8, device=device)

    def __call__(self, size: int, alignment: int, stream) -> torch.Tensor:
        if self.buffer.numel() < size:
            self.buffer = torch.empty(size, dtype=torch.int8, device=self.device)
        return self.buffer


@contextlib.contextmanager
def _allocator(scratch: _Scratch):
    """Triton's allocator set for this launch only (a context variable: restored after)."""
    from triton.runtime import _allocation

    token = _allocation._allocator.set(scratch)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


class GluonMegakernel(Megakernel):
    def __init__(
        self,
        compilation,
        kernel: GluonKernel,
        stacks: list[torch.Tensor],
        device: torch.device,
        groups: dict[int, torch.Tensor] | None = None,
    ):
        self.kernel = kernel
        self.stacks = stacks  # one per decode TMA descriptor (stack_parameters)
        # one per large-M B descriptor
        self.prefill_stacks = [groups[g] for g in kernel.prefill_groups] if kernel.prefill_groups else []
        super().__init__(compilation, kernel.source, device)
        # The plan's per-instruction TMA table: the static lists and the matmuls' blocks decide
        # it, not the wait counts (a queue edited by upload_queue keeps its lists).
        self.tma = torch.from_numpy(kernel.tma).to(device)
        self.ptab = torch.from_numpy(kernel.ptab).to(device) if kernel.ptab is not None else None
        self._scratch = _Scratch(device)
        self._descs = None

    def __repr__(self):
        return (
            f"<GluonMegakernel {len(self.queue)} instructions, {len(self.queue.opcode_keys)} opcodes, "
            f"{self.num_workers} workers, {len(self.stacks)} weight descriptors, ring {self.kernel.num_buf} x "
            f"{self.kernel.box}{self._large_repr()} on {self.device}>"
        )

    def _large_repr(self) -> str:
        if not self.prefill_stacks:
            return ""
        bm, bn, bk = prefill.TILE
        return (
            f", large-M ring {self.kernel.prefill_buf} x ({bm} + {bn}) x {bk}, {len(self.prefill_stacks)} B descriptors"
        )

    def descriptors(self):
        if self._descs is None:
            from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

            layout = weight_layout(self.kernel.box)
            self._descs = [TensorDescriptor.from_tensor(t, list(self.kernel.box), layout) for t in self.stacks]
            box = list(prefill.TILE[1:])
            self._descs += [TensorDescriptor.from_tensor(t, box, prefill.b_layout()) for t in self.prefill_stacks]
        return self._descs

    def profile(self, *args, **kwargs):
        """Megakernel.profile's stamps, plus `loads`: per instruction when the loader issued its
        first weight block (ns, -1: it streams nothing), so the picture shows how far ahead of
        each matmul's wait its weights were asked for."""
        result = super().profile(*args, **kwargs)
        result.loads = self._loads.cpu().numpy()
        return result

    def launch(self, prof: torch.Tensor | None = None) -> None:
        if not self.launchable:
            raise MegakernelError(
                "this Gluon megakernel was generated without a GPU (Triton interprets in this process): it cannot be "
                "launched here; compile it offline with mkcompiler.backends.gluon.codegen.compile_offline(mk.kernel, ...)"
            )
        if (self.generation + 1) * self._max_count >= COUNTER_LIMIT:
            self.reset()
        self.generation += 1
        self._sync_view_addrs()
        loads = self.counters  # unused by a normal launch (PROFILE=False)
        if prof is not None:
            self._loads = loads = torch.full((len(self.queue),), -1, dtype=torch.int64, device=self.device)
        tables = (self.tma,)
        large = {}
        if self.ptab is not None:  # large-M matmuls: their table, ring depth and A scratch
            tables = (self.tma, self.ptab)
            large = dict(P_BUF=self.kernel.prefill_buf)
        with _cooperative_errors(self), _allocator(self._scratch):
            self._kernel[(self.num_workers,)](
                *self.descriptors(),
                self.instr,
                self.waits,
                self.counters,
                self.err,
                self.views,
                self.order,
                self.worker_begin,
                *tables,
                self.counters if prof is None else prof,
                loads,
                self.generation,
                MAX_SPIN=self.max_spin,
                NUM_BUF=self.kernel.num_buf,
                PROFILE=prof is not None,
                num_warps=self.kernel.num_warps,
                launch_cooperative_grid=True,
                **large,
            )
