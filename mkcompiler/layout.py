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


NUM_ARGS = 14  # fused elementwise ops and scatters take up to NUM_ARGS - 3 / NUM_ARGS - 5 inputs
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


MAX_RANK = 4
NUM_VIEW_FIELDS = 10


class ErrorField(IntEnum):
    """int32 error record written by the first wait that gives up."""

    FLAG = 0  # 0 = fine, 1 = a wait gave up (the kernel stops fetching)
    INSTRUCTION = 1
    COUNTER = 2
    VALUE = 3
    TARGET = 4
    WORKER = 5


NUM_ERROR_FIELDS = 8
