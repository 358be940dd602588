"""Tensor parallelism on the CPU (mkcompiler/tp/plan.py, ops/comm.py, passes/ranks.py, vm.run_ranks):
every rank's program runs in the reference VM, all ranks interleaved.

Sharded Llamas (TP = 2, 4 and 8; with kv heads split or replicated) equal the unsharded model
through a prefill and decode steps under several interleavings; shards hold views of the
weights; random sharded DAGs and random sharded modules never deadlock across ranks, every
awaited counter is raised, and results equal the unsharded model; a lost cross-rank signal is
a deadlock naming the rank and counter, and without cross-rank waits a rank reads its peer's
unwritten partial sums.
"""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dag_utils import counted, dags, queue_from_dag
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mkcompiler.ops.comm import all_to_all
from mkcompiler.passes.schedule import list_schedule
from mkcompiler.passes.verify import check_queue
from torch import nn

import mkcompiler
from mkcompiler.ir.layout import LOCAL, Field, WaitField
from mkcompiler.tp import plan as tp
from mkcompiler.vm import VMDeadlock, run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is not an installed package
from examples.llama import LlamaConfig, random_llama  # noqa: E402

# 8 query heads, 2 kv heads: TP = 2 splits the kv heads, TP = 4 and 8 replicate them.
TP8 = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, hidden=128, max_seq_len=32)
TOL = 1e-5


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- plans and shards ----


def test_default_plan_of_a_llama():
    plan = tp.default_plan(random_llama("tiny"))
    kinds = {k: (type(v).__name__, type(v.output_layouts[0]).__name__) for k, v in plan.items()}
    for i in range(2):
        for name in ("attn.wq", "attn.wk", "attn.wv", "mlp.gate", "mlp.up"):
            assert kinds[f"layers.{i}.{name}"] == ("ColwiseParallel", "Shard")
        for name in ("attn.wo", "mlp.down"):
            assert kinds[f"layers.{i}.{name}"] == ("RowwiseParallel", "Replicate")
    assert kinds["lm_head"] == ("ColwiseParallel", "Replicate")  # vocab-wise, then all-gathered
    assert len(plan) == 15


