"""The tensor-parallel kernel on the CPU (mkcompiler/tp/runtime.py, kernel_tp.py, codegen_tp.py,
ops/comm.py's tile routines): every rank's generated kernel runs in the Triton interpreter in
one process, all ranks' programs at once (one thread each), reading each other's memory through
the rank tables as GPUs read their peers' symmetric memory.

Sharded models equal eager and the reference VM over several launches (counters carried
across launches and ranks); a peer that never runs, a peer that stopped, and a peer that never
finished its previous launch are reported (naming rank and counter) instead of hanging; single
GPU kernels are unchanged; and the kernels the GPU test (tests/test_tp_gpu.py) runs compile for
sm_90 without spilling.
"""

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mkcompiler
from mkcompiler.backends.triton import codegen_tp
from mkcompiler.backends.triton.codegen import generate
from mkcompiler.ir.graph import BufferKind
from mkcompiler.ir.layout import ErrorField
from mkcompiler.tools.offline import compile_sm90, format_report
from mkcompiler.tp import plan as tp
from mkcompiler.tp.runtime import LocalWorld, World, compile_world
from tests.models import TransformerMLP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is not an installed package
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_tp import Chain, GatherBlock, HeadBlock, MLPBlock  # noqa: E402
from test_tp_gpu import CONFIG as GPU_CONFIG  # noqa: E402
from test_tp_gpu import PROMPT as GPU_PROMPT  # noqa: E402

from examples.llama import random_llama  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the ranks' kernels in the Triton interpreter (CPU)"
)
TOL = 1e-5
SPIN = 200_000  # interpreted polls before a wait gives up (threads share one core's GIL)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- the generated source ----


def test_single_gpu_kernels_are_unchanged_and_tp_kernels_get_the_rank_protocol():
    torch.manual_seed(0)
    model = TransformerMLP(dim=32, hidden=64)
    mk = mkcompiler.compile(model, (torch.randn(2, 32),), cache=False)
    assert not codegen_tp.is_tensor_parallel(mk.queue)
    assert "tp_ptr" not in mk.source and "kernel_tp" not in mk.source
    world = compile_world(tp.shard_ranks(model, 2), (torch.randn(2, 32),), each_rank=False)
    src = world.source
    assert codegen_tp.is_tensor_parallel(world.queue) and world.queue.has_remote_waits()
    for name in ("launch_barrier(tp_ptr", "wait_all_tp(tp_ptr", "signal_tp(pre", "worker_exit(", "all_reduce_tile("):
        assert src.count(name) == 1, name
    assert "prof_ptr, tp_ptr," in src and "= wait_all(" not in src and "signal(pre, counters_ptr)" not in src


# ---- sharded models run by the kernel ----


def test_sharded_llama_kernel_equals_eager_and_the_vm():
    """TP = 2 (kv heads split): a prefill and two decode steps, every rank's kernel at once; the
    ranks' logits are the same bits, equal to eager's and to the reference VM's; counters and
    EXIT counters advance by one launch's worth each time."""
    model = random_llama("tiny", max_seq_len=32)
    shards = tp.shard_ranks(model, 2)
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(1))
    opts = dict(each_rank=False, num_workers=3, max_spin=SPIN)
    prefill = compile_world(shards, (prompt, torch.arange(5)), **opts)
    decode = compile_world(shards, (prompt[:, :1], torch.tensor([5])), **opts)
    vm = tp.compile_tp(shards, (prompt[:, :1], torch.tensor([5])), each_rank=False, num_workers=3)
    token, pos = prompt, torch.arange(5)
    for step in range(3):
        with torch.no_grad():
            ref = model(token, pos)
        mk = prefill if step == 0 else decode
        mk.poison()
        outs = mk.run(token, pos)
        assert all(torch.equal(outs[0], o) for o in outs[1:]), "ranks disagree"
        assert rel(outs[0], ref) <= TOL, (step, rel(outs[0], ref))
        if step > 0:  # the VM rewrites the same cache slots with the same values
            assert rel(outs[0], vm(token, pos)) <= 1e-6
        token, pos = ref[:, -1].argmax(-1, keepdim=True), torch.tensor([5 + step])
    sizes = np.array(decode.ranks[0].dag.counter_sizes)
    for mk in decode.ranks:
        counters = mk.counters.numpy()
        assert (counters[: len(sizes)] == sizes * 2).all() and counters[-1] == mk.num_workers * 2
        assert mk.generation == 2


