"""benchmarks/soak.py: a smoke run in the interpreter (the GPU run makes 100,000 calls), and the
verdict's criteria on made-up figures."""

import json
import sys
from argparse import Namespace
from pathlib import Path

from benchmark_module import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ and examples/ are not installed packages


def test_smoke_run_passes_and_writes_its_figures(tmp_path, capsys):
    soak = load_benchmark("soak")
    path = tmp_path / "soak.json"
    argv = ["--launches", "2", "--window", "1", "--warmup", "0", "--max-ratio", "100", "--json", str(path)]
    assert soak.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "SOAK PASS", lines
    r = json.loads(path.read_text())
    assert r["passed"] and r["launches_done"] == 2 and len(r["window_medians_ms"]) == 2
    assert r["err_end"] <= r["tol"]


def test_verdict_names_each_failure():
    soak = load_benchmark("soak")
    args = Namespace(max_ratio=1.10, max_rss_growth_mib=64.0)
    good = dict(
        first_median_ms=0.1, last_median_ms=0.105, cuda_first=10 << 20, cuda_last=10 << 20, rss_first=1 << 30,
        rss_last=(1 << 30) + (1 << 20), err_start=1e-2, err_end=1e-2, tol=5e-2,
    )  # fmt: skip
    assert soak.verdict(good, args) == []
    bad = {**good, "last_median_ms": 0.2, "cuda_last": 20 << 20, "rss_last": 2 << 30, "err_end": float("nan")}
    problems = soak.verdict(bad, args)
    assert [p.split()[0] for p in problems] == ["slowdown", "CUDA", "host", "logits"], problems
    assert soak.verdict({"error": "call 7: MegakernelError: ..."}, args) == ["call 7: MegakernelError: ..."]
