"""Large-M matmul tiles inside the generated Gluon megakernel (backends/gluon/prefill.py, issue 18).

On the CPU: prefill MLPs (M = 256..512, bf16, bias, split-K partials) and a kernel with both decode
and large-M matmuls compile with backend="gluon" onto the Gluon backend (no fallback), offline for
sm_90 with no spills and within Hopper's shared memory; the large-M plan's walks agree and its table
is the loader walk; passes/tile.py gives the Gluon tile; what the tiles refuse is named. On a GPU
(marked gpu): outputs equal eager on fresh inputs over repeated calls, a broken queue raises within
5 s and the next call is correct."""

import time
import warnings

import pytest
import torch
from mkcompiler.ops.matmul import MatmulKey
from mkcompiler.passes.tile import GLUON_LARGE_TILE, matmul_tile
from torch import nn

import mkcompiler
from examples.llama import random_llama
from mkcompiler.backends.gluon import codegen, prefill, tiles
from mkcompiler.ir.layout import Field, WaitField
from mkcompiler.ir.settings import Settings, default_max_spin
from mkcompiler.runtime.gluon import GluonFallbackWarning, GluonMegakernel
from tests.helpers import reference, rel_err

needs_gluon = pytest.mark.skipif(not tiles.HAVE_GLUON, reason="triton.experimental.gluon not importable")
MAX_SHARED = 232448  # Hopper: 227 KiB per CTA


class PrefillMLP(nn.Module):
    """x + down(silu(up(x))) per layer: matmuls and elementwise ops only (no norm: large-M graphs
    keep their norms unfolded, and the Gluon backend has no norm tile)."""

    def __init__(self, dim=256, hidden=512, layers=2, bias=True):
        super().__init__()
        self.ups = nn.ModuleList(nn.Linear(dim, hidden, bias=bias) for _ in range(layers))
        self.downs = nn.ModuleList(nn.Linear(hidden, dim, bias=False) for _ in range(layers))

    def forward(self, x):
        for up, down in zip(self.ups, self.downs):
            x = x + down(nn.functional.silu(up(x)))
        return x


class Mixed(nn.Module):
    """One MLP applied to a prefill chunk (large M) and to one decode row (M = 1), then a head
    on the decode row: both rings in one kernel, the MLP's weights streamed by both."""

    def __init__(self, dim=256, hidden=512):
        super().__init__()
        self.mlp = PrefillMLP(dim, hidden, layers=1)
        self.head = nn.Linear(dim, 384, bias=False)

    def forward(self, big, small):
        return self.mlp(big), self.head(self.mlp(small))


def prefill_mlp(m, hidden=512, device="cpu", seed=0):
    torch.manual_seed(seed)
    model = PrefillMLP(hidden=hidden).to(device, torch.bfloat16)
    return model, (torch.randn(m, 256, dtype=torch.bfloat16, device=device),)


def mixed(device="cpu", seed=0):
    torch.manual_seed(seed)
    model = Mixed().to(device, torch.bfloat16)
    x = (
        torch.randn(256, 256, dtype=torch.bfloat16, device=device),
        torch.randn(1, 256, dtype=torch.bfloat16, device=device),
    )
    return model, x


