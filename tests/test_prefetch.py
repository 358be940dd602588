"""The L2 prefetch plan (mkcompiler/backends/triton/prefetch.py): every decode matmul's weights
asked for once, never after the instruction, within the budget; the table the kernel reads."""

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mkcompiler
from mkcompiler.backends.triton import prefetch
from mkcompiler.ir.graph import BufferKind
from mkcompiler.ir.layout import Field


@functools.cache
def decode_step(num_workers: int):
    """A GPU-target (not launched here) greedy decode step of a tiny bf16 Llama, static schedule."""
    from examples.llama import GreedyLoop, random_llama

    torch.manual_seed(0)
    model = random_llama("tiny", dtype=torch.bfloat16, max_seq_len=256)
    return mkcompiler.compile(
        GreedyLoop(model, 1, 8), (), num_workers=num_workers, interpret=False, schedule="static", cache=False
    )


@settings(max_examples=25, deadline=None)
@given(workers=st.sampled_from([3, 16, 132]), budget=st.integers(0, 1 << 20))
def test_plan_asks_for_every_weight_once_in_time_and_within_budget(workers, budget):
    mk = decode_step(workers)
    q, buffers = mk.queue, mk.graph.buffers
    plan = prefetch.plan_prefetch(q, buffers, budget)
    prefetch.check_plan(q, buffers, plan)
    regions = prefetch.instruction_regions(q, buffers)
    assert regions, "the decode step has matmuls whose weights stream"
    assert plan.num_regions == sum(len(r) for r in regions.values())
    for i, rs in regions.items():
        assert q.opcode_keys[int(q.rows[i, Field.OPCODE])][0] == "matmul"
        for r in rs:
            assert buffers[r.buffer].kind == BufferKind.PARAM
            assert r.offset % 16 == 0 and r.row_bytes % 16 == 0 and 0 < r.rows <= prefetch.LANES
            # inside the weight's buffer
            assert r.offset + (r.rows - 1) * r.stride + r.row_bytes <= buffers[r.buffer].numel * 2


def test_a_larger_budget_asks_earlier():
    """With no budget each region is asked for at its own instruction; with a large one, earlier."""
    mk = decode_step(16)
    q, buffers = mk.queue, mk.graph.buffers
    where = {i: p for p, i in enumerate(q.worker_order.tolist())}

    def lead(budget):
        plan = prefetch.plan_prefetch(q, buffers, budget)
        return sum(where[i] - p for p, slots in enumerate(plan.positions) for i, _ in slots)

    assert lead(0) == 0
    assert lead(1 << 20) > 0


def test_check_plan_catches_a_late_or_missing_region():
    mk = decode_step(16)
    q, buffers = mk.queue, mk.graph.buffers
    plan = prefetch.plan_prefetch(q, buffers, 1 << 16)
    positions = [list(p) for p in plan.positions]
    p = next(p for p, slots in enumerate(positions) if slots)
    moved = positions[p].pop(0)
    late = [list(s) for s in positions]
    late[-1].append(moved)  # asked for after its instruction (or by another worker's position)
    with pytest.raises(AssertionError):
        prefetch.check_plan(q, buffers, prefetch.PrefetchPlan(tuple(map(tuple, late)), plan.budget))
    with pytest.raises(AssertionError):  # missing
        prefetch.check_plan(q, buffers, prefetch.PrefetchPlan(tuple(map(tuple, positions)), plan.budget))


def test_table_resolves_addresses_and_drops_unaligned_ones():
    r = prefetch.Region(buffer=1, offset=64, stride=4096, rows=64, row_bytes=1024)
    plan = prefetch.PrefetchPlan(((), ((7, r),)), budget=0)
    table = prefetch.PrefetchTable(plan)
    assert list(table.used) == [1]
    rows = table.rows(np.array([0, 1 << 20], dtype=np.int64))
    assert rows.shape == (2, prefetch.ENTRIES, prefetch.FIELDS)
    assert rows[1, 0, 0] == (1 << 20) + 64
    shape = int(rows[1, 0, 1])
    assert (shape >> 32, (shape >> 8) & 0xFFFFFF, shape & 0xFF) == (4096, 1024, 64)
    assert not rows[0].any() and not rows[1, 1:].any()  # no entry: shape 0
    assert rows[1, 0, 1] != 0
    assert table.rows(np.array([0, (1 << 20) + 8], dtype=np.int64))[1, 0, 1] == 0  # unaligned: dropped


def test_the_runtime_builds_a_table_only_where_it_is_used():
    """A GPU-target step with a budget has a table; the default (0) and interpreted kernels none."""
    mk = decode_step(16)
    assert mk._pf_table is None  # default: off
    from examples.llama import GreedyLoop, random_llama

    model = random_llama("tiny", dtype=torch.bfloat16, max_seq_len=256)
    on = mkcompiler.compile(
        GreedyLoop(model, 1, 8),
        (),
        num_workers=16,
        interpret=False,
        schedule="static",
        prefetch_ahead_bytes=1 << 16,
        cache=False,
    )
    assert on._pf_table is not None
    assert on.pf.numel() == len(on.queue) * prefetch.ENTRIES * prefetch.FIELDS
