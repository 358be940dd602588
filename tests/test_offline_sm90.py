"""Offline sm_90 compile of a generated megakernel (CPU only: Triton's compiler and ptxas ship
in the wheel). Catches source that runs in the interpreter but that the compiler refuses, and
register spills at the default configuration (registers are the max over all opcodes)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import mkcompiler
import mkcompiler.passes.tile as tile
from mkcompiler.offline import compile_sm90, format_report
from tests.models import TransformerMLP

DIM, HIDDEN, ROWS = 256, 512, 4


def _source(gpu_dots: bool) -> str:
    """Source of a 2-layer pre-norm MLP in bf16 with default tiles. In the interpreter bf16 dots
    are widened to fp32 (passes/tile.dot_config); `gpu_dots` generates what a GPU would run."""
    torch.manual_seed(0)
    model = TransformerMLP(dim=DIM, hidden=HIDDEN, layers=2).to(torch.bfloat16)
    x = torch.randn(ROWS, DIM, dtype=torch.bfloat16)
    with pytest.MonkeyPatch.context() as mp:
        if gpu_dots:
            mp.setattr(tile, "interpreting", lambda: False)
        mk = mkcompiler.compile(model, (x,))
    assert ("tl.bfloat16, 'tf32'" in mk.source) == gpu_dots  # the matmul's DOT_DT / precision
    return mk.source


def test_mlp_block_compiles_for_sm90_without_spills():
    cases = {"interpreter source": (_source(False), True), "gpu source": (_source(True), True),
             "gpu source, static": (_source(True), False)}
    # Each compile is a subprocess (TRITON_INTERPRET=0): run them side by side.
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {name: pool.submit(compile_sm90, src, num_warps=4, dynamic=dyn) for name, (src, dyn) in cases.items()}
        reports = {name: f.result() for name, f in futures.items()}
    summary = "\n".join(f"{name}: {format_report(r)}" for name, r in reports.items())
    print("\n" + summary)
    for name, r in reports.items():
        assert r["regs"] > 0 and r["ptx_lines"] > 0, summary
        assert r["spilled_bytes"] == 0 and r["local"] == 0, f"{name} spills at num_warps=4:\n{summary}"
        assert r["regs"] <= 255, summary
    assert reports["gpu source"]["shared"] > 0, summary  # bf16 tl.dot stages operands in shared memory