@pytest.mark.parametrize("world", [2, 4])
def test_shards_hold_views_of_the_weights(world):
    model = random_llama("tiny")  # 4 heads, 2 kv heads: TP = 4 replicates each kv head on 2 ranks
    params = dict(model.named_parameters())
    shards = tp.shard_ranks(model, world)
    for rank, shard in enumerate(shards):
        for name, p in shard.named_parameters():
            owner = tp.storage_owner(p, model)
            assert owner == name, (rank, name, owner)  # a slice of the same parameter: no copy
            if p.shape == params[name].shape:
                assert p.data_ptr() == params[name].data_ptr()  # replicated: the very same tensor
        attn = shard.layers[0].attn
        assert attn.c.n_heads == 4 // world and attn.c.head_dim == 16
        assert attn.k_cache.shape == (1, max(2 // world, 1), 64, 16)  # the rank's own kv heads
        assert tp.storage_owner(attn.k_cache, model) is None  # state of its own, not the model's
    wq = [s.layers[0].attn.wq.weight for s in shards]
    assert [w.data_ptr() - wq[0].data_ptr() for w in wq] == [r * 64 * 64 // world * 4 for r in range(world)]
    if world == 4:  # kv head r // 2 on rank r
        wk = [s.layers[0].attn.wk.weight.data_ptr() for s in shards]
        assert wk[0] == wk[1] != wk[2] == wk[3]


def test_plans_in_pytorch_vocabulary_with_patterns():
    model = random_llama("tiny")
    plan = {
        "layers.*.mlp.up": tp.ColwiseParallel(),
        "layers.*.mlp.gate": tp.ColwiseParallel(),
        "layers.*.mlp.down": tp.RowwiseParallel(),
    }
    shard = tp.shard_model(model, 1, 2, plan)
    assert isinstance(shard.layers[1].mlp.down, tp.RowwiseLinear)
    assert shard.layers[0].attn.wq.weight is model.layers[0].attn.wq.weight  # not in the plan: shared
    with pytest.raises(ValueError, match="attention module is sharded as a whole"):
        tp.shard_model(model, 0, 2, {"layers.0.attn.wq": tp.ColwiseParallel()})
    heads_gathered = {f"layers.0.attn.{n}": tp.ColwiseParallel() for n in ("wk", "wv")}
    heads_gathered["layers.0.attn.wq"] = tp.ColwiseParallel(output_layouts=tp.Replicate())
    heads_gathered["layers.0.attn.wo"] = tp.RowwiseParallel()
    with pytest.raises(ValueError, match="attention module is sharded as a whole"):
        tp.shard_model(model, 0, 2, heads_gathered)
    with pytest.raises(NotImplementedError, match="only a sharded input"):
        tp.shard_model(model, 0, 2, {"layers.0.mlp.down": tp.RowwiseParallel(input_layouts=tp.Replicate())})
    with pytest.raises(NotImplementedError, match="reduce-scatter"):
        tp.shard_model(model, 0, 2, {"layers.0.mlp.down": tp.RowwiseParallel(output_layouts=tp.Shard(0))})
    with pytest.raises(KeyError, match="names no module"):
        tp.shard_model(model, 0, 2, {"layers.9.mlp.down": tp.RowwiseParallel()})
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        tp.shard_model(model, 0, 3)


def test_communication_ops_refuse_to_run_eagerly_without_a_process_group():
    shard = tp.shard_model(random_llama("tiny"), 0, 2)
    with pytest.raises(RuntimeError, match="without a torch.distributed process group"):
        shard(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="all_to_all ran eagerly without"):
        all_to_all(torch.zeros(4, 3), 2)


def test_kernel_compiles_of_tensor_parallel_graphs_fail_clearly():
    """tensor_parallel=N needs a torch.distributed group (torchrun); a shard alone is refused
    (its kernel reads peers' memory: tests/test_tp_kernel.py runs every rank together)."""
    model = random_llama("tiny")
    inputs = (torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        mkcompiler.compile(model, inputs, tensor_parallel=2)
    with pytest.raises(ValueError, match="need tensor_parallel"):
        mkcompiler.compile(model, inputs, tp_plan={})
    with pytest.raises(NotImplementedError, match="tensor-parallel communication ops"):
        mkcompiler.compile(tp.shard_model(model, 0, 2), inputs, cache=False, num_workers=2)


# ---- sharded Llamas through the VM ----


@pytest.mark.parametrize(
    "config, world, each_rank",
    [("tiny", 2, True), ("tiny", 4, False), (TP8, 8, False)],
    ids=["tiny-tp2", "tiny-tp4-kv-replicated", "h8kv2-tp8-kv-replicated"],
)
def test_sharded_llama_equals_the_unsharded_model(config, world, each_rank):
    """Prefill and two decode steps (each rank updating the KV cache of its kv heads), each
    under several interleavings: every rank's logits are the same bits, equal to eager's.
    each_rank: every rank captures and compiles its own shard (their queues must be identical);
    otherwise (and always for decode, to keep the test fast) rank 0's program is bound to the
    other ranks' tensors."""
    model = random_llama(config, max_seq_len=32)
    shards = tp.shard_ranks(model, world)
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(1))
    prefill = tp.compile_tp(shards, (prompt, torch.arange(5)), each_rank=each_rank)
    decode = tp.compile_tp(shards, (prompt[:, :1], torch.tensor([5])), each_rank=False)
    assert prefill.queue.has_remote_waits()
    token, pos = prompt, torch.arange(5)
    for step in range(3):
        with torch.no_grad():
            ref = model(token, pos)
        mk = prefill if step == 0 else decode
        first = None
        for seed in range(3):  # a rerun rewrites the same cache slots with the same values
            outs, res = mk.run(token, pos, seed=100 * step + seed)
            assert len(res.executed) == world * len(mk.queue)
            assert all(tp.outputs_equal(outs[0], o) for o in outs[1:]), "ranks disagree"
            assert first is None or tp.outputs_equal(first, outs[0]), "interleavings disagree"
            first = outs[0]
        assert rel(first, ref) <= TOL, (step, rel(first, ref))
        token, pos = ref[:, -1].argmax(-1, keepdim=True), torch.tensor([5 + step])
    sizes = np.array(decode.compilations[0].dag.counter_sizes)
    assert all((c[: len(sizes)] == sizes * decode.generation).all() for c in decode.counters)


@pytest.mark.parametrize("world", [2, 4])
def test_post_attention_exchange_equals_the_unsharded_model(world):
    """default_plan(exchange=True): attention outputs take ExchangeParallel (rows exchanged, the
    whole O weight on each rank's rows: a view of the model's, never a copy), the MLP stays
    row-wise. A prefill of 8 rows exchanges; a decode of 1 row (not divisible) falls back to
    row-wise. Both equal the unsharded model under several interleavings."""
    model = random_llama("tiny", max_seq_len=32)
    plan = tp.default_plan(model, exchange=True)
    assert isinstance(plan["layers.0.attn.wo"], tp.ExchangeParallel)
    assert isinstance(plan["layers.0.mlp.down"], tp.RowwiseParallel)
    shards = tp.shard_ranks(model, world, plan)
    wo = shards[1].layers[0].attn.wo
    assert wo.weight.data_ptr() == model.layers[0].attn.wo.weight.data_ptr()
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    for inputs, exchanged in (((prompt, torch.arange(8)), True), ((prompt[:, :1], torch.tensor([8])), False)):
        mk = tp.compile_tp(shards, inputs, each_rank=exchanged)
        kinds = [op.kind for op in mk.compilations[0].graph.ops]
        assert (kinds.count("all_to_all") == 2) == exchanged, kinds
        with torch.no_grad():
            ref = model(*inputs)
        for seed in range(2):
            outs, _ = mk.run(*inputs, seed=seed)
            assert all(tp.outputs_equal(outs[0], o) for o in outs[1:]), "ranks disagree"
            assert rel(outs[0], ref) <= TOL


def test_sharded_hugging_face_model_with_biases_and_tied_head():
    """Qwen2 (q/k/v biases, lm_head tied to the embedding) over 4 ranks (kv heads replicated):
    the HF adapter gives each shard a config with its head counts, so StaticCacheLM builds the
    rank's own cache; prefill and a decode step equal the unsharded model."""
    pytest.importorskip("transformers")
    from mkcompiler.frontend.hf import StaticCacheLM, random_model

    model = random_model("qwen2", tie_word_embeddings=True)
    shards = tp.shard_ranks(model, 4)
    assert shards[0].config.num_key_value_heads == 1 and model.config.num_key_value_heads == 2
    assert tp.storage_owner(shards[3].lm_head.weight, model) == "model.embed_tokens.weight"  # a view
    eager = StaticCacheLM(model, max_cache_len=16)
    ranks = [StaticCacheLM(s, max_cache_len=16) for s in shards]
    assert ranks[0].key_cache_0.shape == (1, 1, 16, 16)
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(2))
    prefill = tp.compile_tp(ranks, (ids, torch.arange(4)), each_rank=False)
    decode = tp.compile_tp(ranks, (ids[:, :1], torch.tensor([4])), each_rank=False)
    for mk, inputs in ((prefill, (ids, torch.arange(4))), (decode, (ids[:, 2:3], torch.tensor([4])))):
        with torch.no_grad():
            ref = eager(*inputs)
        outs, _ = mk.run(*inputs, seed=1)
        assert all(tp.outputs_equal(outs[0], o) for o in outs[1:])
        assert rel(outs[0], ref) <= TOL


def test_static_schedules_across_ranks():
    model = random_llama("tiny", max_seq_len=32)
    inputs = (torch.tensor([[3, 1, 4]]), torch.arange(3))
    with torch.no_grad():
        ref = model(*inputs)
    out = tp.run_tp(model, inputs, 2, schedule="static", num_workers=3, each_rank=False, seed=7)
    assert rel(out, ref) <= TOL


# ---- random sharded DAGs ----


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(dags(), st.integers(2, 4), st.integers(1, 4), st.booleans(), st.data())
def test_random_sharded_dags_never_deadlock_across_ranks(dag, world, num_workers, dynamic, data):
    """Random tasks become communication tiles reading random peers (waiting there on their
    local wait groups, as passes/ranks.py does). Under chosen interleavings of every rank's
    workers: no deadlock, each task runs after its predecessors on its own rank and on every
    peer it reads, and every counter ends at size x generation on every rank."""
    dag = counted(dag)
    peers = {}
    for t in data.draw(st.sets(st.sampled_from(range(len(dag))), max_size=8)):
        peers[t] = sorted(data.draw(st.sets(st.integers(0, world - 1), min_size=1)))
        dag.tasks[t].remote_waits = tuple((c, n, k) for k in peers[t] for c, n in dag.tasks[t].waits)
    q = queue_from_dag(dag, list_schedule(dag, num_workers))
    check_queue(q, static=not dynamic)
    sizes = np.array(dag.counter_sizes, dtype=np.int64)
    counters = [np.zeros(max(q.num_counters, 1), dtype=np.int64) for _ in range(world)]
    for generation in (1, 2):
        done = [set() for _ in range(world)]

        def executor(r, done=done):
            def execute(i):
                t = int(q.rows[i, Field.TASK])
                preds = set(dag.predecessors(t))
                for k in [r] + peers.get(t, []):
                    assert preds <= done[k], f"rank {r} ran task {t} before rank {k} finished {preds - done[k]}"
                done[r].add(t)

            return execute

        choose = (lambda moves: data.draw(st.sampled_from(moves))) if generation == 1 else None
        res = run_ranks(
            [q] * world,
            [executor(r) for r in range(world)],
            dynamic=dynamic,
            choose=choose,
            seed=generation,
            counters=counters,
            generation=generation,
        )
        assert len(res.executed) == world * len(q)
        assert all((c[: len(sizes)] == sizes * generation).all() for c in counters)


# ---- random sharded modules ----


class MLPBlock(nn.Module):
    """x + down(act(up(x)) [* gate(x)]): up/gate column-wise, down row-wise (exchange: rows
    exchanged, tp.ExchangeParallel, when the rows divide among the ranks)."""

    def __init__(self, dim, hidden, gated, bias, act, exchange=False):
        super().__init__()
        self.exchange = exchange
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.gate = nn.Linear(dim, hidden, bias=bias) if gated else None
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = act

    def forward(self, x):
        h = getattr(F, self.act)(self.up(x))
        if self.gate is not None:
            h = h * self.gate(x)
        return x + self.down(h)

    def plan(self, prefix):
        down = tp.ExchangeParallel() if self.exchange else tp.RowwiseParallel()
        plan = {f"{prefix}.up": tp.ColwiseParallel(), f"{prefix}.down": down}
        if self.gate is not None:
            plan[f"{prefix}.gate"] = tp.ColwiseParallel()
        return plan


class GatherBlock(nn.Module):
    """x + mix(up(x)): up column-wise (sharded output), mix column-wise taking a sharded input
    (all-gathered first) and all-gathering its output."""

    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.mix = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return x + self.mix(torch.tanh(self.up(x)))

    def plan(self, prefix):
        return {
            f"{prefix}.up": tp.ColwiseParallel(),
            f"{prefix}.mix": tp.ColwiseParallel(input_layouts=tp.Shard(-1), output_layouts=tp.Replicate()),
        }


class HeadBlock(nn.Module):
    """x + proj(norm(x)): a replicated norm, proj vocab-wise (column-wise, all-gathered)."""

    def __init__(self, dim, bias):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x):
        return x + self.proj(self.norm(x))

    def plan(self, prefix):
        return {f"{prefix}.proj": tp.ColwiseParallel(output_layouts=tp.Replicate())}


class Chain(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x * torch.sigmoid(x)

    def plan(self):
        return {k: v for i, b in enumerate(self.blocks) for k, v in b.plan(f"blocks.{i}").items()}


@st.composite
def sharded_chains(draw):
    world = draw(st.integers(2, 4))
    dim = 4 * world * draw(st.integers(1, 2))  # every slice starts 16-byte aligned: views, no copies
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        hidden = 4 * world * draw(st.integers(1, 3))
        kind = draw(st.sampled_from(["mlp", "exchange", "gather", "head"]))
        bias = draw(st.booleans())
        if kind in ("mlp", "exchange"):
            act = draw(st.sampled_from(["silu", "relu"]))
            blocks.append(MLPBlock(dim, hidden, draw(st.booleans()), bias, act, exchange=kind == "exchange"))
        elif kind == "gather":
            blocks.append(GatherBlock(dim, hidden, bias))
        else:
            blocks.append(HeadBlock(dim, bias))
    return world, dim, Chain(blocks)


@settings(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(
    chain=sharded_chains(),
    rows=st.integers(1, 5),
    num_workers=st.integers(1, 4),
    block=st.sampled_from([16, 32, None]),
    split_k=st.sampled_from([None, 2]),
    schedule=st.sampled_from(["dynamic", "static"]),
    data=st.data(),
)
def test_random_sharded_modules_equal_the_unsharded_model(chain, rows, num_workers, block, split_k, schedule, data):
    world, dim, model = chain
    gen = torch.Generator().manual_seed(rows)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        x = torch.randn(rows, dim, generator=gen)
        ref = model(x)
    mk = tp.compile_tp(
        tp.shard_ranks(model, world, model.plan()),
        (x,),
        each_rank=False,
        num_workers=num_workers,
        elementwise_block=block,
        split_k=split_k,
        schedule=schedule,
    )
    for prog in mk.programs:  # weights read in place: the model's own memory
        for bid, t in prog.graph.params.items():
            if not prog.graph.buffers[bid].name.startswith("const"):
                assert tp.storage_owner(t, model) is not None
    sizes = np.array(mk.compilations[0].dag.counter_sizes)
    for run in range(2):
        choose = (lambda moves: data.draw(st.sampled_from(moves))) if run == 0 else None
        outs, res = mk.run(x, choose=choose, seed=run)
        assert all(tp.outputs_equal(outs[0], o) for o in outs[1:])
        assert rel(outs[0], ref) <= TOL
        assert all((c[: len(sizes)] == sizes * mk.generation).all() for c in mk.counters)


def test_decode_reduce_tiles_wait_only_for_the_matmul_tiles_feeding_them():
    """One-row (decode) row-wise matmul: all-reduce tile j waits, on every rank, for matmul
    tile j alone, so the reduction of early tiles overlaps the rest of the matmul."""
    torch.manual_seed(0)
    model = Chain([MLPBlock(64, 64, gated=False, bias=False, act="relu")])
    x = torch.randn(1, 64)
    mk = tp.compile_tp(
        tp.shard_ranks(model, 2, model.plan()), (x,), each_rank=False, num_workers=4, matmul_tile=(16, 16, 16)
    )
    q = mk.queue
    signallers = {}
    for i in range(len(q)):
        signallers.setdefault(int(q.rows[i, Field.SIGNAL]), []).append(i)
    reduces = [i for i in range(len(q)) if q.opcode_name(i).startswith("all_reduce")]
    assert len(reduces) == 4  # 64 outputs / BN 16
    fed = set()
    for i in reduces:
        (c, n), *rest = q.waits_of(i)
        assert not rest and n == 1 and [q.opcode_name(j).split("#")[0] for j in signallers[c]] == ["matmul"]
        assert q.remote_waits_of(i) == [(c, 1, 0), (c, 1, 1)]
        fed.add(signallers[c][0])
    assert len(fed) == 4
    outs, _ = mk.run(x)
    with torch.no_grad():
        assert rel(outs[0], model(x)) <= TOL


# ---- broken cross-rank schedules ----


def mlp_tp2():
    torch.manual_seed(0)
    model = Chain([MLPBlock(16, 32, gated=False, bias=False, act="relu")])
    x = torch.randn(2, 16)
    mk = tp.compile_tp(tp.shard_ranks(model, 2, model.plan()), (x,), each_rank=False, num_workers=2)
    return model, x, mk


def reduce_of(q):
    return next(i for i in range(len(q)) if q.opcode_name(i).startswith("all_reduce"))


def test_a_lost_remote_signal_is_a_deadlock_naming_rank_and_counter():
    _, x, mk = mlp_tp2()
    q = mk.queue
    i = reduce_of(q)
    (c, n, _), *_ = q.remote_waits_of(i)
    broken = q.__class__(**{**q.__dict__, "rows": q.rows.copy()})  # rank 1 loses the partial sums' signals
    broken.rows[broken.rows[:, Field.SIGNAL] == c, Field.SIGNAL] = -1
    for prog in mk.programs:
        prog.bind((x,))
    from mkcompiler.vm import rank_executor

    with pytest.raises(VMDeadlock) as info:
        run_ranks([q, broken], [rank_executor(mk.programs, r) for r in range(2)], seed=3)
    story = str(info.value)
    assert re.search(rf"rank 0 worker \d+ holds instruction {i} \(all_reduce.*rank 1 counter {c} = 0 < {n}", story)
    assert re.search(rf"rank 1 worker \d+ holds instruction {i} .*its own counter {c} = 0 < {n}", story)


def test_without_remote_waits_a_rank_reads_unwritten_peer_partials():
    """The cross-rank waits are what make the all-reduce correct: run rank 0 as far as it can
    go before rank 1 moves. With the waits, rank 0 stops at the all-reduce until rank 1 has
    produced its partial sums; without them, it sums rank 1's unwritten (NaN) memory."""
    model, x, mk = mlp_tp2()
    with torch.no_grad():
        ref = model(x)
    rank0_first = lambda moves: min(moves)  # noqa: E731
    outs, _ = mk.run(x, choose=rank0_first)
    assert rel(outs[0], ref) <= TOL
    q = mk.queue
    q.waits[:, WaitField.RANK] = LOCAL  # every remote wait becomes a (redundant) local one
    assert not q.has_remote_waits()
    outs, _ = mk.run(x, choose=rank0_first)
    assert torch.isnan(outs[0]).all()


def test_an_exchange_tile_waits_only_for_the_rows_it_sends():
    """all_to_all's tile on rank r sends rows of row block r; every rank runs the same queue, so
    it waits for those rows in every block, not for all of x: with attention row blocks smaller
    than the rank blocks, each exchange tile has fewer producers than x has (a prefill of 256
    rows, TP = 2). Results still equal the unsharded model."""
    model = random_llama("tiny", max_seq_len=256)
    shards = tp.shard_ranks(model, 2, tp.default_plan(model, exchange=True))
    prompt = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(5))
    inputs = (prompt, torch.arange(256))
    mk = tp.compile_tp(shards, inputs, each_rank=False, num_workers=4)
    c = mk.compilations[0]
    a2a = next(i for i, op in enumerate(c.graph.ops) if op.kind == "all_to_all")
    x = c.graph.ops[a2a].inputs[0].buffer
    writers = {t for t, task in enumerate(c.dag.tasks) if any(o.buffer == x for o in c.graph.ops[task.op].outputs)}
    tiles = [t for t, task in enumerate(c.dag.tasks) if task.op == a2a]
    waits = [set(c.dag.predecessors(t)) & writers for t in tiles]
    assert len(writers) > 1 and all(w for w in waits)
    assert max(len(w) for w in waits) < len(writers), (len(writers), [len(w) for w in waits])
    with torch.no_grad():
        ref = model(*inputs)
    outs, _ = mk.run(*inputs, seed=1)
    assert rel(outs[0], ref) <= TOL
