"""Queue order of large-M matmul tiles (Settings.matmul_group_rows): groups of tile rows,
column by column, so that the tiles running together share operands in L2."""

import torch
from helpers import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from mkcompiler.ops.matmul import MatmulAttrs
from mkcompiler.ops.registry import FAMILIES
from torch import nn

import mkcompiler
from mkcompiler.ir.graph import Buffer, BufferKind, OpNode, View


def matmul_node(m: int, n: int, tile, group_rows: int, splits: int):
    """A matmul node of an [m, n] output ([splits, m, n] when split along K)."""
    buf = Buffer(0, "c", m * n * splits, torch.float32, BufferKind.ACT)
    c = View.full(buf, (splits, m, n) if splits > 1 else (m, n))
    return OpNode("matmul", (), (c,), MatmulAttrs(tile=tile, group_rows=group_rows), name="mm")


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 12), group=st.integers(1, 9), splits=st.integers(1, 3))
def test_tiles_are_every_block_once_in_groups_of_rows(rows, cols, group, splits):
    tiles = FAMILIES["matmul"].tiles(matmul_node(rows * 16 - 3, cols * 32 - 1, (16, 32, 16), group, splits))
    assert sorted(tiles) == sorted((i, j, s) for s in range(splits) for i in range(rows) for j in range(cols))
    per_split = len(tiles) // splits
    assert all(t[2] == k // per_split for k, t in enumerate(tiles))  # split by split
    for k, (i, j, _) in enumerate(tiles[:per_split]):
        before = tiles[:k]
        # every block of an earlier group comes first; within a group, column by column
        assert all((b[0] // group, b[1]) <= (i // group, j) for b in before)
        assert all(b[0] < i for b in before if (b[0] // group, b[1]) == (i // group, j))


def test_grouped_order_reaches_the_queue_and_keeps_results():
    """A prefill-shaped Linear (rows not a multiple of the group): the queue starts with column
    0's first group of rows; results equal eager's whatever the grouping."""
    torch.manual_seed(0)
    model = nn.Linear(48, 256, bias=True)
    x = torch.randn(150, 48)
    for group in (1, 3):
        mk = mkcompiler.compile(
            model, (x,), num_workers=4, matmul_tile=(16, 64, 16), matmul_group_rows=group, cache=False
        )
        first = [mk.queue.descs[i] for i in range(3)]
        want = ["mm[m0:+16, n0:+64]", "mm[m0:+16, n64:+64]", "mm[m0:+16, n128:+64]"]
        if group == 3:
            want = ["mm[m0:+16, n0:+64]", "mm[m16:+16, n0:+64]", "mm[m32:+16, n0:+64]"]
        assert [d.split(" ")[-1] for d in first] == [w.split(" ")[-1] for w in want], first
        x = torch.randn(150, 48)
        mk.poison()
        assert rel_err(mk(x), model(x)) <= 1e-5
