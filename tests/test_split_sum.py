"""Settings.split_sum_in_matmul (passes/split_sum.py): a split-K matmul's last-arriving split tile
of each output block computes the sum op (partials + bias, cast, residual add) itself, through
a ticket counter that counts on across launches. Kernel (interpreter) and reference VM against
float64 eager, with poisoned intermediates, fresh inputs and two launches in a row (the second
launch's tickets start where the first left them); VM interleavings where each split tile is
the last; the queue reordered so the kernel's last arriver is another split tile."""

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from mkcompiler.ops.registry import FAMILIES

import mkcompiler
from mkcompiler.layout import Field
from mkcompiler.vm import run_megakernel, run_queue
from tests.helpers import keep_rms_norm_whole, reference, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is not an installed package
from examples.llama import random_llama  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
VM_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # VM against kernel (see test_fuse_norm_fast)
TILE = (16, 32, 16)  # small tiles: several output blocks and real K chunks in tiny models


@pytest.fixture(autouse=True)
def keep_rms_norm(monkeypatch):
    """A norm op, as on a GPU: decomposed, the residual sums get recomputed in every reader."""
    keep_rms_norm_whole(monkeypatch)


class LinearResidual(torch.nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return x + self.proj(x)


class LinearBias(torch.nn.Module):
    def __init__(self, dim=64, out=96):
        super().__init__()
        self.proj = torch.nn.Linear(dim, out)
        with torch.no_grad():
            self.proj.bias.normal_()

    def forward(self, x):
        return self.proj(x)


class MLPResidual(torch.nn.Module):
    """x + down(silu(gate(x)) * up(x)): gate/up's sum reads both matmuls' partials (it stays an op
    of its own), down's sum takes the residual add."""

    def __init__(self, dim=64, hidden=96):
        super().__init__()
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class CatAfter(torch.nn.Module):
    """The sum is a cat piece: fold_cats makes its readers positional (the fallback)."""

    def __init__(self, dim=64):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return torch.cat((self.proj(x), x), -1) * 2.0


def compile_model(model, inputs, split, **options):
    return mkcompiler.compile(
        model, inputs, split_k=split, matmul_tile=TILE, cache=False, **{"split_sum_in_matmul": True, **options}
    )


def summed(mk) -> list:
    """The matmuls that compute their split-K sum."""
    return [op for op in mk.graph.ops if op.kind == "matmul" and "epilogue" in op.attrs]


def sum_ops(mk) -> list:
    """Elementwise ops reading a split matmul's partials (separate sums)."""
    parts = {op.outputs[0].buffer for op in mk.graph.ops if op.kind == "matmul" and "split" in op.attrs}
    return [op for op in mk.graph.ops if op.kind == "elementwise" and any(v.buffer in parts for v in op.inputs)]


def check_outputs(out, ref, tol):
    for o, r in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref)):
        assert o.shape == r.shape
        err = rel_err(o, r)
        assert err <= tol, f"relative error {err:.3g} > {tol:g}"


SMALL = {
    "linear_residual": (LinearResidual, 1),
    "linear_bias": (LinearBias, 1),
    "mlp_residual": (MLPResidual, 1),
}


@pytest.mark.parametrize("split", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SMALL))
def test_small_models_match_eager_over_two_launches(name, dtype, split):
    torch.manual_seed(split)
    cls, n_summed = SMALL[name]
    model = cls().to(dtype)
    g = torch.Generator().manual_seed(10 + split)
    x = torch.randn(1, 64, generator=g).to(dtype)
    mk = compile_model(model, (x,), split)
    assert len(summed(mk)) == n_summed
    assert all(op.attrs["split"] == split for op in summed(mk))
    for _ in range(2):  # fresh inputs each launch: stale partials or a wrong ticket would show
        x = torch.randn(1, 64, generator=g).to(dtype)
        mk.poison()
        check_outputs(mk(x), reference(model, (x,)), TOL[dtype])
        mk.poison()
        vm, _ = run_megakernel(mk, x, seed=split)
        check_outputs(vm, reference(model, (x,)), TOL[dtype])
    assert mk.generation == 2


