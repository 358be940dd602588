"""benchmarks/stamps_report.py on made-up stamps: per-opcode medians, and the slow tiles of an op
with the workers that ran them (the half-rate group that session 13 found by hand)."""

import numpy as np
from benchmark_module import load_benchmark


def made_up_stamps(path):
    """40 tiles of mm_1 (workers 0..39, 10 us each, workers 30..33 at 25 us) and 2 adds (2 us)."""
    rows, names, kinds = [], [], []
    t = 1_000_000
    for w in range(40):
        us = 25 if 30 <= w < 34 else 10
        rows.append((w, t, t + 500, t + 500 + us * 1000))
        names.append("mm_1")
        kinds.append("matmul#1")
    for w in range(2):
        rows.append((w, t, t + 100, t + 2100))
        names.append("add_1")
        kinds.append("ew_add#2")
    np.savez_compressed(
        path, stamps=np.array(rows, dtype=np.int64), op_names=np.array(names), kinds=np.array(kinds),
        descs=np.array(names),
    )  # fmt: skip


def test_kind_medians_and_slow_tiles(tmp_path):
    report = load_benchmark("stamps_report")
    path = tmp_path / "stamps.npz"
    made_up_stamps(path)
    medians = report.kind_medians(str(path))
    assert medians[1].split() == ["matmul#1", "40", "10.00"] and medians[2].split() == ["ew_add#2", "2", "2.00"]
    (line,) = report.slow_tiles(str(path))
    assert line.startswith("mm_1: 4 of 40 tiles > 1.6 x median 10.00 us (max 25.00)"), line
    assert line.endswith("workers [30, 31, 32, 33]"), line
    assert report.slow_tiles(str(path), factor=3.0) == ["no op has tiles slower than 3.0 x its median"]