def compile_gluon(model, inputs, **options):
    """Compiled with backend="gluon"; a fallback to the Triton backend fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", GluonFallbackWarning)
        mk = mkcompiler.compile(model, inputs, backend="gluon", cache=False, **options)
    assert isinstance(mk, GluonMegakernel)
    return mk


CASES = {
    "mlp_m256": lambda: prefill_mlp(256),
    "mlp_m512_split_k": lambda: prefill_mlp(512, hidden=2048),  # down: 4 x 2 tiles, split-K partials
    "mixed_decode_and_prefill": mixed,
}


@pytest.fixture(scope="module", params=sorted(CASES))
def compiled(request):
    model, inputs = CASES[request.param]()
    return request.param, compile_gluon(model, inputs, interpret=False, num_workers=132)


# ---- CPU ----


@needs_gluon
def test_large_m_kernels_compile_for_sm90_without_spills(compiled):
    name, mk = compiled
    k = mk.kernel
    assert k.prefill_groups and k.prefill_buf >= 2
    r = codegen.compile_offline(k, default_max_spin(interpret=False), keep_asm=True)
    print(
        f"\n{name}: sm_90 {r['regs']} regs, {r['spilled_bytes']} B spilled, {r['shared']} B shared, "
        f"setmaxnreg {r['setmaxnreg']}, large-M ring {k.prefill_buf}, decode ring {k.num_buf} x {k.box}"
    )
    assert r["spilled_bytes"] == 0, r["ptxas_log"]
    ring = k.prefill_buf * (128 + 128) * 64 * 2 + k.num_buf * k.box[0] * k.box[1] * 2
    assert ring <= r["shared"] <= MAX_SHARED, r
    ptx = r["ptx"]
    assert "wgmma.mma_async" in ptx and "wgmma.wait_group" in ptx
    assert "fence.proxy.async.global" in ptx  # A's TMA reads after the acquire
    assert "tensormap.replace" in ptx and "fence.proxy.tensormap" in ptx  # A's descriptor, on the device
    assert "ld.global.gpu.acquire" in ptx and "atom.global.gpu.release" in ptx
    profiled = codegen.compile_offline(k, default_max_spin(interpret=False), profile=True)  # mk.profile's variant
    assert profiled["spilled_bytes"] == 0 and profiled["shared"] <= MAX_SHARED, profiled


@needs_gluon
def test_large_m_plan_walks_agree_and_the_table_is_the_loader_walk(compiled):
    _, mk = compiled
    k, q = mk.kernel, mk.queue
    k.prefill_plan.check()
    kinds = [q.opcode_keys[o] for o in q.rows[:, Field.OPCODE]]
    large = [key[0] == "matmul" and prefill.large(key) for key in kinds]
    for p in k.prefill_plan.workers:  # a worker's large-M entries are numbered 0, 1, ... in list order
        pos = 0
        for i in p.instructions:
            blocks = [s.block for s in p.loads if s.instruction == i]
            assert bool(blocks) == large[i]
            if blocks:
                lo, hi = k.ptab[i, prefill.PTAB_K_LO], k.ptab[i, prefill.PTAB_K_HI]
                assert k.ptab[i, prefill.PTAB_POS] == pos and [b.k0 for b in blocks] == list(range(lo, hi, 64))
                group, row, _ = k.prefill_plan.stacks.locate(blocks[0])
                assert k.prefill_groups[k.ptab[i, prefill.PTAB_DESC]] == group and k.ptab[i, prefill.PTAB_ROW] == row
                pos += len(blocks)
    # the decode walk streams no large-M instruction, and the decode table has none
    assert not any(large[s.instruction] for p in k.plan.workers for s in p.loads)
    assert all(k.tma[i, tiles.TMA_K_HI] == 0 for i in range(len(q)) if large[i])


@needs_gluon
def test_split_k_partials_and_shared_weights():
    """The split case writes fp32 partials from large-M tiles; the mixed case streams one stacked
    buffer through both rings (a descriptor per box), its parameters still equal to the module's."""
    model, inputs = prefill_mlp(512, hidden=2048)
    mk = compile_gluon(model, inputs, interpret=False, num_workers=132)
    keys = [k for k in mk.queue.opcode_keys if k[0] == "matmul"]
    assert {k.c for k in keys} == {torch.bfloat16, torch.float32} and all(prefill.large(k) for k in keys)
    model, inputs = mixed()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mk = compile_gluon(model, inputs, interpret=False, num_workers=132)
    assert set(mk.kernel.groups) & set(mk.kernel.prefill_groups)  # streamed by both rings
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    shared = {g: t for g, t in zip(mk.kernel.groups, mk.stacks)}
    for g, t in zip(mk.kernel.prefill_groups, mk.prefill_stacks):
        assert g not in shared or shared[g] is t  # stacked once


def test_tile_choice_follows_the_backend():
    s = Settings(interpret=False)
    assert matmul_tile(256, 4096, 4096, s.replace(backend="gluon")) == GLUON_LARGE_TILE == prefill.TILE
    assert matmul_tile(256, 4096, 4096, s) != GLUON_LARGE_TILE  # the Triton backend keeps its tiles
    assert matmul_tile(1, 4096, 4096, s.replace(backend="gluon")) == matmul_tile(1, 4096, 4096, s)  # decode
    assert matmul_tile(256, 4096, 4096, s.replace(backend="gluon"), half=False) != GLUON_LARGE_TILE


