"""benchmarks/serve_throughput.py without a GPU: the workload's distributions and arrivals, the
metrics, the flags, and a --tiny run (tiny random Llama on the CPU, eager engine steps)."""

import json
import math

import pytest
from benchmark_module import load_benchmark

st = load_benchmark("serve_throughput")


def test_workload_is_seeded_and_has_the_asked_means():
    a = st.workload(4000, 0, 1000, 256, 128, 0.8, 2048)
    assert a == st.workload(4000, 0, 1000, 256, 128, 0.8, 2048)
    assert a != st.workload(4000, 1, 1000, 256, 128, 0.8, 2048)
    prompt = [len(r.prompt) for r in a]
    out = [r.max_new_tokens for r in a]
    assert abs(sum(prompt) / len(a) - 256) < 256 * 0.06 and abs(sum(out) / len(a) - 128) < 128 * 0.06
    assert all(p >= 1 and o >= 1 and p + o <= 2048 for p, o in zip(prompt, out))
    assert all(0 <= t < 1000 for r in a[:50] for t in r.prompt) and all(r.arrival == 0 for r in a)


def test_poisson_arrivals_have_the_asked_rate():
    a = st.workload(4000, 0, 100, 16, 8, 0.5, 64, rate=20.0)
    times = [r.arrival for r in a]
    assert times == sorted(times) and times[0] > 0
    assert abs(len(a) / times[-1] - 20.0) < 20.0 * 0.06


def test_summary_metrics():
    timings = [st.Timing(0.0, [0.1, 0.2, 0.4]), st.Timing(0.5, [1.0]), st.Timing(0.0, [0.3, 0.35])]
    row = st.summarize("x", timings, 2.0)
    assert (row.requests, row.output_tokens, row.requests_per_s, row.output_tokens_per_s) == (3, 6, 1.5, 3.0)
    assert math.isclose(row.ttft_p50_ms, 300.0) and math.isclose(row.tpot_p50_ms, 100.0)  # tpots: 150, 50
    assert math.isclose(row.tpot_p99_ms, 50 + 0.99 * 100)


def test_flags():
    a = st.parse_args([])
    assert (a.size, a.requests, a.engines, a.rate) == ("llama-3.2-1b", 512, ["mkcompiler", "torch.compile", "hf"], None)
    t = st.parse_args(["--tiny"])
    assert (t.size, t.dtype, t.engines) == ("tiny", "float32", ["eager", "hf"])
    assert st.parse_args(["--tiny", "--engines", "eager"]).engines == ["eager"]
    with pytest.raises(SystemExit):
        st.parse_args(["--engines", "vllm"])


def test_tiny_run_writes_a_row_per_engine(tmp_path, capsys):
    path = tmp_path / "rows.json"
    rows = st.main(["--tiny", "--engines", "eager", "--json", str(path)])
    assert [r.engine for r in rows] == ["eager"]
    want = st.workload(6, 0, 128, 8, 4, 0.8, 32)
    assert rows[0].output_tokens == sum(r.max_new_tokens for r in want)  # every request ran to its length
    assert json.loads(path.read_text())[0]["output_tokens"] == rows[0].output_tokens
    assert "TTFT p50" in capsys.readouterr().out