def llama_decode(dtype, split, **options):
    model = random_llama("tiny", dtype=dtype)
    g = torch.Generator().manual_seed(1)
    for layer in model.layers:
        for c in (layer.attn.k_cache, layer.attn.v_cache):
            c.copy_(torch.randn(c.shape, generator=g))
    ref = copy.deepcopy(model).double()
    tok = torch.randint(0, model.c.vocab_size, (1, 1), generator=g)
    mk = compile_model(model, (tok, torch.tensor([5])), split, **options)
    return model, ref, mk, g


@pytest.mark.parametrize(
    "dtype,split",
    [(torch.float32, 2), (torch.float32, 4), (torch.bfloat16, 3)],
    ids=["fp32-2", "fp32-4", "bf16-3"],
)
def test_tiny_llama_decode_matches_eager_over_two_launches(dtype, split):
    model, ref, mk, g = llama_decode(dtype, split)
    # Per layer Q (with its RoPE: an "add"), K and V (RoPE and the cache append: index_put), O and
    # down (with the residual add) sum themselves, and lm_head. More splits, more inputs: with 3
    # K's RoPE no longer fits a fused scatter (passes/fuse.py; a cat op, then the append), with 4
    # Q's RoPE no longer fits one op either; those sums stay ops of their own.
    adds, indexes, scatters = {2: (6, 4, 0), 3: (6, 2, 2), 4: (4, 2, 2)}[split]
    of = sorted(op.attrs["epilogue_of"].split("_")[0] for op in summed(mk))
    assert of == ["add"] * adds + ["index"] * indexes + ["mm"]
    assert len([op for op in mk.graph.ops if op.kind == "scatter"]) == scatters
    tol = TOL[dtype] if dtype == torch.float32 else 3e-2  # logits: as tests/test_llama.py
    for pos in (5, 6):
        tok = torch.randint(0, model.c.vocab_size, (1, 1), generator=g)
        mk.poison()
        out = mk(tok, torch.tensor([pos]))
        check_outputs(out, ref(tok, torch.tensor([pos])), tol)


def test_the_sum_op_goes_only_when_the_option_is_on_and_it_fits():
    x = torch.randn(1, 64)
    on = compile_model(LinearResidual(), (x,), 2)
    off = compile_model(LinearResidual(), (x,), 2, split_sum_in_matmul=False)
    assert [op.kind for op in on.graph.ops] == ["matmul"] and not sum_ops(on)
    assert len(on.graph.ops[0].outputs) == 2  # the partials, and the sum's output
    assert [op.kind for op in off.graph.ops] == ["matmul", "elementwise"] and len(sum_ops(off)) == 1
    assert not summed(off) and "_sum" not in off.source
    # gate/up: one sum reads both matmuls' partials: left alone (down's is taken)
    mlp = compile_model(MLPResidual(), (x,), 2)
    assert [op.name for op in summed(mlp)] == ["mm_2"] and len(sum_ops(mlp)) == 1
    # a positional sum (the cat's pieces folded into its reader): left alone
    cat_model = CatAfter()
    cat = compile_model(cat_model, (x,), 2)
    assert not summed(cat) and len(sum_ops(cat)) == 1
    check_outputs(cat(x), reference(cat_model, (x,)), TOL[torch.float32])
    # no split: nothing to sum
    plain = compile_model(LinearResidual(), (x,), 1)
    assert not summed(plain) and all("split" not in op.attrs for op in plain.graph.ops)


