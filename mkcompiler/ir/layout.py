"""Binary layouts shared by the host and the generated kernel: one definition of each.

The code generator emits these numbers into the kernel as constants and the VM reads the
same rows, so the instruction encoding cannot drift between producer and consumers.
"""

from enum import IntEnum


class Field(IntEnum):
    """Columns of one int32 instruction row."""

    OPCODE = 0
    ARG0 = 1  # ARG0 .. ARG0 + NUM_ARGS - 1: op-specific (view ids, tile coordinates)
    WAIT_BEGIN = 15  # waits of this instruction are rows [WAIT_BEGIN, WAIT_END) of the wait table
    WAIT_END = 16
    SIGNAL = 17  # counter this instruction adds 1 to when done; -1 = nobody waits on it
    TASK = 18  # index of the tile task in the DAG (for errors and profiles)
    RESERVED = 19


NUM_ARGS = 14  # fused elementwise ops and scatters take up to NUM_ARGS - 3 / NUM_ARGS - 5 (or 6) inputs
# The dispatcher loads an instruction's first PRELOADED_ARGS args into registers before its wait
# (kernel_lib.preload), so a tile does not start with a dependent trip to memory for them (the
# acquire that ends the wait invalidates L1); the rest are loaded when used (ops/common.arg).
PRELOADED_ARGS = 10
NUM_FIELDS = 20


class WaitField(IntEnum):
    """Columns of one int32 wait row: wait until counter >= COUNT * generation, on this rank's
    counters (RANK = LOCAL) or on rank RANK's (tensor parallelism: every rank runs the same
    queue, so counter ids are the same on every rank; see passes/ranks.py)."""

    COUNTER = 0
    COUNT = 1
    RANK = 2


NUM_WAIT_FIELDS = 3
LOCAL = -1  # WaitField.RANK of a wait on this rank's own counters


class ViewField(IntEnum):
    """Columns of one int64 view row: a strided view of a buffer, padded to MAX_RANK dims."""

    BUFFER = 0
    OFFSET = 1  # in elements
    SIZE0 = 2  # SIZE0 .. SIZE0 + MAX_RANK - 1, outermost first; padding dims have size 1
    STRIDE0 = 6  # STRIDE0 .. STRIDE0 + MAX_RANK - 1, in elements
    # Byte address of element 0: the runtime's copy of BUFFER's address plus OFFSET, kept current
    # (runtime.Megakernel.launch; 0 in the queue), so a tile reaches its data in one dependent
    # load fewer than through the address table.
    ADDR = 10


MAX_RANK = 4
NUM_VIEW_FIELDS = 11


class ErrorField(IntEnum):
    """int32 error record written by the first wait that gives up."""

    FLAG = 0  # 0 = fine, 1 = a wait gave up (the kernel stops fetching), 2 = a peer rank had stopped (TP)
    INSTRUCTION = 1
    COUNTER = 2
    VALUE = 3
    TARGET = 4
    WORKER = 5
    PEER = 6  # tensor parallelism: 1 + the rank whose counter (or error record) it was; 0: this rank's own


NUM_ERROR_FIELDS = 8


class TPField(IntEnum):
    """Header of a tensor-parallel rank's int64 table (the kernel's tp_ptr; mkcompiler/backends/triton/kernel_tp.py).
    After the header: PEER_COUNTERS[k] and PEER_ERRS[k], the addresses of rank k's counters and
    error record; then from PEER_ADDRS, N_BUFFERS entries per rank: the address of buffer b on
    rank k at PEER_ADDRS + k * N_BUFFERS + b (0 where b is not shared with peers); then, from
    SYS_FLAGS (an index into the table), one entry per counter: 1 where peers wait on it (its
    signals are released at system scope)."""

    RANK = 0
    WORLD = 1
    N_BUFFERS = 2
    EXIT = 3  # the counter every worker adds 1 to as it exits (launch separation across ranks)
    SYS_FLAGS = 4
    PEER_COUNTERS = 8  # [PEER_COUNTERS, PEER_COUNTERS + MAX_WORLD)
    PEER_ERRS = 16  # [PEER_ERRS, PEER_ERRS + MAX_WORLD)
    PEER_ADDRS = 24


MAX_WORLD = 8


class StampField(IntEnum):
    """Columns of a profile's int64 stamps, one row per instruction (the profiling kernel and
    the VM write them; tools/profiling.Profile reads them). -1: the instruction never ran."""

    WORKER = 0
    FETCH = 1  # the worker took the instruction
    READY = 2  # its waits were met
    END = 3  # after its signal


NUM_STAMPS = len(StampField)
