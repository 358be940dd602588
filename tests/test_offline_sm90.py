"""Offline sm_90 compile of a generated megakernel (CPU only: Triton's compiler and ptxas ship
in the wheel). Catches source that runs in the interpreter but that the compiler refuses, and
register spills at the default configuration (registers are the max over all opcodes)."""

import functools
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from triton import knobs

import mkcompiler
from mkcompiler.tools.offline import compile_sm90, format_report
from tests.helpers import FOLDED
from tests.models import TransformerMLP

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU-only check (models are built on the CPU, in the interpreter)"
)
DIM, HIDDEN, ROWS = 256, 512, 4


def mlp_source(gpu_dots: bool) -> str:
    """Source of a 2-layer pre-norm MLP in bf16 with default tiles. In the interpreter bf16 dots
    are widened to fp32 (passes/tile.dot_config); `gpu_dots` generates what a GPU would run
    (interpret=False: a Megakernel that is not launched here)."""
    torch.manual_seed(0)
    model = TransformerMLP(dim=DIM, hidden=HIDDEN, layers=2).to(torch.bfloat16)
    x = torch.randn(ROWS, DIM, dtype=torch.bfloat16)
    mk = mkcompiler.compile(model, (x,), interpret=not gpu_dots)
    assert ("tl.bfloat16, 'tf32'" in mk.source) == gpu_dots  # the matmul's DOT_DT and precision
    return mk.source


def test_a_gpu_kernel_generated_without_a_gpu_is_not_launched():
    """interpret=False where Triton interprets: GPU source to read and compile offline; a call says so."""
    x = torch.randn(2, 32)
    mk = mkcompiler.compile(TransformerMLP(dim=32, hidden=64), (x,), interpret=False, cache=False)
    assert not mk.interpret and not mk.launchable and mk.settings.schedule == "static"
    with pytest.raises(mkcompiler.MegakernelError, match="generated for a GPU .* cannot be launched here"):
        mk(x)


def cli_report(source: str, tmp_path, *options: str) -> str:
    """`python -m mkcompiler.tools.offline file`, from a process where TRITON_INTERPRET=1 (it restarts itself)."""
    path = tmp_path / "megakernel.py"
    path.write_text(source)
    cmd = [sys.executable, "-m", "mkcompiler.tools.offline", str(path), *options]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_mlp_block_compiles_for_sm90_without_spills(tmp_path):
    gpu_source, interp_source = mlp_source(gpu_dots=True), mlp_source(gpu_dots=False)
    # Each compile is its own process (TRITON_INTERPRET=0): run both at once.
    with ThreadPoolExecutor(2) as pool:
        gpu = pool.submit(compile_sm90, gpu_source)
        # The interpreter runs its source with atomic waits (runtime: WAIT_MODE 0 when interpreting).
        line = pool.submit(cli_report, interp_source, tmp_path, "--waits=atomic")
        r, line = gpu.result(), line.result()
    summary = f"gpu source: {format_report(r)}\ninterpreter source (CLI): {line}"
    print("\n" + summary)
    assert r["regs"] > 0 and r["ptx_lines"] > 0, summary
    assert r["spilled_bytes"] == 0 and r["local"] == 0, f"spills at the default num_warps:\n{summary}"
    assert r["shared"] > 0, summary  # bf16 tl.dot stages its operands in shared memory
    # The interpreter's source (bf16 dots widened to fp32 FMA dots) never runs on a GPU: it must
    # compile (what the CLI is for), and ptxas may spill a little of it (88 B since its 4-row
    # tiles hold their first weight block across their own wait: Settings.early_weights).
    m = re.match(r"sm_90: (\d+) regs/thread, (\d+) B spilled .* (\d+) B shared", line)
    assert m and int(m.group(2)) <= 128 and int(m.group(1)) > 0, summary


@functools.cache
def llama_sources() -> dict[str, str]:
    """GPU-style sources of a tiny bf16 Llama: prefill (causal attention, prefill tiles) and the
    on-device greedy step (decode attention, KV-cache scatter, argmax, state write-backs), also
    with every stage-removing option (tests/helpers.FOLDED)."""
    from examples.llama import GreedyLoop, random_llama

    model = random_llama("tiny", dtype=torch.bfloat16, max_seq_len=1024)  # long enough for split-KV
    gpu = dict(num_workers=132, interpret=False)
    tokens = torch.randint(0, 256, (1, 128))
    prefill = mkcompiler.compile(model, (tokens, torch.arange(128)), **gpu)
    loop = mkcompiler.compile(GreedyLoop(model, 1, 8), (), **gpu)
    folded = mkcompiler.compile(GreedyLoop(model, 1, 8), (), **gpu, **FOLDED)
    return {
        "prefill": prefill.source,
        "greedy step": loop.source,
        "greedy step, folded stages": folded.source,
    }