def test_split_tiles_of_a_block_are_not_ordered_and_share_a_ticket():
    mk = compile_model(LinearBias(), (torch.randn(1, 64),), 3)
    dag, q = mk.dag, mk.queue
    tiles = [t for t in dag.nodes if dag.nodes[t]["op"] == 0]
    assert len(tiles) == 3 * 3  # N = 96 / BN = 32 blocks x 3 splits
    tickets = dag.graph["tickets"]
    by_block = {}
    for t in tiles:
        by_block.setdefault(dag.nodes[t]["coords"][:2], []).append(t)
    assert len({tickets[t] for t in tiles}) == 3
    for block in by_block.values():
        assert len({tickets[t] for t in block}) == 1
        assert not any(dag.has_edge(u, v) for u in block for v in block)
    first_ticket = len(dag.graph["counter_sizes"])
    assert sorted(set(tickets.values())) == list(range(first_ticket, first_ticket + 3))
    assert q.num_counters == first_ticket + 3
    # Each consumer tile waits for whole blocks: all S split tiles of every block it reads.
    two = compile_model(TwoLinear(), (torch.randn(1, 64),), 3)
    dag = two.dag
    assert [op.kind for op in two.graph.ops] == ["matmul", "matmul", "elementwise"]
    assert "epilogue" in two.graph.ops[0].attrs and "epilogue" not in two.graph.ops[1].attrs  # 2nd: a cat
    blocks = {}
    for t in dag.nodes:
        if dag.nodes[t]["op"] == 0:
            blocks.setdefault(dag.nodes[t]["coords"][:2], set()).add(t)
    waited = [{p for p in dag.predecessors(t) if dag.nodes[p]["op"] == 0} for t in dag.nodes if dag.nodes[t]["op"] == 1]
    assert sum(bool(preds) for preds in waited) >= 2  # (a tile of an empty K chunk reads no y)
    assert all(b <= preds or not (b & preds) for preds in waited for b in blocks.values())


class TwoLinear(torch.nn.Module):
    """y = x + p1(x) read by p2 (its K chunks read some of y's blocks); p2's sum goes into a cat."""

    def __init__(self, dim=64):
        super().__init__()
        self.p1 = torch.nn.Linear(dim, dim, bias=False)
        self.p2 = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        y = x + self.p1(x)
        return torch.cat((self.p2(y), y), -1) * 2.0


def _split_of(queue, dag, i, op_index):
    if i is None:
        return None
    node = dag.nodes[int(queue.rows[i, Field.TASK])]
    return node["coords"][2] if node["op"] == op_index else None


def run_vm_with_last(mk, x, op_index, last):
    """Run mk's queue in the VM (inputs x: a tensor or a tuple) where a worker holding a split tile `last` of op_index moves only
    when no other worker can: in each block that tile runs after the other splits. Returns the
    (op, coords) of the tiles in execution order."""
    q, dag = mk.queue, mk.dag
    mk.poison()
    mk._bind(x if isinstance(x, tuple) else (x,), {})
    order, held = [], {}  # held: worker -> the instruction it holds

    def execute(i):
        node = dag.nodes[int(q.rows[i, Field.TASK])]
        op = mk.graph.ops[node["op"]]
        order.append((node["op"], node["coords"]))
        FAMILIES[op.kind].reference(op, node["coords"], mk.tensor_of)

    def observe(event, i, w):
        if event == "fetch":
            held[w] = i
        elif event == "end":
            held.pop(w, None)

    def choose(moves):
        delayed = [w for w in moves if _split_of(q, dag, held.get(w), op_index) == last]
        rest = [w for w in moves if w not in delayed]
        return rest[0] if rest else delayed[0]

    run_queue(q, execute, dynamic=True, choose=choose, observe=observe)
    return order


