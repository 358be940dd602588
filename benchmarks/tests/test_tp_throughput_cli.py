"""benchmarks/tp_throughput.py without a GPU: cases and flags, the peer's scaling, memory
estimates against the models themselves (on the meta device), the per-case table, the time
budget, and the dry run (tiny shapes, 2 ranks in the Triton interpreter, the peer eager on the CPU)."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from benchmark_module import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # examples/ is not an installed package


tt = load_benchmark("tp_throughput")


def test_import_sets_multicast_off_and_does_no_cuda_work():
    assert not torch.cuda.is_initialized()
    for name, value in tt.MULTICAST_OFF.items():
        assert os.environ[name] == value


def test_default_cases_and_flags():
    a = tt.parse_args([])
    assert [c.name for c in a.cases] == ["decode256", "prefill4096", "decode64"]
    assert a.cases[0] == tt.Case("decode256", "decode", 256, 1)
    assert a.cases[1] == tt.Case("prefill4096", "prefill", 1, 4096)
    assert (a.model, a.layers, a.ctx, a.iters, a.warmup) == ("llama-70b", 10, 1024, 20, 3)
    assert a.peer_modes == ["eager", "compile-cg"] and a.time_budget is None and a.prefill_fallback
    a = tt.parse_args(["--cases", "decode64,decode64,prefill512", "--peer-modes", "none", "--time-budget", "480"])
    assert [c.name for c in a.cases] == ["decode64", "prefill512"] and a.peer_modes == [] and a.time_budget == 480
    assert not tt.parse_args(["--no-prefill-fallback"]).prefill_fallback


def test_mixed_cases():
    a = tt.parse_args(["--cases", "decode64, mixed512+64,mixed512+64,mixed1+1"])
    assert [c.name for c in a.cases] == ["decode64", "mixed512+64", "mixed1+1"]
    m = a.cases[1]
    assert m == tt.Case("mixed512+64", "mixed", 64, 1, chunk=512)
    assert (m.step_tokens, m.cache_rows) == (576, 65)
    assert (a.cases[0].step_tokens, a.cases[0].cache_rows, a.cases[0].chunk) == (64, 64, 0)
    p = tt.parse_cases("prefill4096")[0]
    assert (p.step_tokens, p.cache_rows, p.chunk) == (4096, 1, 0)
    assert "mixed" not in tt.DEFAULT_CASES  # the default run stays as it was
    assert tt.dry_case(m) == tt.Case("mixed512+64", "mixed", 1, 1, chunk=8)
    assert tt.dry_case(tt.Case("mixed4+256", "mixed", 256, 1, chunk=4)).step_tokens == 4 + 4
    row = tt.new_row(m, 1024)
    assert (row["kind"], row["batch"], row["tokens"], row["chunk"], row["step_tokens"], row["ctx"]) == (
        "mixed",
        64,
        1,
        512,
        576,
        1024,
    )
    assert tt.new_row(tt.parse_cases("prefill8")[0], 1024)["ctx"] == 0


def test_mixed_inputs():
    from examples.llama import CONFIGS

    case = tt.Case("mixed5+3", "mixed", 3, 1, chunk=5)
    chunk_tok, chunk_pos, dec_tok, dec_pos = tt.case_inputs(CONFIGS["tiny"], case, 1, 10, "cpu", seed=0)
    assert chunk_tok.shape == (1, 5) and dec_tok.shape == (3, 1)
    assert chunk_pos.tolist() == [10, 11, 12, 13, 14] and dec_pos.tolist() == [10, 10, 10]
    again = tt.case_inputs(CONFIGS["tiny"], case, 1, 10, "cpu", seed=0)
    assert torch.equal(again[0], chunk_tok) and torch.equal(again[2], dec_tok)  # seeded: every rank alike


@pytest.mark.parametrize(
    "argv",
    [
        ["--cases", "decode"],
        ["--cases", "prefill0"],
        ["--cases", "train64"],
        ["--cases", ","],
        ["--cases", "mixed512"],
        ["--cases", "mixed0+64"],
        ["--cases", "mixed512+0"],
        ["--cases", "mixed+64"],
        ["--cases", "mixed512+64+1"],
        ["--cases", "mixed512-64"],
        ["--cases", "mixed 512+64"],
        ["--model", "llama-405b"],
        ["--peer-modes", "fast"],
        ["--layers", "0"],
        ["--time-budget", "0"],
    ],
)
def test_bad_flags_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        tt.parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_scaling_is_the_peers():
    assert tt.scaled_ms(35.9 / 8, 10, 80) == pytest.approx(35.9)
    assert tt.tokens_per_s(256, 1, 35.9) == pytest.approx(7131, rel=1e-3)  # the peer README's 7.1k tokens/s
    assert tt.tokens_per_s(1, 4096, 317.0) == pytest.approx(12921, rel=1e-3)  # its 12.9k
    assert tt.max_seq_len(1024, 1) == 1033


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_memory_estimate_counts_the_models_tensors(tp):
    from examples.llama import Llama

    c = tt.llama_config("llama-70b", 2)
    c = type(c)(**{**c.__dict__, "max_batch": 3, "max_seq_len": tt.max_seq_len(1024, 1)})
    est = tt.memory_estimate(c, tp, batch=3, tokens=1, ctx=1024)
    with torch.device("meta"):
        m = Llama(c)
    assert est["weights"] == 2 * sum(p.numel() for p in m.parameters())
    assert est["model_kv_caches"] == 2 * sum(b.numel() for n, b in m.named_buffers() if "cache" in n)
    assert est["mk_shard_kv_caches"] == (0 if tp == 1 else est["model_kv_caches"] * (8 // tp) // 8)
    assert est["total"] == sum(v for k, v in est.items() if k != "total")


@pytest.mark.parametrize("tp", [2, 4])
def test_memory_estimate_of_a_mixed_step(tp):
    """B + 1 cache rows of max_seq_len(ctx, C) in mkcompiler's model; the peer's decode model (B rows)
    and prefill model (1 row) sharing one copy of the weights."""
    from examples.llama import Llama

    B, C, ctx = 3, 16, 1024
    c = tt.llama_config("llama-70b", 2)
    est = tt.memory_estimate(c, tp, batch=B, tokens=1, ctx=ctx, chunk=C)
    c = type(c)(**{**c.__dict__, "max_batch": B + 1, "max_seq_len": tt.max_seq_len(ctx, C)})
    with torch.device("meta"):
        m = Llama(c)
    assert est["model_kv_caches"] == 2 * sum(b.numel() for n, b in m.named_buffers() if "cache" in n)
    assert est["weights"] == tt.memory_estimate(c, tp, batch=B, tokens=1, ctx=ctx)["weights"]


def _row(**ms):
    row = tt.new_row(tt.Case("decode256", "decode", 256, 1), 1024)
    row["ms"] = {k: {"rank0": v * 0.9, "max": v, "ranks": [v * 0.9, v]} for k, v in ms.items()}
    return row


def test_derived_and_the_table():
    row = _row(**{tt.MK_KERNEL: 3.0, tt.MK_CALL: 4.0, "peer eager": 26.0, "peer compile-cg": 4.5})
    row.update(rel_err=0.012, ranks_agree=True, compile_s={"mkcompiler": 40.0})
    row["errors"]["peer compile"] = "rank 1: OutOfMemoryError: CUDA out of memory\nmore"
    d = tt.derived(row, layers=10, depth=80)
    assert d["full_ms"][tt.MK_KERNEL] == pytest.approx(24.0)
    assert d["best_baseline"] == "peer compile-cg"
    assert d["vs_best_baseline"][tt.MK_KERNEL] == pytest.approx(36.0 / 24.0)
    assert d["tokens_per_s"]["peer compile-cg"] == pytest.approx(256 / 0.036)
    meta = dict(model="llama-70b", tp=4, device="H200", layers=10, depth=80, tol=5e-2)
    text = tt.format_case(row, meta)
    lines = text.splitlines()
    assert lines[0].startswith("### decode256: batch 256, 1 token, context 1024 (llama-70b, TP=4, H200; 10 layers")
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + 4 and all(ln.count("|") == table[0].count("|") for ln in table)
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells == ["mkcompiler kernel (`mk.launch()`)", "2.700", "3.000", "24.00", "10,667", "1.50x"]
    assert [c.strip() for c in table[5].strip("|").split("|")][-1] == "1.00x"  # the best baseline itself
    notes = lines[-1]
    assert "1.20e-02" in notes and "ranks agree" in notes and "OutOfMemoryError" in notes and "more" not in notes
    assert "35.9 ms/step" in notes  # the peer's published figure, beside ours
    only_mk = tt.format_case(_row(**{tt.MK_CALL: 1.0}), meta)
    assert "| —" in only_mk and "nan" not in only_mk


def test_the_table_of_a_mixed_step():
    row = tt.new_row(tt.Case("mixed512+64", "mixed", 64, 1, chunk=512), 1024)
    row["ms"] = {
        k: {"rank0": v, "max": v, "ranks": [v]} for k, v in {tt.MK_KERNEL: 10.0, "peer compile-cg": 12.0}.items()
    }
    d = tt.derived(row, layers=10, depth=80)
    assert d["tokens_per_s"][tt.MK_KERNEL] == pytest.approx(576 / 0.080)  # C + B tokens per step
    assert tt.tokens_per_s(64, 1, 80.0, chunk=512) == pytest.approx(576 / 0.080)
    meta = dict(model="llama-70b", tp=4, device="H200", layers=10, depth=80, tol=5e-2)
    lines = tt.format_case(row, meta).splitlines()
    assert lines[0].startswith(
        "### mixed512+64: one step of 576 tokens: a prefill chunk of 512 at positions 1024..1535, "
        "64 decode tokens at context 1024 (llama-70b"
    )
    table = [ln for ln in lines if ln.startswith("|")]
    cells = [c.strip() for c in table[3].strip("|").split("|")]
    assert cells[0] == "peer torch.compile + CUDA graphs (reduce-overhead) (decode 64 + prefill 512, two calls)"
    assert cells[-2:] == ["6,000", "1.00x"]
    assert [c.strip() for c in table[2].strip("|").split("|")][-1] == "1.20x"


def test_budget():
    now = [0.0]
    b = tt.Budget(300, clock=lambda: now[0])
    assert b.fits("build", "mk:decode") and not b.fits("mk:prefill", "peer:compile")
    b.record("mk:decode", 50.0)
    assert b.estimate("mk:decode") == pytest.approx(50.0 * tt.SAFETY)
    now[0] = 250.0
    assert not b.fits("mk:decode") and b.fits("peer:eager")
    assert tt.Budget(None).fits("peer:compile-max-cg") and math.isinf(tt.Budget(None).left())


def test_case_model_shares_weights_and_fills_caches():
    from examples.llama import CONFIGS

    base = tt.build_base(CONFIGS["tiny"], "cpu", seed=0)
    m = tt.case_model(base, batch=3, seq=20, device="cpu", seed=0, last_only=True)
    assert m.layers[0].attn.wq.weight.data_ptr() == base.layers[0].attn.wq.weight.data_ptr()
    k = m.layers[1].attn.v_cache
    assert k.shape == (3, 2, 20, 16) and k.dtype == torch.bfloat16 and k.float().std() > 0.3
    assert m.c.max_seq_len == 20 and base.c.max_seq_len == 8
    k = k.clone()  # the forward below writes its slots
    tok = torch.randint(0, 256, (3, 5))
    with torch.no_grad():
        assert m(tok, torch.arange(5)).shape == (3, 1, 256)  # last position only
    again = tt.case_model(base, batch=3, seq=20, device="cpu", seed=0, last_only=False)
    assert torch.equal(again.layers[1].attn.v_cache, k)  # seeded: the same caches on every rank


def test_dry_run_end_to_end(tmp_path):
    """The whole script, as a subprocess, on tiny shapes: a decode and a prefill case compiled (2
    ranks in the interpreter; --exchange: the prefill's attention outputs exchanged), checked
    against eager, timed, the peer timed eager, tables and JSON written. (All three cases took
    112 s on a 2-core machine: too long for CI.)"""
    out = tmp_path / "dry.json"
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "tp_throughput.py"),
            "--dry-run",
            "--cases",
            "decode64,prefill4096",
            "--json",
            str(out),
            "--exchange",
            "--peer",
            str(tmp_path / "no_peer.py"),  # nothing outside the repository
        ],
        capture_output=True,
        text=True,
        timeout=170,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=str(ROOT),
    )
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["tp"] == 2 and res["N"] == 1 and "commit" in res and res["args"]["dry_run"]
    assert [c["case"] for c in res["cases"]] == ["decode64", "prefill4096"]
    for c in res["cases"]:
        assert c["status"] == "done" and not c["errors"], c["errors"]
        assert c["rel_err"] < 5e-2 and c["ranks_agree"]
        expect = {tt.MK_KERNEL, tt.MK_CALL}
        assert set(c["ms"]) == expect
        assert set(c["derived"]["full_ms"]) == expect
    assert res["cases"][1]["tokens"] == 8  # the dry run's prefill
    assert "post-attention exchange" in " ".join(res["cases"][1]["notes"])  # --exchange (8 rows: exchanged)
    assert "TP=4 decode64" in res["memory_estimates_real_gb"]
    assert res["memory_estimates_real_gb"]["TP=4 decode64"]["weights"] == pytest.approx(21.3, abs=0.1)
    assert r.stdout.count("### decode64") == 2  # when the case ended, and in the summary
    assert "## Summary" in r.stdout
    print(f"dry run took {took:.0f} s")


def test_dry_run_of_a_mixed_step(tmp_path):
    """A mixed case end to end (its dry stand-in: a chunk of 8 and one decoder): MixedStep compiled
    for 2 ranks in the interpreter, checked against eager, timed; the peer's two calls timed."""
    out = tmp_path / "mixed.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "tp_throughput.py"),
            "--dry-run",
            "--cases",
            "mixed8+64",
            "--json",
            str(out),
            "--profile",
            str(tmp_path / "prof"),
            "--peer",
            str(tmp_path / "no_peer.py"),
        ],
        capture_output=True,
        text=True,
        timeout=170,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=str(ROOT),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (c,) = json.loads(out.read_text())["cases"]
    assert c["status"] == "done" and not c["errors"], c["errors"]
    assert (c["case"], c["kind"], c["batch"], c["tokens"], c["chunk"], c["step_tokens"], c["ctx"]) == (
        "mixed8+64",
        "mixed",
        1,
        1,
        8,
        9,
        tt.DRY_CTX,
    )
    assert c["rel_err"] < 5e-2 and c["ranks_agree"]
    assert "profile (dry run: World has no profiled launch)" in c["skipped"]  # --profile: GPUs only
    assert c["mk"]["max_seq_len"] == tt.max_seq_len(tt.DRY_CTX, 8)
    expect = {tt.MK_KERNEL, tt.MK_CALL}
    assert set(c["ms"]) == expect
    for k, ms in c["derived"]["full_ms"].items():
        assert c["derived"]["tokens_per_s"][k] == pytest.approx(9 / (ms / 1e3))
    assert "### mixed8+64: one step of 9 tokens: a prefill chunk of 8 at positions 8..15, 1 decode token" in r.stdout