def test_llama_kernels_compile_for_sm90_without_spills():
    """Issue 18: the greedy step spilled 96 B at the 255-register cap while every opcode's tile was
    inlined in the dispatch loop (codegen: run_tile)."""
    sources = llama_sources()
    with ThreadPoolExecutor(3) as pool:
        reports = dict(zip(sources, pool.map(compile_sm90, sources.values())))
    summary = "\n".join(f"{k}: {format_report(r)}" for k, r in reports.items())
    print("\n" + summary)
    for r in reports.values():
        assert r["regs"] > 0 and r["spilled_bytes"] == 0 and r["local"] == 0, summary


def test_prefill_warpgroup_mmas_are_not_serialized(tmp_path):
    """The prefill's 64-row dots are wgmma; ptxas serializes those of a function reached through a
    call (C7510), so codegen keeps their tiles in the dispatch loop (codegen.DOT_ROWS)."""
    source = llama_sources()["prefill"]
    assert "def run_tile(" in source  # its elementwise and norm tiles are called
    path = tmp_path / "prefill.py"
    path.write_text(source)
    dump = tmp_path / "dump"
    cmd = [sys.executable, "-m", "mkcompiler.tools.offline", str(path), f"--dump={dump}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ptx = (dump / "megakernel_sm90.ptx").read_text()
    assert "wgmma.mma_async" in ptx
    cmd = [knobs.nvidia.ptxas.path, "-arch=sm_90a", "-v", str(dump / "megakernel_sm90.ptx"), "-o", os.devnull]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "are serialized" not in log.stdout + log.stderr, log.stdout + log.stderr


def decode_mlp_source() -> str:
    """A decode-shaped (one row) bf16 MLP as a GPU would run it."""
    torch.manual_seed(0)
    model = TransformerMLP(dim=DIM, hidden=HIDDEN, layers=1).to(torch.bfloat16)
    x = torch.randn(1, DIM, dtype=torch.bfloat16)
    return mkcompiler.compile(model, (x,), num_workers=132, interpret=False).source


def variant_reports() -> dict[str, dict]:
    source = decode_mlp_source()
    variants = {
        "plain": dict(waits="atomic"),
        "profile": dict(profile=True, waits="atomic"),
        "acquire waits": dict(waits="acquire"),
        "fence waits": dict(waits="fence"),
        "acquire waits, many rows": dict(waits="acquire-many"),  # kernel_lib.wait_many's reductions
    }
    with ThreadPoolExecutor(3) as pool:
        futures = {k: pool.submit(compile_sm90, source, **v) for k, v in variants.items()}
        return {k: f.result() for k, f in futures.items()}


def test_profile_and_wait_variants_compile_for_sm90():
    """The inline-PTX paths (%globaltimer stamps; acquire and fence waits) never run in the
    interpreter: compile them for sm_90 here, beside the plain kernel."""
    reports = variant_reports()
    for name, r in reports.items():
        print(f"\n{name}: {format_report(r)}")
        assert r["regs"] > 0 and r["ptx_lines"] > 0
        assert r["spilled_bytes"] == 0 and r["local"] == 0, f"{name}: {format_report(r)}"
    assert reports["profile"]["profile"] and not reports["plain"]["profile"]
    # The variants' code is really there (constexpr-pruned from the plain kernel).
    assert reports["profile"]["ptx_lines"] > reports["plain"]["ptx_lines"]
    # Settings.waits: each mode compiles (inline PTX: ld.acquire polls, bar.red votes, fences)
    # without spills (above), and is a different kernel from the atomic waits of the plain one.
    for mode in ("acquire", "fence"):
        r = reports[f"{mode} waits"]
        assert r["waits"] == mode, format_report(r)
        assert r["ptx_lines"] != reports["plain"]["ptx_lines"]
    # wait_many only where asked for: more code there (8 B spilled before issue 18's run_tile)
    many = reports["acquire waits, many rows"]
    assert many["ptx_lines"] > reports["acquire waits"]["ptx_lines"], format_report(many)
