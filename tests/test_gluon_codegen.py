"""The generated Gluon decode kernel (backends/gluon/codegen.py, issue 17): on the CPU, a decode
MLP chain compiled with backend="gluon" compiles offline for sm_90 with no spills, its plan's two
walks agree and its TMA table is the loader walk; a graph with an op the backend lacks compiles on
the Triton backend with a warning naming it. On a GPU (marked gpu): outputs equal eager, repeated
calls, a broken queue raises within its bound and the next call is correct."""

import time
import warnings

import numpy as np
import pytest
import torch

import mkcompiler
from mkcompiler.backends.gluon import codegen, tiles
from mkcompiler.ir.layout import Field, WaitField
from mkcompiler.ir.settings import default_max_spin
from mkcompiler.runtime.gluon import GluonFallbackWarning, GluonMegakernel
from mkcompiler.runtime.megakernel import Megakernel
from tests.helpers import reference, rel_err
from tests.models import TransformerMLP

needs_gluon = pytest.mark.skipif(not tiles.HAVE_GLUON, reason="triton.experimental.gluon not importable")
DIM, HIDDEN = 256, 512


def decode_mlp(device="cpu", seed=0):
    torch.manual_seed(seed)
    model = TransformerMLP(dim=DIM, hidden=HIDDEN, layers=2).to(device, torch.bfloat16)
    return model, torch.randn(1, DIM, dtype=torch.bfloat16, device=device)


@pytest.fixture(scope="module")
def gluon_mlp():
    model, x = decode_mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mk = mkcompiler.compile(model, (x,), backend="gluon", interpret=False, num_workers=132, cache=False)
    return model, mk, before


@needs_gluon
def test_decode_mlp_compiles_for_sm90_without_spills(gluon_mlp):
    _, mk, _ = gluon_mlp
    assert isinstance(mk, GluonMegakernel) and not mk.launchable
    k = mk.kernel
    r = codegen.compile_offline(k, default_max_spin(interpret=False), keep_asm=True)
    print(f"\nsm_90: {r['regs']} regs, {r['spilled_bytes']} B spilled, {r['shared']} B shared, {r['ptx_counts']}")
    assert r["spilled_bytes"] == 0, r["ptxas_log"]
    assert r["regs"] > 0 and r["shared"] >= k.num_buf * k.box[0] * k.box[1] * 2, r
    assert len(r["setmaxnreg"]) >= 2  # warp-specialized: the loader gives registers to compute
    ptx = r["ptx"]
    assert "cp.async.bulk.tensor" in ptx and "expect_tx" in ptx and "mbarrier.try_wait" in ptx
    # bounded polls, one acquire, a release
    assert "ld.volatile.global" in ptx and "ld.global.gpu.acquire" in ptx and "atom.global.gpu.release" in ptx
    assert r["ptx_counts"]["cp.async.bulk.tensor"] >= len(k.groups)  # one issue per descriptor branch


@needs_gluon
def test_plan_walks_agree_and_the_tma_table_is_the_loader_walk(gluon_mlp):
    _, mk, _ = gluon_mlp
    plan = mk.kernel.plan
    plan.check()
    tma, bk = mk.kernel.tma, mk.kernel.box[1]
    loads = {}
    for p in plan.workers:
        for s in p.loads:
            loads.setdefault(s.instruction, []).append(s.block)
    for i in range(len(mk.queue)):
        blocks = loads.get(i, [])
        lo, hi = tma[i, tiles.TMA_K_LO], tma[i, tiles.TMA_K_HI]
        assert len(range(lo, hi, bk)) == len(blocks)
        if blocks:
            group, row, _ = plan.stacks.locate(blocks[0])
            assert mk.kernel.groups[tma[i, tiles.TMA_DESC]] == group and tma[i, tiles.TMA_ROW] == row
            assert [b.k0 for b in blocks] == list(range(lo, hi, bk))
    # every matmul instruction streams, nothing else does
    kinds = [mk.queue.opcode_keys[o][0] for o in mk.queue.rows[:, Field.OPCODE]]
    assert [k == "matmul" for k in kinds] == [i in loads for i in range(len(mk.queue))]


@needs_gluon
def test_weights_are_rebound_to_stacked_buffers(gluon_mlp):
    """The per-layer gate/up weights share one stacked buffer (one descriptor), the module's
    parameters are views of it with their values unchanged, and the kernel reads those views."""
    model, mk, before = gluon_mlp
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert len(mk.stacks) == len(mk.kernel.groups) <= codegen.MAX_DESCRIPTORS
    stacked = [t for t in mk.stacks if t.shape[0] > HIDDEN]
    assert stacked, [tuple(t.shape) for t in mk.stacks]
    base, end = stacked[0].data_ptr(), stacked[0].data_ptr() + stacked[0].numel() * 2
    inside = [n for n, p in model.named_parameters() if base <= p.data_ptr() < end]
    assert len(inside) == 4 and all(n.endswith(("gate.weight", "up.weight")) for n in inside), inside
    graph_ptrs = {t.data_ptr() for t in mk.graph.params.values()}
    assert all(p.data_ptr() in graph_ptrs for n, p in model.named_parameters() if n in inside)


