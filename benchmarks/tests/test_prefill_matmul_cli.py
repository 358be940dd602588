"""benchmarks/prefill_matmul.py without a GPU: its dry run (tiny model in the interpreter)
compiles each variant, checks it against eager, profiles it and writes the JSON and table; the
matmul shapes it times cuBLAS on are the compiled graph's."""

import json
import sys
from pathlib import Path

from benchmark_module import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ and examples/ are not installed packages


pm = load_benchmark("prefill_matmul")


def test_dry_run_measures_every_variant_and_writes_the_table(tmp_path, capsys):
    """Three variants, the first failing to compile: it is reported, the others still run."""
    path = tmp_path / "prefill.json"
    variants = ["--variant", "no_such_option=1", "--variant", "", "--variant", "matmul_tile=(16,16,16)"]
    rc = pm.main(["--dry-run", *variants, "--json", str(path)])
    assert rc == 1  # a variant failed
    result = json.loads(path.read_text())
    bad, default, small = result["variants"]
    assert "no_such_option" in bad["error"]
    assert (default["variant"], small["variant"]) == ("default", "matmul_tile=(16,16,16)")
    assert small["tiles"] == ["(16, 16, 16)"] and default["tiles"] != small["tiles"]
    for row in (default, small):
        assert row["rel_err"] <= 1e-4 and row["instructions"] > 0
        assert row["matmul"]["flops"] > 0 and row["matmul"]["unit"] == "tick"  # no rates from logical ticks
    # tiny: dim 64, 4 heads of 16 and 2 kv heads, FFN 128, vocab 256; 8 tokens
    shapes = result["reference"]["shapes"]
    assert {"8x256x64", "8x128x64", "8x64x128"} <= set(shapes), shapes
    assert "eager" in result["baselines"]
    table = capsys.readouterr().out
    assert "| matmul_tile=(16,16,16) | (16, 16, 16) |" in table and "| eager |" in table
    assert "| no_such_option=1 | " in table


def test_stamps_are_saved_for_stamps_report(tmp_path, capsys):
    """--stamps DIR: each variant's profile as DIR/stamps_<n>.npz, one row per instruction with its
    op and opcode names (stamps_report.py's input), and the profile's summary printed."""
    import numpy as np

    rc = pm.main(["--dry-run", "--variant", "", "--stamps", str(tmp_path), "--baseline-modes", "none"])
    assert rc == 0
    d = np.load(tmp_path / "stamps_0.npz", allow_pickle=True)
    assert d["stamps"].shape[0] == len(d["op_names"]) == len(d["kinds"]) > 0
    assert any(str(k).startswith("matmul") for k in d["kinds"])
    assert "waiting" in capsys.readouterr().out
