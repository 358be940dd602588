"""`python -m mkcompiler inspect|profile MODULE:FACTORY` on the CPU, run in-process."""

import json
import re
import textwrap

import pytest

from mkcompiler.backends.gluon import tiles
from mkcompiler.tools.cli import main

SECTIONS = [
    "== model",
    "== op graph",
    "== tiling",
    "== schedule",
    "== instruction queue",
    "== generated kernel source",
    "== offline sm_90",
]


def sections(out: str) -> dict[str, str]:
    """Heading -> text under it, checking every heading appears once and in order."""
    starts = []
    for h in SECTIONS:
        assert out.count(h) == 1, f"{h!r} appears {out.count(h)} times"
        starts.append(out.index(h))
    assert starts == sorted(starts), "sections out of order"
    ends = starts[1:] + [len(out)]
    return {h: out[a:b] for h, a, b in zip(SECTIONS, starts, ends)}


def test_inspect_transformer_block_prints_every_section(capsys):
    """The acceptance test: every section, with the offline sm_90 compile (the slow part: one)."""
    # 4 workers (the interpreter's default) everywhere: no split-KV, one attention tile per kv head.
    assert main(["inspect", "examples.factories:transformer_block", "--workers", "4", "--limit", "6"]) == 0
    s = sections(capsys.readouterr().out)
    assert "Megakernel" in s["== model"] and "passes:" in s["== model"]
    graph = s["== op graph"]
    for kind in ("embedding", "matmul", "attention", "scatter", "elementwise"):
        assert f" {kind} " in graph, kind
    assert "norm=FoldedNorm(rms=True" in graph  # RMSNorm: one norm op on every target, folded into the matmul
    assert "1x1x64:float32" in graph and "-> " in graph
    tiling = s["== tiling"]
    attn = next(ln for ln in tiling.splitlines() if ln.split()[:2] == ["scaled_dot_product_attention", "attention"])
    assert "tile=" in attn and attn.split()[3] == "2"  # decode: one tile per kv head (2 query heads each)
    assert re.search(r"mm_\d+\s+matmul\s+tile=\d+x\d+x\d+\s+\d+\s", tiling)
    sched = s["== schedule"]
    assert re.search(r"makespan [\d.]+ us on 4 workers; .* \(efficiency \d+%\)", sched), sched
    assert "no tile waits on another tile of its own op" in sched
    queue = s["== instruction queue"]
    assert "... " in queue and "more instructions" in queue  # --limit 6
    assert len([ln for ln in queue.splitlines() if re.match(r"\s+\d+\s+\d+\s", ln)]) == 6
    assert "def megakernel(" in s["== generated kernel source"] and "@triton.jit" in s["== generated kernel source"]
    offline = s["== offline sm_90"]
    assert re.search(r"sm_90: \d+ regs/thread, \d+ B spilled", offline), offline
    assert "FAILED" not in offline


def test_inspect_factory_file_with_options_and_no_offline(tmp_path, capsys):
    """A .py path, a factory returning compile options, --workers, --no-offline, --limit 0 (all rows)."""
    path = tmp_path / "my_factories.py"
    path.write_text(
        textwrap.dedent(
            """
            import os

            import torch

            def linear():
                torch.manual_seed(0)
                dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
                return torch.nn.Linear(32, 48, device=dev), (torch.randn(2, 32, device=dev),), {"schedule": "static"}
            """
        )
    )
    assert main(["inspect", f"{path}:linear", "--workers", "3", "--no-offline", "--limit", "0"]) == 0
    out = capsys.readouterr().out
    s = sections(out)
    assert "schedule=static" in s["== model"] and "3 workers" in s["== model"]
    assert "2x32:float32" in s["== op graph"] and "2x48:float32" in s["== op graph"]
    assert "skipped (--no-offline)" in s["== offline sm_90"]
    assert "more instructions" not in s["== instruction queue"]
    # 2 x 48 outputs of a 32-long dot product: 2*2*48*32 FLOPs in all (bias add not counted).
    total = next(ln for ln in s["== tiling"].splitlines() if ln.split()[:1] == ["total"])
    assert total.split()[-1] == "6.14k", total


def test_profile_writes_trace_and_gantt(tmp_path, capsys):
    out_dir = tmp_path / "prof"
    assert main(["profile", "examples.factories:mlp", "--out", str(out_dir), "--vm", "--bandwidth", "3350"]) == 0
    out = capsys.readouterr().out
    doc = json.loads((out_dir / "trace.json").read_text())
    ops = [e for e in doc["traceEvents"] if e["ph"] == "X" and e.get("cat") != "wait"]
    n = int(re.search(r"(\d+) of (\d+) instructions", out).group(2))
    assert sorted(e["args"]["instruction"] for e in ops) == list(range(n))
    assert (out_dir / "gantt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for needle in ("reference VM", "per op kind", "matmul", "elementwise", "%BW wall", "idle gaps", "trace.json"):
        assert needle in out, needle


def test_bad_arguments_fail_with_a_message(capsys):
    assert main(["inspect", "examples.factories:no_such_factory", "--no-offline"]) == 2
    assert "has no 'no_such_factory'" in capsys.readouterr().err
    assert main(["inspect", "no_colon"]) == 2
    assert "MODULE:FACTORY" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main([]) == 2 and "inspect MODULE:FACTORY" in capsys.readouterr().out


@pytest.mark.skipif(not tiles.HAVE_GLUON, reason="triton.experimental.gluon not importable")
def test_inspect_a_gluon_kernel_compiles_it_offline(tmp_path, capsys):
    """A factory asking for the Gluon backend, with --gpu-codegen (Gluon runs only on a GPU): the
    offline section compiles the Gluon kernel (its own signature), not the Triton one's."""
    path = tmp_path / "gluon_factory.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from tests.models import TransformerMLP

            def mlp():
                torch.manual_seed(0)
                model = TransformerMLP(dim=256, hidden=512, layers=2).to(torch.bfloat16)
                return model, (torch.randn(1, 256, dtype=torch.bfloat16),), {"backend": "gluon", "cache": False}
            """
        )
    )
    assert main(["inspect", f"{path}:mlp", "--workers", "132", "--gpu-codegen", "--limit", "2"]) == 0
    s = sections(capsys.readouterr().out)
    assert "GluonMegakernel" in s["== model"]
    offline = s["== offline sm_90"]
    assert re.search(r"sm_90 \(Gluon: 4 compute warps and the loaders\): \d+ regs/thread, \d+ B spilled", offline), (
        offline
    )
