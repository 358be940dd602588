"""Indexed writes with two index tensors (ops/scatter.py: `cache[rows, :, pos] = k`, a row and a
position per sequence) and the mixed step they make possible (examples/llama.MixedStep: a
prefill chunk of one sequence and one decode token of several others in one launch), through
the generated kernel (interpreter) and the VM, single-GPU and tensor-parallel."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from helpers import rel_err
from torch import nn

import mkcompiler
from mkcompiler.tp import plan as tp
from mkcompiler.vm import run_megakernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is not an installed package
from examples.llama import MixedStep, random_llama  # noqa: E402


class TwoIndexWrite(nn.Module):
    """state[rows, :, pos] = f(v) (indices on dims 0 and 2: torch puts j first in the values),
    or state[rows, pos] = f(v) (adjacent dims 0 and 1); f = 2v + 1 tests the fused form."""

    def __init__(self, shape, adjacent: bool, fused: bool):
        super().__init__()
        self.adjacent, self.fused = adjacent, fused
        self.register_buffer("state", torch.randn(shape))

    def forward(self, rows, pos, v):
        v = v * 2 + 1 if self.fused else v
        if self.adjacent:
            self.state[rows, pos] = v
        else:
            self.state[rows, :, pos] = v
        return self.state * 1.0


CASES = {
    "dims-0-2": ((5, 3, 7, 4), False, False, (4, 3, 4)),
    "dims-0-2-fused": ((5, 3, 7, 4), False, True, (4, 3, 4)),
    "dims-0-1": ((5, 7, 3, 4), True, False, (4, 3, 4)),
    "dims-0-2-broadcast-values": ((5, 3, 7, 4), False, False, (3, 1)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_index_put_with_two_index_tensors_matches_eager(case):
    """Fresh random state and values; negative indices count from the end; every other slot
    keeps its value (the state is random, so a stray write shows)."""
    shape, adjacent, fused, vshape = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    model = TwoIndexWrite(shape, adjacent, fused)
    rows = torch.tensor([4, 0, -2, 1])
    pos = torch.tensor([6, 2, 0, -1])
    v = torch.randn(vshape, generator=g)
    mk = mkcompiler.compile(copy.deepcopy(model), (rows, pos, v), num_workers=3, cache=False)
    scatters = [op for op in mk.graph.ops if op.kind == "scatter"]
    assert [op.attrs.dim2 for op in scatters] == [1 if adjacent else 2]
    assert (scatters[0].attrs.expr is not None) == fused  # the 2v + 1 computed where it is stored
    for step in range(2):  # a second call with other indices and values
        rows, pos = rows.roll(1), pos.flip(0)
        v = torch.randn(vshape, generator=g)
        want = model(rows, pos, v)
        got = mk(rows, pos, v)
        assert torch.equal(got, want), (step, (got - want).abs().max())


def test_index_put_with_two_index_tensors_in_the_vm_under_interleavings():
    model = TwoIndexWrite((5, 3, 7, 4), False, True)
    rows, pos = torch.tensor([3, 1, 4]), torch.tensor([0, 6, 2])
    v = torch.randn(3, 3, 4)
    want = copy.deepcopy(model)(rows, pos, v)
    mk = mkcompiler.compile(copy.deepcopy(model), (rows, pos, v), num_workers=3, cache=False)
    for seed in range(3):
        outs, _ = run_megakernel(mk, rows, pos, v, seed=seed)
        assert torch.equal(outs, want)


def test_index_put_with_index_tensors_of_two_lengths_is_refused():
    model = TwoIndexWrite((5, 3, 7, 4), False, False)
    with pytest.raises(mkcompiler.UnsupportedOpError, match="two of one length"):
        mkcompiler.compile(model, (torch.tensor([0, 1]), torch.tensor([2]), torch.randn(2, 3, 4)), cache=False)


# ---- the mixed step ----

CHUNK, BATCH = 5, 3


def mixed_model(seed=0):
    """A tiny fp32 Llama with random KV caches of BATCH + 2 rows (the last must stay untouched)."""
    model = random_llama("tiny", seed=seed, max_batch=BATCH + 2)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in model.layers:
        for cache in (layer.attn.k_cache, layer.attn.v_cache):
            cache.copy_(torch.randn(cache.shape, generator=g))
    return MixedStep(model).eval()


def mixed_inputs(step: int):
    """The chunk continues its sequence (positions 7.. then 12..); the decoding sequences sit at
    positions of their own, each one further per step."""
    g = torch.Generator().manual_seed(100 + step)
    return (
        torch.randint(0, 256, (1, CHUNK), generator=g),
        torch.arange(7 + CHUNK * step, 7 + CHUNK * (step + 1)),
        torch.randint(0, 256, (BATCH, 1), generator=g),
        torch.tensor([3, 40, 21]) + step,
    )


def caches(step_module):
    return [c for layer in step_module.model.layers for c in (layer.attn.k_cache, layer.attn.v_cache)]


def test_mixed_step_matches_eager_and_writes_only_its_slots():
    """Two mixed steps: logits (the chunk's rows and the decode rows) and every KV cache equal
    eager's (fp32); the cache row past the decoding sequences keeps its random values."""
    eager, compiled = mixed_model(), mixed_model()
    untouched = [c[BATCH + 1].clone() for c in caches(compiled)]
    mk = mkcompiler.compile(compiled, mixed_inputs(0), num_workers=4, cache=False)
    for step in range(2):
        inputs = mixed_inputs(step)
        with torch.no_grad():
            want = eager(*inputs)
        got = mk(*inputs)
        assert got.shape == (CHUNK + BATCH, 256)
        assert rel_err(got, want) <= 1e-4, (step, rel_err(got, want))
        for c_mk, c_eager in zip(caches(compiled), caches(eager)):
            assert rel_err(c_mk, c_eager) <= 1e-5
    assert all(torch.equal(c[BATCH + 1], u) for c, u in zip(caches(compiled), untouched))


def test_mixed_step_needs_a_cache_row_per_sequence():
    step = MixedStep(random_llama("tiny", max_batch=BATCH))
    with pytest.raises(ValueError, match="KV cache of 4 rows"):
        step(*mixed_inputs(0))


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_mixed_step_equals_the_unsharded_model(world):
    """TP = 2 (kv heads split) and 4 (kv heads replicated) through the VM, ranks interleaved:
    every rank's logits equal the unsharded model's."""
    model = mixed_model(seed=3)
    inputs = mixed_inputs(0)
    with torch.no_grad():
        want = copy.deepcopy(model)(*inputs)
    mk = tp.compile_tp(tp.shard_ranks(model, world), inputs)
    for seed in range(2):  # a rerun rewrites the same slots with the same values
        outs, _ = mk.run(*inputs, seed=seed)
        assert all(tp.outputs_equal(outs[0], o) for o in outs[1:]), "ranks disagree"
        assert rel_err(outs[0], want) <= 1e-5
