"""benchmarks/gluon_decode_chain.py --dry-run: on the CPU both backends generate the chain's
kernel (the Gluon one without falling back) and the table names what each runs on."""

import sys
from pathlib import Path

from benchmark_module import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ and examples/ are not installed packages


def test_dry_run_generates_both_kernels(capsys):
    bench = load_benchmark("gluon_decode_chain")
    assert bench.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["gluon"][1] == "gluon" and "descriptors" in lines[2], lines
    assert rows["triton"][1] == "triton", lines
    # the same queue under both backends
    assert rows["gluon"][2] == rows["triton"][2]


def test_chain_model_is_a_chain_of_matvecs():
    bench = load_benchmark("gluon_decode_chain")
    model = bench.Chain(8, 16, 2)
    assert [tuple(m.weight.shape) for m in model.layers] == [(16, 8), (8, 16)] * 2
