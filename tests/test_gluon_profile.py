"""Profiles of the Gluon backend (issue 17): the compute partition writes the Triton backend's
stamps, the loader the issue time of each streamed instruction's first weight block, and the
summary says how far ahead of each wait the weights were asked for. CPU: the profiling variant
compiles offline for sm_90 without spills and reads %globaltimer; the summary's loader section
from known stamps. GPU (marked gpu): a profiled decode MLP."""

import numpy as np
import pytest
import torch

import mkcompiler
from mkcompiler.backends.gluon import codegen, tiles
from mkcompiler.ir.layout import NUM_STAMPS, Field, StampField
from mkcompiler.ir.settings import default_max_spin
from mkcompiler.tools.profiling import Profile
from tests.helpers import reference, rel_err
from tests.models import TransformerMLP

needs_gluon = pytest.mark.skipif(not tiles.HAVE_GLUON, reason="triton.experimental.gluon not importable")


def decode_mlp(device="cpu"):
    torch.manual_seed(0)
    model = TransformerMLP(dim=256, hidden=512, layers=2).to(device, torch.bfloat16)
    return model, torch.randn(1, 256, dtype=torch.bfloat16, device=device)


@needs_gluon
def test_profiling_variant_compiles_for_sm90_without_spills():
    model, x = decode_mlp()
    mk = mkcompiler.compile(model, (x,), backend="gluon", interpret=False, num_workers=132, cache=False)
    plain = codegen.compile_offline(mk.kernel, default_max_spin(interpret=False))
    prof = codegen.compile_offline(mk.kernel, default_max_spin(interpret=False), profile=True)
    assert prof["spilled_bytes"] == 0 and plain["spilled_bytes"] == 0, (plain, prof)
    assert plain["ptx_counts"]["globaltimer"] == 0  # normal launches carry no timing code
    assert prof["ptx_counts"]["globaltimer"] >= 4  # fetch, ready, end; the loader's issue


def _profile(loads, ready):
    """A Profile of a 3-instruction queue on one worker with the given ready stamps and loads."""
    model, x = decode_mlp()
    mk = mkcompiler.compile(model, (x,), interpret=True, num_workers=1, cache=False)
    n = len(mk.queue)
    stamps = np.full((n, NUM_STAMPS), -1, dtype=np.int64)
    for i in range(n):
        stamps[i] = (0, 10 * i, 10 * i + ready[i % len(ready)], 10 * i + 9)
    return Profile(mk.queue, stamps, unit="ns", source="gpu", loads=np.asarray(loads[:n] + [-1] * (n - len(loads))))


def test_summary_reports_the_loader_lead():
    p = _profile([0, 5, 30], ready=[4, 2, 1])
    text = p.summary()
    # leads: 4 - 0 = 4, 12 - 5 = 7, 21 - 30 = -9 -> median 4 ns, 2 of 3 issued before their wait ended
    assert "loader lead" in text and "over 3 streamed instructions" in text, text
    assert "median 4 ns" in text and "67% issued before their wait ended" in text, text


def test_summary_without_a_loader_has_no_loader_section():
    p = _profile([], ready=[1])
    p.loads = None
    assert "loader lead" not in p.summary()


@pytest.mark.gpu
def test_gpu_profile_has_stamps_and_loader_issue_times():
    model, x = decode_mlp("cuda")
    mk = mkcompiler.compile(model, (x,), backend="gluon")
    prof = mk.profile(x)
    assert rel_err(prof.outputs, reference(model, [x])) <= 3e-2
    assert not prof.missing()
    streamed = np.array([mk.queue.opcode_keys[o][0] == "matmul" for o in mk.queue.rows[:, Field.OPCODE]])
    assert (prof.loads[streamed] > 0).all() and (prof.loads[~streamed] == -1).all()
    s = prof.stamps
    assert (s[:, StampField.FETCH] <= s[:, StampField.READY]).all() and (
        s[:, StampField.READY] <= s[:, StampField.END]
    ).all()
    print(prof.summary())
    assert "loader lead" in prof.summary()
    assert rel_err(mk(x), reference(model, [x])) <= 3e-2  # normal calls still right after a profile
