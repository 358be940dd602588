"""The Gluon backend's megakernel (Settings.backend="gluon"): the Triton backend's runtime
(buffers, inputs, counters x launch number, the error record, outputs) launching the kernel
backends/gluon/codegen.py generates, with its TMA descriptors and TMA table.

Weights: the kernel reaches them through few TMA descriptors, one per stacked buffer
(plan.stack_weights). At compile time each stack group's parameters are copied once into one
[L*N, K] buffer and RE-BOUND as views of it (the module's parameters and the graph's tensors):
nothing is duplicated and later in-place updates of the parameters stay visible to the kernel.
"""

from __future__ import annotations

import warnings

import torch

from mkcompiler.backends.gluon.codegen import COMPUTE_WARPS, GluonKernel, GluonUnsupported, build, weight_layout
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
            kernel = build(comp.graph, comp.dag, comp.queue)
        except GluonUnsupported as e:
            why = str(e)
    if why is not None:
        warnings.warn(
            f"mkcompiler: backend='gluon' cannot run {why}; compiling on the Triton backend",
            GluonFallbackWarning,
            stacklevel=4,
        )
        return None
    return GluonMegakernel(comp, kernel, stack_parameters(comp.graph, kernel, model), device)


def stack_parameters(graph, kernel: GluonKernel, model: torch.nn.Module) -> list[torch.Tensor]:
    """One [rows, K] tensor per descriptor (kernel.groups): a group of one weight is the weight
    itself; a larger one a new buffer its members are copied into and re-bound to (graph.params
    and the module's parameters sharing their memory)."""
    params = list(model.parameters()) if model is not None else []
    out = []
    for g in kernel.groups:
        group = kernel.plan.stacks.groups[g]
        first = group.members[0]
        if len(group.members) == 1:
            out.append(graph.params[first.buffer].reshape(first.n, first.k))
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
        out.append(stacked)
    return out


class GluonMegakernel(Megakernel):
    def __init__(self, compilation, kernel: GluonKernel, stacks: list[torch.Tensor], device: torch.device):
        self.kernel = kernel
        self.stacks = stacks  # one per TMA descriptor (stack_parameters)
        super().__init__(compilation, kernel.source, device)
        # The plan's per-instruction TMA table: the static lists and the matmuls' blocks decide
        # it, not the wait counts (a queue edited by upload_queue keeps its lists).
        self.tma = torch.from_numpy(kernel.tma).to(device)
        self._descs = None

    def __repr__(self):
        return (
            f"<GluonMegakernel {len(self.queue)} instructions, {len(self.queue.opcode_keys)} opcodes, "
            f"{self.num_workers} workers, {len(self.stacks)} weight descriptors, ring {self.kernel.num_buf} x "
            f"{self.kernel.box} on {self.device}>"
        )

    def descriptors(self):
        if self._descs is None:
            from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

            layout = weight_layout(self.kernel.box)
            self._descs = [TensorDescriptor.from_tensor(t, list(self.kernel.box), layout) for t in self.stacks]
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
        with _cooperative_errors(self):
            self._kernel[(self.num_workers,)](
                *self.descriptors(),
                self.instr,
                self.waits,
                self.counters,
                self.err,
                self.views,
                self.order,
                self.worker_begin,
                self.tma,
                self.counters if prof is None else prof,
                loads,
                self.generation,
                MAX_SPIN=self.max_spin,
                NUM_BUF=self.kernel.num_buf,
                PROFILE=prof is not None,
                num_warps=COMPUTE_WARPS,
                launch_cooperative_grid=True,
            )
