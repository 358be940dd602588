"""Settings.combine_in_attention: a split-KV decode attention's last key chunk to arrive (a ticket
counter, as the split sums take) combines the chunks of its kv head, so the combine is no stage
of its own (passes/split_kv.py, ops/attention.py). The kernel (workers racing for the ticket)
and the VM under interleavings equal eager over several launches (tickets count on across
launches); a kv head whose query rows do not fit one tile keeps the combine op."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from helpers import check_kernel_and_vm

import mkcompiler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is not an installed package
from examples.llama import random_llama  # noqa: E402


def cached_llama(dtype, seed=0):
    model = random_llama("tiny", dtype=dtype, seed=seed, max_seq_len=64, max_batch=2)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in model.layers:
        for cache in (layer.attn.k_cache, layer.attn.v_cache):
            cache.copy_(torch.randn(cache.shape, generator=g).to(dtype))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_combines_in_its_last_chunk(dtype):
    model = cached_llama(dtype)
    eager = copy.deepcopy(model)
    tok = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(2))
    mk = mkcompiler.compile(model, (tok, torch.tensor([40])), num_workers=4, split_kv=3, combine_in_attention=True)
    kinds = [op.kind for op in mk.graph.ops]
    assert "attention_combine" not in kinds
    assert all(op.attrs.get("combine") for op in mk.graph.ops if op.kind == "attention")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for step in range(3):  # the kernel rewrites the same cache slot as eager: both see the same cache
        pos = torch.tensor([40 + step])
        check_kernel_and_vm(
            mk, lambda t, p: eager(t, p), (tok, pos), tol, vm_tol=1e-5 if dtype == torch.float32 else 2e-2
        )


@pytest.mark.parametrize("tokens, combined", [(24, True), (40, False)])
def test_prefill_combines_when_a_kv_heads_rows_fit_one_tile(tokens, combined):
    """Prefill (64-row tiles, 2 query heads per kv head): 24 tokens pack into one tile, combined
    over several rows per head; 40 do not, and the combine stays an op."""
    model = cached_llama(torch.float32, seed=3)
    tok = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(tokens)
    mk = mkcompiler.compile(model, (tok, pos), num_workers=4, split_kv=2, combine_in_attention=True)
    assert ("attention_combine" not in [op.kind for op in mk.graph.ops]) == combined
    with torch.no_grad():
        want = copy.deepcopy(model)(tok, pos)
    mk.poison()
    got = mk(tok, pos)
    assert ((got - want).norm() / want.norm()).item() <= 1e-4


def test_tensor_parallel_ranks_combine_and_sum_in_their_tiles():
    """TP = 2 (every rank's kernel in the interpreter), with the split sums too: tickets are each
    rank's own counters; two launches equal eager and the ranks agree."""
    from mkcompiler import tp
    from mkcompiler.tp_runtime import compile_world

    model = cached_llama(torch.float32, seed=5)
    eager = copy.deepcopy(model)
    tok = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(6))
    options = dict(split_kv=3, combine_in_attention=True, split_sum_in_matmul=True, split_k=2)
    world = compile_world(
        tp.shard_ranks(model, 2), (tok, torch.tensor([40])), num_workers=3, max_spin=200_000, **options
    )
    assert all(op.attrs.get("combine") for op in world.ranks[0].graph.ops if op.kind == "attention")
    for step in range(2):
        pos = torch.tensor([40 + step])
        world.poison()
        outs = world.run(tok, pos)
        with torch.no_grad():
            want = eager(tok, pos)
        assert all(torch.equal(outs[0], o) for o in outs[1:]), "ranks disagree"
        assert ((outs[0] - want).norm() / want.norm()).item() <= 1e-4
