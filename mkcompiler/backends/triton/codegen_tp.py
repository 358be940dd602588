"""How the generated kernel's dispatcher starts, waits, signals and leaves: alone (one GPU) or
as one rank of several (tensor parallelism). codegen.generate emits the pieces of one of these;
single-GPU kernels get none of the tensor-parallel ones.

The tensor-parallel kernel takes one more argument, `tp_ptr` (after prof_ptr: the rank's table,
layout.TPField), and uses mkcompiler/backends/triton/kernel_tp.py: every worker first waits for
the peers to have finished the previous launch (launch_barrier; on failure it runs nothing),
waits go through wait_all_tp (rows on a peer's counters poll that rank's memory), signals
through signal_tp (system scope for the counters peers wait on), and each worker adds 1 to the
EXIT counter as it leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

from mkcompiler.ir.queue import Queue
from mkcompiler.ops.registry import FAMILIES


@dataclass(frozen=True)
class RankProtocol:
    """Source pieces codegen.generate places in the kernel (each a whole line or lines, or a call)."""

    imports: str = ""  # after `import triton.language as tl`
    param: str = ""  # after `prof_ptr,` in the kernel's parameters
    start: str = ""  # after the program id, before the first fetch
    before_loop: str = ""  # just before the dispatch loop
    wait_call: str = "wait_all("  # the dispatcher's wait, up to its arguments (codegen.WAIT)
    signal_call: str = "signal(pre, counters_ptr)"  # after an instruction's tile
    end: str = ""  # after the dispatch loop


SINGLE_GPU = RankProtocol()

TENSOR_PARALLEL = RankProtocol(
    imports="from mkcompiler.backends.triton.kernel_tp import launch_barrier, signal_tp, wait_all_tp, worker_exit\n",
    param=" tp_ptr,",
    start="    launch_ok = launch_barrier(tp_ptr, err_ptr, generation, MAX_SPIN)\n",
    before_loop=(
        "    if launch_ok == 0:  # a peer never finished its previous launch: run nothing\n        stop = cursor\n"
    ),
    wait_call="wait_all_tp(tp_ptr, ",
    signal_call="signal_tp(pre, counters_ptr, tp_ptr)",
    end="    worker_exit(counters_ptr, tp_ptr)  # after the loop: every read of peer memory is done\n",
)


def is_tensor_parallel(queue: Queue) -> bool:
    """Does the queue wait on other ranks' counters or read their memory?"""
    return queue.has_remote_waits() or any(FAMILIES[k[0]].peer_access for k in queue.opcode_keys)