@pytest.mark.parametrize("split", [2, 3])
def test_vm_result_does_not_depend_on_which_split_tile_is_last(split):
    """Each split tile of every block in turn runs last (the others first): the same outputs. A
    reference that let a fixed tile (e.g. the one with the last K chunk) write the sum would
    read missing partials (poisoned: NaN) in the other orders."""
    torch.manual_seed(0)
    model = MLPResidual()
    x = torch.randn(1, 64)
    mk = compile_model(model, (x,), split, schedule="dynamic")
    down = next(i for i, op in enumerate(mk.graph.ops) if "epilogue" in op.attrs)
    want = reference(model, (x,))
    for last in range(split):
        done = [c for o, c in run_vm_with_last(mk, x, down, last) if o == down]
        for block in {c[:2] for c in done}:
            assert [c[2] for c in done if c[:2] == block][-1] == last  # the order asked for
        check_outputs(mk.outputs(), want, TOL[torch.float32])
    for seed in range(4):  # and random interleavings
        mk.poison()
        vm, _ = run_megakernel(mk, x, seed=seed)
        check_outputs(vm, want, TOL[torch.float32])


def reorder_splits(mk, op_index):
    """Reverse, in the queue, the order of each block's split tiles of op_index (the interpreter
    runs the queue in order: the last arriver becomes the tile with the first K chunk)."""
    q, dag = mk.queue, mk.dag
    rows = {i: dag.nodes[int(q.rows[i, Field.TASK])] for i in range(len(q))}
    perm = list(range(len(q)))
    blocks: dict[tuple, list[int]] = {}
    for i, node in rows.items():
        if node["op"] == op_index:
            blocks.setdefault(node["coords"][:2], []).append(i)
    for positions in blocks.values():
        ordered = sorted(positions, key=lambda i: rows[i]["coords"][2])
        for p, i in zip(sorted(positions), reversed(ordered)):
            perm[p] = i
    inv = [0] * len(q)
    for new, old in enumerate(perm):
        inv[old] = new
    q.rows = q.rows[perm]
    q.descs = [q.descs[i] for i in perm]
    q.worker_order = np.array([inv[i] for i in q.worker_order.tolist()], dtype=q.worker_order.dtype)
    mk.upload_queue(check=True)  # still a valid queue: a block's split tiles have no edge between them
    new = {}  # per block, its split tiles in queue order now
    for i in perm:
        if rows[i]["op"] == op_index:
            new.setdefault(rows[i]["coords"][:2], []).append(rows[i]["coords"][2])
    return list(new.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_last_arriver_is_whichever_tile_comes_last(dtype):
    """The interpreter runs the queue in order; with each block's split tiles reversed, the tile
    holding the last K chunk arrives first. A kernel that let a fixed split write the sum, or
    compared its ticket wrongly, would read stale partials of the previous launch (fresh inputs
    each launch) or poisoned ones (NaN)."""
    torch.manual_seed(1)
    model = MLPResidual().to(dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, generator=g).to(dtype)
    mk = compile_model(model, (x,), 3, schedule="dynamic")
    down = next(i for i, op in enumerate(mk.graph.ops) if "epilogue" in op.attrs)
    assert all(order == [2, 1, 0] for order in reorder_splits(mk, down))
    for _ in range(3):
        x = torch.randn(1, 64, generator=g).to(dtype)
        mk.poison()
        got = mk(x)
        check_outputs(got, reference(model, (x,)), TOL[dtype])
        mk.poison()
        vm, _ = run_megakernel(mk, x, seed=0)
        check_outputs(vm, got, VM_TOL[dtype])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the thread-per-program interpreter")
def test_concurrent_split_tiles_under_a_static_schedule():
    """Programs really run at once (mkcompiler/threaded_interp.py): a block's split tiles on
    different workers race for the ticket; two launches."""
    from mkcompiler import threaded_interp
    from tests.test_threaded_interp import guarded

    torch.manual_seed(2)
    model = MLPResidual()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 64, generator=g)
    with threaded_interp.threaded():
        mk = compile_model(model, (x,), 3, schedule="static", num_workers=3)
        assert summed(mk)
        for _ in range(2):
            x = torch.randn(1, 64, generator=g)
            mk.poison()
            check_outputs(guarded(lambda x=x: mk(x)), reference(model, (x,)), TOL[torch.float32])