@pytest.mark.parametrize("world", [2])  # TP = 4: tests/test_tp.py (the VM)
def test_post_attention_exchange_kernels_equal_eager_and_the_vm(world):
    """tp.ExchangeParallel: each rank's all_to_all tiles read its own row block of its peers'
    attention output (the rank known at run time), the O projection runs on its rows with the
    whole weight, the rows are gathered: every rank's kernel at once, poisoned first, equals
    eager and the VM (which gives each tile its rank)."""
    model = random_llama("tiny", max_seq_len=32)
    shards = tp.shard_ranks(model, world, tp.default_plan(model, exchange=True))
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    inputs = (prompt, torch.arange(8))
    mk = compile_world(shards, inputs, each_rank=False, num_workers=3, max_spin=SPIN)
    assert sum("all_to_all" in d for d in mk.queue.descs) > 0
    with torch.no_grad():
        ref = model(*inputs)
    mk.poison()
    outs = mk.run(*inputs)
    assert all(torch.equal(outs[0], o) for o in outs[1:]), "ranks disagree"
    assert rel(outs[0], ref) <= TOL
    vm = tp.compile_tp(shards, inputs, each_rank=False, num_workers=3)
    assert rel(outs[0], vm(*inputs)) <= 1e-6


def test_gathers_and_reduces_over_four_ranks_with_static_schedules():
    """All-reduce (row-wise), all-gather of a sharded input and of a vocab-parallel output,
    over 4 ranks, static per-worker lists; two launches."""
    torch.manual_seed(3)
    model = Chain(
        [MLPBlock(16, 32, gated=True, bias=True, act="silu"), GatherBlock(16, 32, bias=False), HeadBlock(16, True)]
    )
    x = torch.randn(3, 16)
    world = compile_world(
        tp.shard_ranks(model, 4, model.plan()),
        (x,),
        each_rank=False,
        num_workers=2,
        schedule="static",
        max_spin=SPIN,
        elementwise_block=16,
    )
    kinds = {name.split("#")[0] for name in world.queue.opcode_names}
    assert {"all_reduce", "all_gather"} <= kinds
    for seed in range(2):
        x = torch.randn(3, 16, generator=torch.Generator().manual_seed(seed))
        world.poison()
        outs = world.run(x)
        assert all(torch.equal(outs[0], o) for o in outs[1:])
        with torch.no_grad():
            assert rel(outs[0], model(x)) <= TOL


def state(mk) -> set[int]:
    """Addresses of the megakernel's model state (KV caches)."""
    return {t.data_ptr() for b, t in mk.graph.params.items() if mk.graph.buffers[b].kind == BufferKind.STATE}


