"""Settings.early_weights: matmul tiles wait for their inputs themselves (kernel_lib.wait_in_tile),
after asking for their first weight block and addressing their views. The dispatcher skips its
own wait for those opcodes (codegen.generate). Results must equal eager, a wait that gives up
inside a tile must stop the kernel with an error (no store, no signal), and the profile's ready
stamp must still be the end of the wait."""

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TOL, reference, rel_err
from models import ResidualMLP

import mkcompiler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is not an installed package
from examples.llama import random_llama  # noqa: E402
from mkcompiler import MegakernelError
from mkcompiler.ir.layout import Field
from mkcompiler.tools.profiling import END, FETCH, READY
from tests.test_fuse_norm import NormThenProjections


def early(model, inputs, **options):
    mk = mkcompiler.compile(model, inputs, early_weights=True, cache=False, **options)
    assert "ok, t_early = " in mk.source and "these tiles wait themselves" in mk.source
    return mk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [None, 2, 3])
def test_decode_mlp_matches_eager(dtype, split_k):
    torch.manual_seed(0)
    model = ResidualMLP(dim=64, hidden=192).to(dtype)
    x = torch.randn(1, 64, dtype=dtype)
    mk = early(model, (x,), split_k=split_k)
    for _ in range(2):  # two launches: the tiles' own waits count launches as the dispatcher's
        x = torch.randn(1, 64, dtype=dtype)
        mk.poison()
        assert rel_err(mk(x), reference(model, (x,))) <= TOL[dtype]


@pytest.mark.parametrize("split_k", [None, 2])
def test_folded_norm_matches_eager(split_k):
    """A LayerNorm folded into the matmuls (both the in-loop and the split-K sweep paths)."""
    torch.manual_seed(1)
    model = NormThenProjections(dim=64, hidden=96)
    x = torch.randn(2, 64)
    mk = early(model, (x,), split_k=split_k, fuse_norm=True)
    mk.poison()
    assert rel_err(mk(x), reference(model, (x,))) <= 1e-4


def test_llama_decode_steps_match_eager():
    torch.manual_seed(2)
    model = random_llama("tiny", dtype=torch.float32, max_seq_len=32, max_batch=1)
    ref = copy.deepcopy(model)
    tok, pos = torch.randint(0, 256, (1, 1)), torch.tensor([5])
    mk = early(model, (tok, pos))
    for step in range(3):
        pos = torch.tensor([5 + step])
        got, want = mk(tok, pos), ref(tok, pos)
        assert rel_err(got, want) <= 1e-4
        tok = want[:, -1].argmax(-1, keepdim=True)


def test_a_wait_that_gives_up_inside_a_tile_stops_with_an_error():
    torch.manual_seed(3)
    model = ResidualMLP(dim=32, hidden=64)
    x = torch.randn(1, 32)
    mk = early(model, (x,), max_spin=50)
    q = mk.queue
    good = q.rows.copy()
    matmuls = {o for o, name in enumerate(q.opcode_names) if name.startswith("matmul")}
    waited = {c for i in range(len(q)) if q.rows[i, Field.OPCODE] in matmuls for c, _ in q.waits_of(i)}
    victim = next(i for i in range(len(q)) if q.rows[i, Field.SIGNAL] in waited)
    q.rows[victim, Field.SIGNAL] = -1  # a matmul tile waits for a signal that never comes
    mk.upload_queue(check=False)
    with pytest.raises(MegakernelError, match="instruction|counter"):
        mk(x)
    q.rows[:] = good
    mk.upload_queue()
    mk.poison()
    assert rel_err(mk(x), reference(model, (x,))) <= TOL[torch.float32]


def test_profile_ready_stamps_come_after_the_inputs():
    """A self-waiting tile's ready stamp is its wait's end: after its producers' end stamps."""
    torch.manual_seed(4)
    model = ResidualMLP(dim=32, hidden=64)
    x = torch.randn(1, 32)
    mk = early(model, (x,))
    prof = mk.profile(x)
    s = np.asarray(prof.stamps)
    fetch, ready, end = s[:, FETCH], s[:, READY], s[:, END]
    assert (fetch <= ready).all() and (ready <= end).all()
    dag, q = mk.dag, mk.queue
    index = {int(q.rows[i, Field.TASK]): i for i in range(len(q))}
    for u, v in dag.edges:
        assert end[index[u]] <= ready[index[v]], (u, v)


class ActivationTimesActivation(torch.nn.Module):
    """x @ x.T, then (x @ x.T) @ (x @ x.T).T: the second product's B is written by the first
    (the GPU fuzz's reduced case, tests/fuzz_repros/cuda_seed0_model9.py)."""

    def forward(self, x):
        y = x @ x.T
        return y @ y.T


def test_a_matmul_whose_b_another_instruction_writes_waits_before_reading_it():
    """Only a B nothing writes (a weight, an input) may be read before the tile's wait: on an H100
    the second product read unwritten memory (inf), which the interpreter, running programs one
    after another, could not show. Its opcode stays on the dispatcher's wait in the GPU kernel."""
    x = torch.randn(6, 20)
    mk = mkcompiler.compile(ActivationTimesActivation(), (x,), interpret=False, num_workers=8, cache=False)
    keys = mk.queue.opcode_keys
    assert sorted(k.b_fixed for k in keys) == [False, True], keys  # x.T: an input; y.T: the first product's
    line = next(line for line in mk.source.splitlines() if "these tiles wait themselves" in line)
    for o, k in enumerate(keys):
        assert (f"(op == {o})" in line) == k.b_fixed, (o, line)
