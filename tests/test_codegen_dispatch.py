"""codegen.generate's dispatch (issue 18): tiles without warpgroup MMAs are called through one
noinline function, run_tile, so that no opcode's thread-index arithmetic is hoisted out of the
dispatch loop and held across the others' tiles; tiles whose dots may be warpgroup MMAs (64 rows
or more) stay in the loop, where ptxas keeps their wgmma pipeline (it serializes a called
function's). Both paths must run as eager does."""

import inspect
import re
import sys

import pytest
import torch
from helpers import compile_and_check
from mkcompiler.ops.registry import FAMILIES
from models import TransformerMLP

from mkcompiler.backends.triton.codegen import DOT_ROWS, warpgroup_mma


def split_source(source: str) -> tuple[str, str]:
    """(run_tile's source, the megakernel's) of a generated kernel ('' where there is no run_tile)."""
    kernel = source[source.index("def megakernel(") :]
    if "def run_tile(" not in source:
        return "", kernel
    return source[source.index("def run_tile(") : source.index("def megakernel(")], kernel


def branches(source: str) -> set[int]:
    """The opcodes that have an `if/elif op == N:` branch in this source."""
    return {int(n) for n in re.findall(r"\bop == (\d+):", source)}


def test_decode_tiles_are_called_through_run_tile_and_match_eager():
    torch.manual_seed(0)
    model = TransformerMLP(dim=64, hidden=128)
    x = torch.randn(1, 64)
    mk, _ = compile_and_check(model, (x,), torch.float32, cache=False)
    keys = mk.queue.opcode_keys
    assert any(k[0] == "matmul" for k in keys) and not any(map(warpgroup_mma, keys))
    tiles, kernel = split_source(mk.source)
    assert branches(tiles) == set(range(len(keys))) and not branches(kernel)
    assert "run_tile(op, pre, addrs_ptr, views_ptr" in kernel and "matmul_tile(" not in kernel


def test_wgmma_sized_tiles_stay_in_the_loop_and_match_eager():
    torch.manual_seed(1)
    model = TransformerMLP(dim=64, hidden=128)
    x = torch.randn(128, 64)  # prefill rows: matmul tiles of 64 rows or more
    mk, _ = compile_and_check(model, (x,), torch.float32, cache=False)
    keys = mk.queue.opcode_keys
    wide = {i for i, k in enumerate(keys) if warpgroup_mma(k)}
    assert wide and len(wide) < len(keys), keys  # both kinds of tile in one kernel
    tiles, kernel = split_source(mk.source)
    assert branches(kernel) == wide and branches(tiles) == set(range(len(keys))) - wide
    assert "            else:\n                run_tile(" in kernel


def routine_sources(fam) -> list[str]:
    """Sources of a family's tile routines and of the @triton.jit functions of its module they
    call, transitively."""
    module = sys.modules[type(fam).__module__]
    jit = {name: f for name, f in vars(module).items() if hasattr(f, "fn") and inspect.isfunction(f.fn)}
    todo, seen = list(fam.routines), set()
    while todo:
        name = todo.pop()
        if name in seen or name not in jit:
            continue
        seen.add(name)
        src = inspect.getsource(jit[name].fn)
        todo += [n for n in jit if re.search(rf"\b{n}\(", src)]
    return [inspect.getsource(jit[n].fn) for n in seen]


def test_every_family_with_a_dot_says_how_many_rows_its_dots_have():
    """A family left out of DOT_ROWS would have its tiles called through run_tile whatever their
    size: on sm_90 a 64-row dot there is a serialized wgmma."""
    import mkcompiler.ops.comm  # noqa: F401  (registers the collective families)

    with_dots = {kind for kind, fam in FAMILIES.items() if any("tl.dot(" in s for s in routine_sources(fam))}
    assert with_dots == set(DOT_ROWS), (with_dots, set(DOT_ROWS))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 128], ids=["decode", "prefill"])
@pytest.mark.parametrize("schedule", ["dynamic", "static"])
def test_both_dispatch_paths_match_eager_on_the_gpu(rows, schedule):
    """run_tile is a real call on the GPU (shared memory, pipelined K loops and barriers inside
    it); with 128 rows the wgmma tiles run in the loop beside it."""
    torch.manual_seed(2)
    model = TransformerMLP(dim=256, hidden=1024).to("cuda", torch.bfloat16)
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    mk, _ = compile_and_check(model, (x,), torch.bfloat16, schedule=schedule, cache=False)
    keys = mk.queue.opcode_keys
    assert any(map(warpgroup_mma, keys)) == (rows == 128) and "def run_tile(" in mk.source