def test_compile_with_tensor_parallel_in_one_process():
    """mkcompiler.compile(..., tensor_parallel=2) with a LocalWorld rank as the group: the path
    a torchrun process takes, symmetric memory aside. The two compiles of a rank share its
    shard (its KV caches), so decode continues the prefill."""
    model = random_llama("tiny", max_seq_len=32)
    local = LocalWorld(2)
    prompt = torch.tensor([[7, 3, 9]])

    def compile_ranks(inputs):
        return World(
            [
                mkcompiler.compile(
                    model, inputs, tensor_parallel=2, tp_group=local.rank(r), num_workers=2, max_spin=SPIN
                )
                for r in range(2)
            ]
        )

    prefill = compile_ranks((prompt, torch.arange(3)))
    decode = compile_ranks((prompt[:, :1], torch.tensor([3])))
    for r in range(2):
        assert state(prefill.ranks[r]) and state(prefill.ranks[r]) == state(decode.ranks[r])
    assert not state(prefill.ranks[0]) & state(prefill.ranks[1])  # each rank's own
    with torch.no_grad():
        ref = model(prompt, torch.arange(3))
    assert rel(prefill(prompt, torch.arange(3)), ref) <= TOL
    token = ref[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        ref = model(token, torch.tensor([3]))
    assert rel(decode(token, torch.tensor([3])), ref) <= TOL  # reads the prefill's cache entries


# ---- failures are reported, not hung ----


class UpDown(nn.Module):
    """up (column-wise) -> relu -> down (row-wise): the all-reduce's output is the model's, so a
    rank's only cross-rank waits are its all-reduce tiles'."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32, bias=False)
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def reduce_world(max_spin=SPIN):
    torch.manual_seed(0)
    model, x = UpDown(), torch.randn(2, 16)
    plan = {"up": tp.ColwiseParallel(), "down": tp.RowwiseParallel()}
    world = compile_world(
        tp.shard_ranks(model, 2, plan), (x,), each_rank=False, num_workers=2, schedule="static", max_spin=max_spin
    )
    return model, x, world


def idle(mk) -> None:
    """The rank's workers run nothing (empty worker lists)."""
    mk.worker_begin = torch.zeros_like(mk.worker_begin)


def test_a_peer_that_never_runs_is_a_stuck_wait_naming_its_rank_and_counter():
    model, x, world = reduce_world(max_spin=300)
    q = world.queue
    i = next(i for i in range(len(q)) if q.opcode_name(i).startswith("all_reduce"))
    (c, n, _), *_ = [w for w in q.remote_waits_of(i) if w[2] == 1]
    idle(world.ranks[1])
    with pytest.raises(mkcompiler.MegakernelError) as info:
        world.run(x)
    story = str(info.value)
    assert re.search(
        rf"rank 0 of 2: instruction \d+ \(all_reduce.*waited for rank 1's counter {c} to reach {n} but it was 0 "
        r"\(launch 1\); it gave up after 300 polls",
        story,
    ), story
    with pytest.raises(mkcompiler.MegakernelError, match="refused: an earlier launch failed"):
        world.run(x)


def test_a_stopped_peer_stops_its_waiters():
    _, x, world = reduce_world()
    idle(world.ranks[1])
    world.ranks[1].err[ErrorField.FLAG] = 1  # rank 1 has given up (before rank 0's bound)
    with pytest.raises(mkcompiler.MegakernelError) as info:
        world.run(x)
    assert re.search(
        r"rank 0 of 2: .*waited for rank 1's counter .* it stopped: rank 1 had stopped first", str(info.value)
    )


def test_a_launch_waits_for_its_peers_to_finish_the_previous_one():
    """Rank 1 seen as still inside launch 1 (its EXIT counter back to 0): launch 2 gives up at a
    barrier. Rank 1's own barrier waits on that counter too and gives up; its workers, leaving,
    raise it, so rank 0's barrier may either give up first or pass and then stop at a wait on
    rank 1 (reporting that rank 1 stopped first). Either way the story names the barrier."""
    model, x, world = reduce_world()
    with torch.no_grad():
        assert rel(world(x), model(x)) <= TOL
    world.ranks[1].counters[-1] = 0
    for mk in world.ranks:
        mk.max_spin = 300
    with pytest.raises(mkcompiler.MegakernelError) as info:
        world.run(x)
    story = str(info.value)
    assert re.search(
        r"rank [01] of 2: the launch barrier of launch 2 on worker \d: rank 1's workers had not all finished launch 1 "
        r"\(exit counter 0 < 2\)",
        story,
    ), story
    assert world.ranks[1].err[ErrorField.FLAG].item() != 0  # rank 1 did not finish either


# ---- what the GPU runs compiles for sm_90 ----


def gpu_rank_sources() -> dict[str, str]:
    """GPU-style (bf16 tensor-core dots, 132 workers) sources of the TP ranks tests/test_tp_gpu.py
    runs: TP = 2 prefill (also with the post-attention exchange) and TP = 4 decode."""
    model = random_llama(GPU_CONFIG, dtype=torch.bfloat16)
    sources = {}
    for world, n, exchange in ((2, GPU_PROMPT, False), (4, 1, False), (2, GPU_PROMPT, True)):
        pos = torch.arange(n) if n > 1 else torch.tensor([GPU_PROMPT])
        c = tp.compile_tp(
            tp.shard_ranks(model, world, tp.default_plan(model, exchange)),
            (torch.zeros(1, n, dtype=torch.long), pos),
            each_rank=False,
            num_workers=132,
            interpret=False,
        )
        name = f"TP={world} {'prefill' if n > 1 else 'decode'}{' exchange' if exchange else ''}"
        sources[name] = generate(c.queue)
    assert re.search(r"all_gather_tile\([^\n]*, True\)", sources["TP=2 prefill exchange"])  # OWN_ROWS: all_to_all
    return sources


def test_tp_rank_kernels_compile_for_sm90_without_spills():
    sources = gpu_rank_sources()
    for s in sources.values():
        assert "tl.bfloat16, 'tf32'" in s and "launch_barrier(tp_ptr" in s
    with ThreadPoolExecutor(3) as pool:  # the static schedule (the GPU's default)
        reports = dict(zip(sources, pool.map(lambda s: compile_sm90(s, dynamic=False), sources.values())))
    summary = "\n".join(f"{k}: {format_report(r)}" for k, r in reports.items())
    print("\n" + summary)
    for r in reports.values():
        assert r["regs"] > 0 and r["spilled_bytes"] == 0 and r["local"] == 0, summary
