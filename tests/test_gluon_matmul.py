"""Gluon large-M matmul (mkcompiler/backends/gluon/matmul.py): offline sm_90 compiles on the CPU
(TMA ring, async wgmma, warp specialization, no spills), the host-side shape and alignment
rules, and GPU runs against torch (ragged edges, residual, several tiles per program)."""

import re

import pytest
import torch

from mkcompiler.backends.gluon import matmul as gm

needs_gluon = pytest.mark.skipif(not gm.HAVE_GLUON, reason="triton.experimental.gluon not importable")


@needs_gluon
@pytest.mark.parametrize(
    "block,stages,residual",
    [((128, 128, 64), 4, False), ((128, 256, 64), 3, True)],
    ids=["128x128x64-s4", "128x256x64-s3-residual"],
)
def test_compiles_for_sm90_with_a_tma_ring_async_wgmma_and_no_spills(block, stages, residual):
    r = gm.compile_offline(block, stages, residual=residual, keep_asm=True)
    print("\n" + gm.format_report(r))
    ptx, counts = r["ptx"], r["ptx_counts"]
    BM, BN, BK = block
    assert r["spilled_bytes"] == 0 and counts["ld.local"] == 0 and counts["st.local"] == 0, r["ptxas_log"]
    assert r["regs"] > 0
    ring = stages * (BM + BN) * BK * 2
    assert ring + BM * BN * 2 <= r["shared"] <= gm.MAX_SHARED_BYTES, r  # the ring + the epilogue buffer
    assert "ttg.warp_specialize" in r["ttgir"] and len(r["setmaxnreg"]) >= 2, r
    # async wgmma with one MMA left in flight per K step, then drained per tile
    assert counts["wgmma.mma_async"] > 0 and re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx)
    assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+0;", ptx)
    assert ".bf16.bf16" in ptx and "wgmma.mma_async.sync.aligned.m64n" in ptx
    # TMA loads on mbarriers (A and B; with a residual, R too), a TMA store after a proxy fence
    assert counts["cp.async.bulk.tensor.2d.shared::cluster.global"] >= (3 if residual else 2), counts
    assert counts["cp.async.bulk.tensor.2d.global.shared::cta"] >= 1 and counts["fence.proxy.async"] >= 1
    assert counts["expect_tx"] >= (2 if residual else 1) and counts["mbarrier.try_wait"] >= 2
    assert re.search(r"cp\.async\.bulk\.wait_group\.read\s+0;", ptx)  # epilogue buffer reused once read


def test_config_rules():
    assert gm.MatmulConfig().num_warps == 4 and gm.config_of((128, 256, 64), 3).num_warps == 8
    assert gm.config_of((128, 128, 64), 4, warps=8).num_warps == 8
    assert gm.MatmulConfig().tiles(2048, 4096) == 16 * 32 and gm.MatmulConfig().tiles(129, 1) == 2
    with pytest.raises(gm.GluonMatmulError, match="shared memory"):
        gm.config_of((128, 256, 64), 4)  # 4 x 48 KiB ring + 64 KiB epilogue buffer
    with pytest.raises(gm.GluonMatmulError, match="BN"):
        gm.config_of((128, 96, 64))
    with pytest.raises(gm.GluonMatmulError, match="registers"):
        gm.config_of((128, 256, 64), 3, warps=4)
    with pytest.raises(gm.GluonMatmulError, match="stages"):
        gm.config_of(stages=1)
    with pytest.raises(gm.GluonMatmulError, match="BM, BN, BK"):
        gm.config_of((128, 128))


def _bf16(*shape):
    return torch.zeros(*shape, dtype=torch.bfloat16)


def test_operand_rules_name_the_problem():
    assert gm.check_operands(_bf16(5, 64), _bf16(24, 64)) == (5, 24, 64)
    assert gm.check_operands(_bf16(5, 64), _bf16(24, 64), _bf16(5, 24), _bf16(5, 24)) == (5, 24, 64)
    big = _bf16(8, 48)
    assert gm.check_operands(_bf16(5, 64), _bf16(24, 64), out=big[:5, :24]) == (5, 24, 64)  # strided out
    cases = [
        ((_bf16(5, 60), _bf16(24, 60)), "multiple of 8"),  # K: 120-byte rows
        ((_bf16(5, 64), _bf16(20, 64)), "N \\(20\\) must be a multiple of 8"),
        ((_bf16(5, 64), _bf16(24, 32)), "nn.Linear"),
        ((torch.zeros(5, 64), _bf16(24, 64)), "bf16"),
        ((_bf16(5, 64, 1), _bf16(24, 64)), "2-D"),
        ((_bf16(64, 5).t(), _bf16(24, 64)), "row-major"),
        ((_bf16(5, 72)[:, 1:65], _bf16(24, 64)), "base address"),  # rows aligned, base 2 B off
        ((_bf16(4 * 64 + 8)[4:260].view(4, 64), _bf16(24, 64)), "base address"),  # base 8 B off
        ((_bf16(5, 64), _bf16(24, 64), _bf16(5, 16)), "residual has shape"),
        ((_bf16(5, 64), _bf16(24, 64), None, _bf16(24, 5)), "out has shape"),
        ((_bf16(0, 64), _bf16(24, 64)), "empty"),
    ]
    for args, msg in cases:
        with pytest.raises(gm.GluonMatmulError, match=msg):
            gm.check_operands(*args)


