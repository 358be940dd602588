"""benchmarks/decode_stages.py: the longest dependency chain of a decode step per variant (CPU),
on GPU-faithful sources; the stage-removing options shorten it."""

import re
import sys
from pathlib import Path

from benchmark_module import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ and examples/ are not installed packages


def test_stage_removing_options_shorten_the_chain(capsys):
    fewer = "split_k=2 split_kv=2"  # norms folded into the matmuls (fuse_norm, a default)
    ds = load_benchmark("decode_stages")
    assert ds.main(["--model", "tiny", "--ctx", "40", "--workers", "8", "--variant", "split_k=2 split_kv=2 fuse_norm=False",
                    "--variant", fewer]) == 0  # fmt: skip
    rows = re.findall(r"^\| (.+?) \| (\d+) \| (\d+) \| ([\d.]+) \|$", capsys.readouterr().out, re.M)
    (_, _, base, _), (name, _, shorter, _) = rows
    assert name == fewer and int(shorter) < int(base), rows
