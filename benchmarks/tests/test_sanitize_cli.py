"""benchmarks/sanitize.sh and sanitize_models.py on the CPU: the models run in the interpreter,
a wrong kernel is reported, and the script's verdict comes from memcheck's ERROR SUMMARY (a
stand-in for compute-sanitizer here: the real one needs a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from benchmark_module import load_benchmark

from mkcompiler.runtime.megakernel import Megakernel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ and examples/ are not installed packages

FAKE_SANITIZER = """#!/usr/bin/env bash
# stands in for compute-sanitizer: runs the program after the options, then prints memcheck's summary
while [[ $# -gt 0 && "$1" != python3 ]]; do shift; done
"$@"; rc=$?
echo "========= ERROR SUMMARY: ${FAKE_ERRORS:-0} errors"
exit $rc
"""


def test_tiny_llama_decode_check_runs_in_the_interpreter():
    sm = load_benchmark("sanitize_models")
    assert sm.run_check(sm.Check("tiny", sm.llama(torch.float32, None)), "cpu", 1, {}) is None


def test_wrong_outputs_are_reported(monkeypatch, capsys):
    sm = load_benchmark("sanitize_models")
    real = Megakernel.outputs
    monkeypatch.setattr(Megakernel, "outputs", lambda mk: pytree.tree_map(lambda t: t * 2, real(mk)))
    assert sm.main(["--only", "ResidualMLP(3, 32) float32 dynamic", "--fuzz", "0", "--calls", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL ResidualMLP(3, 32) float32 dynamic" in out and "sanitize models: 0 ok, 1 failed" in out


def test_script_passes_on_a_clean_summary_and_fails_on_errors(tmp_path):
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    env = dict(os.environ, COMPUTE_SANITIZER=str(fake), OUT=str(tmp_path / "out"))
    args = [
        "bash",
        "benchmarks/sanitize.sh",
        "--fuzz",
        "1",
        "--calls",
        "1",
        "--only",
        "ResidualMLP(3, 32) float32 dynamic",
    ]
    clean = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = clean.stdout.strip().splitlines()
    assert clean.returncode == 0 and lines[-1].startswith("MEMCHECK PASS: 1 models, 0 errors"), clean.stdout
    assert "========= ERROR SUMMARY: 0 errors" in lines
    assert (tmp_path / "out" / "memcheck.log").exists()
    dirty = subprocess.run(args, cwd=ROOT, env={**env, "FAKE_ERRORS": "2"}, capture_output=True, text=True, timeout=300)
    assert dirty.returncode == 1 and dirty.stdout.strip().splitlines()[-1].startswith("MEMCHECK FAIL"), dirty.stdout
    missing = subprocess.run(
        args, cwd=ROOT, env={**env, "COMPUTE_SANITIZER": str(tmp_path / "none")}, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "MEMCHECK SKIP" in missing.stdout
