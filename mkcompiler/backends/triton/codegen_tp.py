"""The tensor-parallel variant of the generated kernel: codegen.generate's source, edited at a
few anchors when the queue's tiles read peer ranks' memory (so single-GPU kernels are unchanged).

The variant takes one more argument, `tp_ptr` (after prof_ptr: the rank's table, layout.TPField)
and uses mkcompiler/backends/triton/kernel_tp.py: every worker first waits for the peers to have finished the
previous launch (launch_barrier; on failure it runs nothing), waits go through wait_all_tp (rows
on a peer's counters poll that rank's memory), signals through signal_tp (system scope for the
counters peers wait on), and each worker adds 1 to the EXIT counter as it leaves.

Each edit must match exactly once: if codegen.py changes an anchor, this fails loudly (naming
the anchor) instead of generating a kernel that silently ignores peers.
"""

from __future__ import annotations

import re

from mkcompiler.ir.queue import Queue
from mkcompiler.ops.registry import FAMILIES

IMPORT = "from mkcompiler.backends.triton.kernel_tp import launch_barrier, signal_tp, wait_all_tp, worker_exit\n"

# (what, pattern, replacement): re.subn with re.MULTILINE, each must match exactly once.
EDITS = [
    ("the triton.language import", r"^(import triton\.language as tl\n)", r"\1" + IMPORT),
    ("prof_ptr in the megakernel's parameters", r"(def megakernel\([^)]*?\bprof_ptr,)", r"\1 tp_ptr,"),
    (
        "the program id at the kernel's start",
        r"^(    pid = tl\.program_id\(0\)\n)",
        r"\1    launch_ok = launch_barrier(tp_ptr, err_ptr, generation, MAX_SPIN)\n",
    ),
    (
        "the dispatch loop",
        r"^(    while cursor < stop:\n)",
        "    if launch_ok == 0:  # a peer never finished its previous launch: run nothing\n"
        r"        stop = cursor\n\1",
    ),
    ("the call of wait_all", r"= wait_all\(", "= wait_all_tp(tp_ptr, "),
    ("the call of signal", r"\bsignal\(pre, counters_ptr\)", "signal_tp(pre, counters_ptr, tp_ptr)"),
]
EXIT = "    worker_exit(counters_ptr, tp_ptr)  # after the loop: every read of peer memory is done\n"


def is_tensor_parallel(queue: Queue) -> bool:
    """Does the queue wait on other ranks' counters or read their memory?"""
    return queue.has_remote_waits() or any(FAMILIES[k[0]].peer_access for k in queue.opcode_keys)


def tensor_parallel_source(source: str) -> str:
    """codegen.generate's kernel source -> its tensor-parallel variant."""
    for what, pattern, replacement in EDITS:
        source, n = re.subn(pattern, replacement, source, flags=re.MULTILINE)
        if n != 1:
            raise AssertionError(
                f"codegen_tp: expected {what} once in the generated kernel, found it {n} times; "
                "codegen.py changed: update mkcompiler/backends/triton/codegen_tp.py's EDITS"
            )
    if not source.endswith("\n") or not source.rstrip("\n").splitlines()[-1].startswith("        "):
        raise AssertionError("codegen_tp: the generated kernel no longer ends inside its dispatch loop")
    return source + EXIT