def test_missing_peer_is_skipped(tmp_path, capsys):
    assert tt.main(["--dry-run", "--no-mk", "--peer", str(tmp_path / "nope.py"), "--cases", "decode64"]) == 0
    out = capsys.readouterr().out
    assert "peer baseline not found" in out and "skipping it" in out


def test_a_prefill_that_does_not_compile_is_retried_with_half_the_tokens(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--dry-run", "--cases", "prefill4096", "--peer-modes", "none", "--opt", "bogus=1", "--json", str(out)]
    assert tt.main(argv) == 1  # the compile error is reported, the run goes on to its end
    row = json.loads(out.read_text())["cases"][0]
    assert row["tokens"] == 4 and any("chunk of 4 tokens" in n for n in row["notes"])
    assert set(row["errors"]) == {"mkcompiler compile (8 tokens)", "mkcompiler compile (4 tokens)"}
    assert "retrying with a chunk of 4 tokens" in capsys.readouterr().out


def test_a_time_budget_too_short_for_a_case_skips_it_saying_so(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert tt.main(["--dry-run", "--time-budget", "5", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stopping: time budget" in text and "not run (time budget): decode256, prefill4096, decode64" in text
    res = json.loads(out.read_text())
    assert res["stopped"].startswith("time budget") and {c["status"] for c in res["cases"]} == {"not run"}