def test_launch_without_gpu_raises_clearly():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    if not gm.HAVE_GLUON:
        pytest.skip("no Gluon")
    with pytest.raises(gm.GluonMatmulError, match="CUDA GPU"):
        gm.gluon_matmul(_bf16(4, 64), _bf16(8, 64))


# ---- GPU (Hopper) ----


def _operands(M, N, K, residual, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    b = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(torch.bfloat16)
    r = torch.randn(M, N, device="cuda", generator=g).to(torch.bfloat16) if residual else None
    return a, b, r


def _reference(a, b, r):
    ref = a.float() @ b.float().t()  # exact products of the bf16 inputs, fp32 sums
    return ref if r is None else ref + r.float()


def _assert_matches(got, ref, what):
    assert not got.isnan().any(), f"{what}: outputs not written (NaN poison left)"
    # one bf16 rounding of an fp32 result (2^-9 relative) plus fp32 summation-order noise
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2, msg=lambda m: f"{what}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize(
    "block,stages,warps",
    [((128, 128, 64), 4, 0), ((128, 256, 64), 3, 0), ((128, 128, 64), 4, 8), ((64, 128, 32), 6, 0)],
    ids=["128x128x64-s4", "128x256x64-s3", "128x128x64-s4-w8", "64x128x32-s6"],
)
@pytest.mark.parametrize(
    "M,N,K",
    [(1, 8, 8), (200, 136, 72), (257, 520, 1000), (128, 256, 64), (1000, 1032, 4104)],
    ids=lambda v: str(v),
)
def test_matches_torch_with_ragged_edges(M, N, K, block, stages, warps, residual):
    """M, N, K off the tile grid (TMA zero-fills the K tail and clips the stores); out is a view
    into a NaN-poisoned buffer with wider rows: every element of C written, nothing beside it."""
    a, b, r = _operands(M, N, K, residual)
    buf = torch.full((M + 3, N + 24), float("nan"), device="cuda", dtype=torch.bfloat16)
    out = buf[:M, :N]
    got = gm.gluon_matmul(a, b, r, block=block, stages=stages, warps=warps, out=out)
    torch.cuda.synchronize()
    assert got.data_ptr() == out.data_ptr()
    _assert_matches(out, _reference(a, b, r), f"{M}x{N}x{K} {block} s{stages}")
    assert buf[M:].isnan().all() and buf[:, N:].isnan().all(), "wrote outside C"


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("programs", [1, 3, 7])
def test_many_tiles_per_program(programs, residual):
    """Few programs, many tiles each: the ring runs across tile boundaries and the residual /
    epilogue-buffer handshake goes through many phases; also a grouping that leaves a short last
    group (GROUP_M=3 over 9 row blocks)."""
    M, N, K = 9 * 128 - 5, 1160, 520
    a, b, r = _operands(M, N, K, residual, seed=programs)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    gm.gluon_matmul(a, b, r, group_m=3, stages=3, out=out, num_programs=programs)
    torch.cuda.synchronize()
    _assert_matches(out, _reference(a, b, r), f"{programs} programs")


@pytest.mark.gpu
def test_out_may_be_the_residual():
    """C written in place over R (x = x + W @ h, the residual stream): each tile reads its R
    block before it stores C there; twice in a row, from one prepared launch."""
    M, N, K = 300, 264, 256
    a, b, r = _operands(M, N, K, True)
    x = r.clone()
    launch = gm.prepare_gluon_matmul(a, b, x, x, gm.config_of((128, 128, 64), 4))
    want = _reference(a, b, r)
    launch()
    torch.cuda.synchronize()
    _assert_matches(x, want, "in place, first")
    want2 = _reference(a, b, x)
    launch()
    torch.cuda.synchronize()
    _assert_matches(x, want2, "in place, second")


@pytest.mark.gpu
@pytest.mark.parametrize("M", [512, 2048])
def test_llama_8b_shapes_match_cublas(M):
    """The prefill shapes the benchmark times (q/o, k/v, gate/up, down of Llama-3.1-8B), default
    tile, against torch's bf16 matmul: the same answer up to bf16 rounding."""
    for N, K in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]:
        a, b, _ = _operands(M, N, K, False)
        got = gm.gluon_matmul(a, b)
        ref = _reference(a, b, None)
        _assert_matches(got, ref, f"{M}x{N}x{K}")
        cublas = torch.nn.functional.linear(a, b).float()
        rel = ((got.float() - ref).norm() / ref.norm()).item()
        rel_cublas = ((cublas - ref).norm() / ref.norm()).item()
        assert rel <= max(2 * rel_cublas, 4e-3), (rel, rel_cublas)


@pytest.mark.gpu
def test_bad_devices_and_shapes_raise_before_a_launch():
    a, b, _ = _operands(128, 128, 64, False)
    with pytest.raises(gm.GluonMatmulError, match="one CUDA device"):
        gm.gluon_matmul(a, b, out=torch.empty(128, 128, dtype=torch.bfloat16))
    with pytest.raises(gm.GluonMatmulError, match="multiple of 8"):
        gm.gluon_matmul(a[:, :60], b[:, :60])