def test_problems_name_what_large_m_tiles_refuse():
    bf, f32 = torch.bfloat16, torch.float32
    units = (True, True, False, True, True, True, True, True)
    ok = MatmulKey("matmul", bf, bf, None, bf, bf, "tf32", GLUON_LARGE_TILE, units, None, True)
    assert codegen._matmul_problem(ok) is None
    assert "tile" in codegen._matmul_problem(ok._replace(tile=(64, 128, 64)))
    assert "operands" in codegen._matmul_problem(ok._replace(a=f32, dot=f32))
    assert "A operand" in codegen._matmul_problem(ok._replace(units=(False, *units[1:])))
    assert "norm" in codegen._matmul_problem(ok._replace(norm=("rms",)))


@needs_gluon
def test_a_tiny_llama_prefill_keeps_only_attention_off_the_backend():
    """Its matmuls (projections, MLP, LM head) and standalone norms are accepted; what sends it to
    the Triton backend is the prefill-attention tile the Gluon backend does not have yet."""
    model = random_llama("tiny", dtype=torch.bfloat16)
    inputs = (torch.randint(0, 256, (1, 32)), torch.arange(32))
    with pytest.warns(GluonFallbackWarning) as caught:
        mk = mkcompiler.compile(model, inputs, backend="gluon", interpret=False, num_workers=132, cache=False)
    # the warning names what the Gluon-tiled graph lacks (the fallback itself is compiled again,
    # with the Triton backend's tiles: no large-M Gluon tile left in its queue)
    why = str(caught[0].message)
    assert "attention" in why and "norm" not in why and "matmul" not in why, why
    assert all(k.tile != GLUON_LARGE_TILE for k in mk.queue.opcode_keys if k[0] == "matmul")


# ---- GPU ----


def error(mk, model, inputs) -> float:
    """The worst relative error of the outputs (one or a tuple) against a float64 eager run."""
    out, ref = mk(*inputs), reference(model, list(inputs))
    pairs = zip(out, ref) if isinstance(out, tuple) else [(out, ref)]
    return max(rel_err(o, r) for o, r in pairs)


def raise_a_wait(mk, instruction: int):
    """Raise one wait row of `instruction` past what its producers signal; returns the good table."""
    good = mk.queue.waits.copy()
    row = int(mk.queue.rows[instruction, Field.WAIT_BEGIN])
    mk.queue.waits[row, WaitField.COUNT] += 1
    mk.upload_queue(check=False)
    return good


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_large_m_tiles_match_eager_and_survive_a_broken_queue(case):
    model, inputs = {"mlp_m256": lambda: prefill_mlp(256, device="cuda"),
                     "mlp_m512_split_k": lambda: prefill_mlp(512, hidden=2048, device="cuda"),
                     "mixed_decode_and_prefill": lambda: mixed("cuda")}[case]()  # fmt: skip
    mk = compile_gluon(model, inputs, max_spin=1 << 16)
    assert mk.kernel.prefill_groups
    for seed in range(3):  # fresh inputs, repeated calls, intermediates poisoned first
        torch.manual_seed(100 + seed)
        fresh = tuple(torch.randn_like(x) for x in inputs)
        mk.poison()
        assert error(mk, model, fresh) <= 3e-2
    # a large-M instruction's wait can never be met: the launch raises, bounded, no hang
    q = mk.queue
    waiting = [i for i in range(len(q)) if q.rows[i, Field.WAIT_END] > q.rows[i, Field.WAIT_BEGIN]]
    keys = [q.opcode_keys[int(q.rows[i, Field.OPCODE])] for i in waiting]
    large = [i for i, key in zip(waiting, keys) if key[0] == "matmul" and prefill.large(key)]
    good = raise_a_wait(mk, large[0])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with pytest.raises(mkcompiler.MegakernelError, match="instruction|counter"):
        mk(*inputs)
    assert time.perf_counter() - t0 < 5.0
    mk.queue.waits[:] = good
    mk.upload_queue()
    fresh = tuple(torch.randn_like(x) for x in inputs)
    assert error(mk, model, fresh) <= 3e-2
