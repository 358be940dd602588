"""Gluon weight-streaming kernel (mkcompiler/backends/gluon/stream.py): offline sm_90 compile on the CPU
(TMA ring + warp specialization, no spills), host-side tile checks, and one GPU run vs torch."""

import pytest
import torch

from mkcompiler.backends.gluon import stream as gs

needs_gluon = pytest.mark.skipif(not gs.HAVE_GLUON, reason="triton.experimental.gluon not importable")


@needs_gluon
@pytest.mark.parametrize(
    "cfg",
    [
        dict(BN=64, BK=128, NUM_BUF=4, x_dtype="bf16", y_dtype="fp32"),
        dict(BN=128, BK=64, NUM_BUF=6, x_dtype="fp32", y_dtype="bf16"),
    ],
    ids=["bn64-bk128-buf4", "bn128-bk64-buf6"],
)
def test_compiles_for_sm90_with_tma_ring_and_no_spills(cfg):
    r = gs.compile_offline(**cfg, keep_asm=True)
    print("\n" + gs.format_report(r))
    ptx = r["ptx"]
    assert r["spilled_bytes"] == 0, r["ptxas_log"]
    assert r["regs"] > 0 and r["shared"] >= cfg["NUM_BUF"] * cfg["BN"] * cfg["BK"] * 2, r
    assert "cp.async.bulk.tensor" in ptx  # TMA loads of W blocks
    assert "mbarrier.try_wait" in ptx and "mbarrier.arrive" in ptx and "expect_tx" in ptx
    assert "mbarrier.init" in ptx
    assert len(r["setmaxnreg"]) >= 2, r  # warp-specialized: partitions re-balance registers
    assert "ttg.warp_specialize" in r["ttgir"]
    # dependencies: volatile polls, one acquire, x from L2 after the wait, a release per signal
    assert "ld.volatile.global" in ptx and "ld.global.gpu.acquire" in ptx, r["ptx_counts"]
    assert "ld.global.cg" in ptx and "atom.global.gpu.release.add" in ptx, r["ptx_counts"]


@needs_gluon
def test_profiled_variant_compiles_with_its_stamps():
    """PROFILE=True (a separate compile) reads %globaltimer for each of a tile's stamps; the plain
    kernel has none."""
    plain, prof = gs.compile_offline(), gs.compile_offline(profile=True)
    assert plain["ptx_counts"]["globaltimer"] == 0
    assert prof["ptx_counts"]["globaltimer"] == gs.NUM_STAMPS and prof["spilled_bytes"] == 0


def test_prefetch_report_reads_leads_and_waits():
    """Two programs, two tiles each (ns): program 0's second tile was asked for 2 us before its
    first ended; program 1's only after."""
    stamps = torch.tensor([[0, 0, 1000, 5000], [0, 0, 500, 4000], [3000, 5000, 6000, 9000], [4500, 4100, 4200, 8000]])
    r = gs.prefetch_report(stamps, 4, 2)
    assert r["pairs"] == 2 and r["ahead"] == 0.5 and r["span_us"] == 9.0
    # leads 2.0 and -0.5 us, waits 1.0 and 0.1 us: torch's median of two is the lower one
    assert r["lead_us"] == pytest.approx(-0.5) and r["wait_us"] == pytest.approx(0.1)


def test_prefetch_gantt_draws_a_launch(tmp_path):
    pytest.importorskip("matplotlib")
    stamps = torch.tensor([[0, 0, 1000, 5000], [0, 0, 500, 4000], [3000, 5000, 6000, 9000], [4500, 4100, 4200, 8000]])
    tiles = gs.make_tiles(
        [torch.empty(128, 64, dtype=torch.bfloat16), torch.empty(128, 64, dtype=torch.bfloat16)],
        [0, 0],
        [0, 128],
        BN=64,
    )
    path = gs.prefetch_gantt(stamps, tiles, 2, str(tmp_path / "chain.png"))
    assert (tmp_path / "chain.png").stat().st_size > 1000 and path.endswith("chain.png")


def test_tiles_table_and_checks():
    ws = [torch.empty(100, 64, dtype=torch.bfloat16), torch.empty(64, 32, dtype=torch.bfloat16)]
    t = gs.make_tiles(ws, [0, 64], [0, 100], BN=32)
    assert t.shape == (4 + 2, gs.NF) and t.dtype == torch.int32
    assert t[:4, 1].tolist() == [0, 32, 64, 96] and t[4:, 0].tolist() == [1, 1]
    assert t[0, 4:6].tolist() == [64, 100] and t[5, 4:6].tolist() == [32, 64]
    assert t[:, 6].tolist() == [-1] * 6 and t[:, 8].tolist() == [-1] * 6  # no waits, no signals
    xs, ys = torch.empty(96), torch.empty(164)
    assert torch.equal(gs._check_tiles(ws, xs, ys, t), t)
    assert torch.equal(gs._check_tiles(ws, xs, ys, t[:, :4]), t)  # K, N filled in
    # a chain: weight 1 reads weight 0's output once its 4 tiles signalled counter 0
    chain = [torch.empty(64, 32, dtype=torch.bfloat16), torch.empty(16, 64, dtype=torch.bfloat16)]
    c = gs.chain_tiles(chain, 0, [32, 96], BN=16)
    assert c[:4, 6:9].tolist() == [[-1, 0, 0]] * 4 and c[4, 6:9].tolist() == [0, 4, 1]
    assert c[4, 2].item() == 32  # weight 1's x is weight 0's y
    buf = torch.empty(112)
    assert torch.equal(gs._check_tiles(chain, buf, buf, c, n_counters=2), c)
    with pytest.raises(gs.GluonStreamError, match="counter"):
        gs._check_tiles(chain, buf, buf, c, n_counters=1)
    with pytest.raises(gs.GluonStreamError, match="weight index"):
        gs._check_tiles(ws, xs, ys, torch.tensor([[2, 0, 0, 0]]))
    with pytest.raises(gs.GluonStreamError, match="x range"):
        gs._check_tiles(ws, torch.empty(95), ys, t)
    with pytest.raises(gs.GluonStreamError, match="y range"):
        gs._check_tiles(ws, xs, torch.empty(163), t)