class PrefillAttention(torch.nn.Module):
    """Causal attention over 64 query rows: a prefill tile, which the Gluon backend lacks."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x):
        t, d = x.shape
        q, k, v = self.qkv(x).view(t, 3, self.heads, d // self.heads).permute(1, 2, 0, 3)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@needs_gluon
def test_an_op_the_backend_lacks_falls_back_to_triton_with_a_warning():
    torch.manual_seed(0)
    model = PrefillAttention().to(torch.bfloat16)
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    with pytest.warns(
        GluonFallbackWarning, match=r"cannot run attention \(64-row tiles .*scaled_dot_product_attention"
    ):
        mk = mkcompiler.compile(model, (x,), backend="gluon", interpret=False, num_workers=8, cache=False)
    assert type(mk) is Megakernel and "@triton.jit" in mk.source


def test_the_interpreter_falls_back_to_triton_with_a_warning():
    torch.manual_seed(0)
    model, x = TransformerMLP(dim=32, hidden=64), torch.randn(1, 32)
    with pytest.warns(GluonFallbackWarning, match="interpreter"):
        mk = mkcompiler.compile(model, (x,), backend="gluon", interpret=True, num_workers=2, cache=False)
    assert rel_err(mk(x), reference(model, [x])) <= 1e-4


def test_a_fallback_gets_the_triton_backends_own_tiles():
    """The passes tile for the backend (Gluon: one 64-wide ring box for every decode matmul);
    a graph that falls back is compiled again for Triton, whose 128-wide decode tiles it gets."""
    torch.manual_seed(0)
    model = TransformerMLP(dim=256, hidden=1024).to(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    options = dict(num_workers=4, cache=False)
    triton = mkcompiler.compile(model, (x,), backend="triton", interpret=True, **options)
    with pytest.warns(GluonFallbackWarning, match="interpreter"):
        fallback = mkcompiler.compile(model, (x,), backend="gluon", interpret=True, **options)
    assert type(fallback) is Megakernel and fallback.queue.descs == triton.queue.descs
    assert np.array_equal(fallback.queue.rows, triton.queue.rows)
    assert fallback.settings.num_warps == triton.settings.num_warps == 8  # Triton's warps, not Gluon's 4
    if tiles.HAVE_GLUON:  # what the Gluon backend itself would have run: other tiles
        gluon = mkcompiler.compile(model, (x,), backend="gluon", interpret=False, **options)
        assert isinstance(gluon, GluonMegakernel) and gluon.queue.descs != triton.queue.descs
    assert rel_err(fallback(x), reference(model, [x])) <= 3e-2


def test_each_backend_has_its_own_default_warps_and_a_set_value_wins():
    s = mkcompiler.Settings()
    assert s.replace(interpret=False).for_target().num_warps == 8
    assert s.replace(interpret=False, backend="gluon").for_target().num_warps == 4
    assert s.replace(interpret=False, backend="gluon", num_warps=8).for_target().num_warps == 8


def test_backend_setting_is_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        mkcompiler.Settings().replace(backend="cuda")


@needs_gluon
def test_elementwise_templates_translate_or_are_refused():
    assert (
        codegen.gluon_source("t0 = (x0 * tl.sigmoid(x0)).to(tl.bfloat16)") == "t0 = (x0 * sigmoid(x0)).to(gl.bfloat16)"
    )
    assert codegen.gluon_source("tl.where(x0 > 0.0, tl.exp(x0), 1.0)") == "gl.where(x0 > 0.0, gl.exp(x0), 1.0)"
    with pytest.raises(codegen.GluonUnsupported, match="tl.no_such_function"):
        codegen.gluon_source("tl.no_such_function(x0)")


# ---- GPU ----


def raise_a_wait(mk) -> np.ndarray:
    """Raise one wait row's count past what its producers signal; returns the good wait table."""
    good = mk.queue.waits.copy()
    mk.queue.waits[0, WaitField.COUNT] += 1
    mk.upload_queue(check=False)
    return good


@pytest.mark.gpu
def test_gpu_decode_mlp_matches_eager_and_survives_a_broken_queue():
    model, x = decode_mlp("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GluonFallbackWarning)  # it must run on the Gluon backend
        mk = mkcompiler.compile(model, (x,), backend="gluon", max_spin=1 << 16)
    assert isinstance(mk, GluonMegakernel)
    for seed in range(3):  # fresh inputs, repeated calls
        torch.manual_seed(100 + seed)
        x = torch.randn(1, DIM, dtype=torch.bfloat16, device="cuda")
        assert rel_err(mk(x), reference(model, [x])) <= 3e-2
    good = raise_a_wait(mk)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with pytest.raises(mkcompiler.MegakernelError, match="instruction|counter"):
        mk(x)
    assert time.perf_counter() - t0 < 5.0
    mk.queue.waits[:] = good
    mk.upload_queue()
    x = torch.randn(1, DIM, dtype=torch.bfloat16, device="cuda")
    assert rel_err(mk(x), reference(model, [x])) <= 3e-2