def test_launch_without_gpu_raises_clearly():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    w = torch.empty(64, 64, dtype=torch.bfloat16)
    with pytest.raises(gs.GluonStreamError, match="CUDA GPU|gluon"):
        gs.stream_matvec([w], torch.empty(64), torch.empty(64), torch.zeros(1, 4, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("BN,BK,NUM_BUF", [(64, 128, 4), (128, 64, 3)])
def test_stream_matvec_matches_torch(x_dtype, y_dtype, BN, BK, NUM_BUF):
    torch.manual_seed(0)
    dev = "cuda"
    # ragged shapes: N not a multiple of BN, K not a multiple of BK (TMA zero-fills, x is masked)
    shapes = [(512, 256), (200, 136), (64, 1024), (1000, 64)]
    ws = [torch.randn(n, k, device=dev).to(torch.bfloat16) for n, k in shapes]
    x_off, y_off, xo, yo = [], [], 0, 0
    for n, k in shapes:
        x_off.append(xo)
        y_off.append(yo)
        xo, yo = xo + k + 8, yo + n + 3  # gaps between vectors
    xs = torch.randn(xo, device=dev).to(x_dtype)
    ys = torch.full((yo,), float("nan"), device=dev, dtype=y_dtype)
    tiles = gs.make_tiles(ws, x_off, y_off, BN)
    tiles = tiles[torch.randperm(tiles.shape[0])]  # order does not matter: tiles are independent
    gs.stream_matvec(ws, xs, ys, tiles, BN=BN, BK=BK, NUM_BUF=NUM_BUF, num_programs=7)
    torch.cuda.synchronize()
    for (n, k), w, a, b in zip(shapes, ws, x_off, y_off):
        ref = w.float() @ xs[a : a + k].float()
        got = ys[b : b + n].float()
        assert not got.isnan().any(), "rows not written"
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel <= 1e-2, f"W {n}x{k}: rel err {rel:.2e}"
    gaps = torch.ones(yo, dtype=torch.bool, device=dev)
    for (n, _), b in zip(shapes, y_off):
        gaps[b : b + n] = False
    assert ys[gaps].float().isnan().all(), "wrote outside its tiles"


@pytest.mark.gpu
@pytest.mark.parametrize("programs", [3, None], ids=["3-programs", "all-SMs"])
def test_dependent_chain_matches_torch(programs):
    """A chain of 6 matvecs in one launch (each reads the previous one's output, fp32 in one
    buffer): waits and signals order them across programs; twice (counters zeroed per launch)."""
    torch.manual_seed(1)
    dev = "cuda"
    dims = [256, 512, 192, 1024, 128, 384, 256]
    ws = [(torch.randn(n, k, device=dev) / k**0.5).to(torch.bfloat16) for k, n in zip(dims, dims[1:])]
    offs, o = [], dims[0]
    for n in dims[1:]:
        offs.append(o)
        o += n
    buf = torch.full((o,), float("nan"), device=dev)
    counters = torch.zeros(len(ws), dtype=torch.int32, device=dev)
    tiles = gs.chain_tiles(ws, 0, offs, BN=64)
    for _ in range(2):
        buf[: dims[0]] = torch.randn(dims[0], device=dev)
        buf[dims[0] :] = float("nan")
        gs.stream_matvec(ws, buf, buf, tiles, BN=64, BK=128, NUM_BUF=4, num_programs=programs, counters=counters)
        x = buf[: dims[0]].clone()
        for w, off in zip(ws, offs):
            x = w.float() @ x
            got = buf[off : off + w.shape[0]]
            assert not got.isnan().any(), "rows not written"
            assert ((got - x).norm() / x.norm()).item() <= 1e-2
            x = got.clone()  # each step from the kernel's own input: errors do not compound
        assert counters.tolist() == [-(-w.shape[0] // 64) for w in ws]
    launch = gs.prepare_stream_matvec(ws, buf, buf, tiles, num_programs=programs, counters=counters, profile=True)
    launch()
    stamps = launch.stamps()
    assert (stamps > 0).all() and (stamps[:, 1] <= stamps[:, 2]).all() and (stamps[:, 2] <= stamps[:, 3]).all()
    r = gs.prefetch_report(stamps, tiles.shape[0], launch.programs)
    print(r)


@pytest.mark.gpu
def test_a_missing_signal_gives_up_and_the_launch_ends():
    """A tile waiting for a counter nobody raises: the wait gives up (bounded), the kernel ends
    (its ring drained), and stream_matvec raises."""
    dev = "cuda"
    ws = [torch.randn(128, 64, device=dev).to(torch.bfloat16)]
    tiles = gs.make_tiles(ws, [0], [64], BN=64, waits=[(0, 1)])
    buf = torch.randn(192, device=dev)
    with pytest.raises(gs.GluonStreamError, match="gave up"):
        gs.stream_matvec(ws, buf, buf, tiles, counters=torch.zeros(1, dtype=torch.int32, device=dev))
