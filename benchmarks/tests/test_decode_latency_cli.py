"""benchmarks/decode_latency.py without a GPU: the case grid its flags select, the floor
arithmetic, the markdown table, the time budget and the model it builds (tiny, on the CPU)."""

import math
import sys
from pathlib import Path

import pytest
import torch
from benchmark_module import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # examples/ is not an installed package
from examples.llama import CONFIGS, random_llama  # noqa: E402

dl = load_benchmark("decode_latency")


def test_import_does_no_cuda_work():
    assert not torch.cuda.is_initialized()


def test_default_grid_is_both_models_three_batches_two_contexts():
    args = dl.parse_args([])
    grid = dl.case_grid(args)
    assert len(grid) == 12
    assert grid[0] == ("llama-3.2-1b", 1, 512, "canonical")
    assert grid[1] == ("llama-3.2-1b", 1, 4096, "canonical")  # context inner: same-batch cases in a row
    assert grid[-1] == ("llama-3.1-8b", 16, 4096, "canonical")
    assert {m for m, _, _, _ in grid} == {"llama-3.2-1b", "llama-3.1-8b"}
    assert {b for _, b, _, _ in grid} == {1, 4, 16}
    assert {c for _, _, c, _ in grid} == {512, 4096}
    assert {s for _, _, _, s in grid} == {"canonical"}
    assert args.baseline_modes == ["max-autotune-no-cudagraphs", "max-autotune"]
    assert args.steps_check == 2 and args.time_budget is None and args.json is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--models", "llama-3.1-8b", "--batches", "1", "16", "--ctxs", "4096"],
        ["--models", "llama-3.1-8b", "--batches", "1,16", "--ctxs", "4096"],
        ["--models=llama-3.1-8b", "--batches", "1,", "16,1", "--ctxs", "4096"],  # repeats dropped
    ],
)
def test_flags_restrict_the_grid(argv):
    assert dl.case_grid(dl.parse_args(argv)) == [
        ("llama-3.1-8b", 1, 4096, "canonical"),
        ("llama-3.1-8b", 16, 4096, "canonical"),
    ]


def test_each_spelling_is_a_case_beside_the_others_of_its_shape():
    argv = ["--models", "llama-3.2-1b", "--batches", "1", "4", "--ctxs", "512", "--spelling", "canonical", "written"]
    assert dl.case_grid(dl.parse_args(argv)) == [
        ("llama-3.2-1b", 1, 512, "canonical"),
        ("llama-3.2-1b", 1, 512, "written"),
        ("llama-3.2-1b", 4, 512, "canonical"),
        ("llama-3.2-1b", 4, 512, "written"),
    ]
    assert dl.parse_args(["--spelling", "written,written"]).spelling == ["written"]


def test_other_flags():
    args = dl.parse_args(
        ["--steps-check", "5", "--json", "out.json", "--time-budget", "540", "--baseline-modes", "max-autotune"]
    )
    assert (args.steps_check, args.json, args.time_budget, args.baseline_modes) == (
        5,
        "out.json",
        540.0,
        ["max-autotune"],
    )
    assert dl.parse_args(["--no-torch-compile"]).baseline_modes == []
    assert dl.parse_args(["--baseline-modes", "none"]).baseline_modes == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--models", "llama-70b"],
        ["--batches", "0"],
        ["--batches", "two"],
        ["--ctxs", ","],
        ["--baseline-modes", "fast"],
        ["--steps-check", "-1"],
        ["--time-budget", "0"],
        ["--spelling", "interleaved"],
    ],
)
def test_bad_flags_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        dl.parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_floor_ms():
    assert dl.floor_ms(3e9, 0, 3e12) == pytest.approx(1.0)
    assert dl.floor_ms(2e9, 1e9, 1.5e12) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        dl.floor_ms(1, 1, 0)


@pytest.mark.parametrize("name", ["tiny", "llama-3.2-1b", "llama-3.1-8b"])
def test_param_count_matches_the_model(name):
    with torch.device("meta"):  # shapes only: nothing allocated
        from examples.llama import Llama

        model = Llama(CONFIGS[name])
    assert dl.param_count(CONFIGS[name]) == sum(p.numel() for p in model.parameters())


def test_bytes_read():
    c = CONFIGS["llama-3.2-1b"]  # 16 layers, 8 KV heads of 64, dim 2048, vocab 128256
    assert dl.kv_bytes_read(c, batch=1, ctx=512) == 2 * 16 * 1 * 8 * 513 * 64 * 2
    assert dl.kv_bytes_read(c, batch=16, ctx=4096) == 16 * dl.kv_bytes_read(c, batch=1, ctx=4096)
    assert dl.kv_bytes_allocated(c, batch=1, max_seq_len=515) == 2 * 16 * 8 * 515 * 64 * 2
    total = dl.param_count(c) * 2
    embed = c.vocab_size * c.dim * 2
    assert dl.weight_bytes_read(c, batch=4) == total - embed + 4 * c.dim * 2
    assert 2.4e9 < dl.weight_bytes_read(c, batch=1) < 2.5e9
    assert 15.0e9 < dl.weight_bytes_read(CONFIGS["llama-3.1-8b"], batch=1) < 15.1e9


def _row(model, batch, ctx, floor, ms, **extra):
    return dict(model=model, batch=batch, ctx=ctx, floor_ms=floor, ms=ms, **extra)


def test_metrics():
    row = _row(
        "llama-3.2-1b",
        4,
        512,
        1.0,
        {dl.MK_CALL: 2.0, dl.MK_KERNEL: 1.6, dl.EAGER: 8.0, dl.tc_name("max-autotune"): 1.2},
    )
    m = dl.metrics(row)
    assert m["tokens_per_s"][dl.MK_CALL] == pytest.approx(2000.0)  # 4 / 2 ms * 1000
    assert m["pct_floor"][dl.MK_KERNEL] == pytest.approx(62.5)
    assert m["best_baseline"] == dl.tc_name("max-autotune") and m["best_baseline_ms"] == 1.2
    assert m["speedup_call"] == pytest.approx(0.6) and m["speedup_kernel"] == pytest.approx(0.75)
    only_mk = dl.metrics(_row("x", 1, 1, None, {dl.MK_CALL: 1.0}))
    assert only_mk["best_baseline"] is None and only_mk["speedup_call"] is None and only_mk["pct_floor"] == {}


def test_format_table():
    tc, tcg = dl.tc_name("max-autotune-no-cudagraphs"), dl.tc_name("max-autotune")
    rows = [
        _row(
            "llama-3.2-1b",
            1,
            512,
            0.85,
            {dl.MK_CALL: 3.4, dl.MK_KERNEL: 1.7, dl.EAGER: 9.0, tc: 2.4, tcg: 1.4},
            max_rel_err=0.031,
            status="done",
        ),
        _row(
            "llama-3.1-8b",
            16,
            4096,
            8.0,
            {tcg: 10.0, dl.EAGER: 20.0, dl.MK_CALL: 8.0, dl.MK_KERNEL: 5.0},
            max_rel_err=0.07,
            tol_exceeded=True,
            status="partial",
            spelling="written",
            skipped=["tc:max-autotune-no-cudagraphs (time budget)"],
            errors={"eager": "OutOfMemoryError: CUDA out of memory.\nmore"},
        ),
    ]
    lines = dl.format_table(rows).splitlines()
    assert len(lines) == 4
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:5] == ["model", "batch", "ctx", "spelling", "floor ms"]
    # implementations in a fixed order whatever order the rows give them in, three columns each
    assert head[5:8] == ["mk call ms", "mk call tok/s", "mk call % floor"]
    assert [h[: -len(" ms")] for h in head if h.endswith(" ms") and h != "floor ms"] == [
        "mk call",
        "mk kernel",
        "eager",
        "tc",
        "tc+graphs",
    ]
    assert head[-5:] == ["best baseline", "mk call speed-up", "mk kernel speed-up", "mk rel err", "notes"]
    assert set(lines[1].strip("|").split("|")) == {"---"} and lines[1].count("|") == lines[0].count("|")
    cells = dict(zip(head, (c.strip() for c in lines[2].strip("|").split("|"))))
    assert cells["model"] == "llama-3.2-1b" and cells["batch"] == "1" and cells["ctx"] == "512"
    assert cells["spelling"] == "canonical"  # a row without one (recorded before --spelling)
    assert cells["floor ms"] == "0.850"
    assert cells["mk call ms"] == "3.400" and cells["mk call tok/s"] == "294" and cells["mk call % floor"] == "25.0%"
    assert cells["tc+graphs tok/s"] == "714" and cells["best baseline"] == "tc+graphs"
    assert cells["mk call speed-up"] == "0.41x" and cells["mk kernel speed-up"] == "0.82x"
    assert cells["mk rel err"] == "3.1e-02" and cells["notes"] == ""
    cells = dict(zip(head, (c.strip() for c in lines[3].strip("|").split("|"))))
    assert cells["spelling"] == "written"
    assert cells["tc ms"] == "—" and cells["tc % floor"] == "—"  # not measured
    assert cells["mk call tok/s"] == "2000" and cells["mk kernel % floor"] == "160.0%"
    assert cells["best baseline"] == "tc+graphs" and cells["mk call speed-up"] == "1.25x"
    notes = cells["notes"]
    assert "FLAG" in notes and "partial" in notes and "time budget" in notes and "OutOfMemoryError" in notes
    assert "more" not in notes  # first line of an error only
    assert lines[3].count("|") == lines[0].count("|")  # no stray pipes from notes


def test_budget_skips_what_does_not_fit():
    now = [0.0]
    b = dl.Budget(300, clock=lambda: now[0])
    assert b.fits("setup", "mkcompiler", model="m")  # guesses 20 + 120 s, 10 s kept free
    now[0] = 200.0
    assert not b.fits("setup", "mkcompiler", model="m")
    assert b.fits("eager", model="m")
    b.record("tc:max-autotune", "m", 50.0)
    assert b.estimate("tc:max-autotune", "m") == pytest.approx(50.0 * dl.SAFETY)
    assert b.estimate("tc:max-autotune", "other") == pytest.approx(dl.DEFAULT_ESTIMATES["tc"])  # guess is larger
    assert b.fits("tc:max-autotune", model="m") and not b.fits("tc:max-autotune", model="other")
    assert dl.Budget(None).fits("tc:max-autotune", model="m") and math.isinf(dl.Budget(None).left())


def test_build_model_on_cpu():
    old = torch.get_default_dtype()
    model = dl.build_model("tiny", batch=2, ctx=8, steps=3, device="cpu")
    assert torch.get_default_dtype() == old
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    k = model.layers[0].attn.k_cache
    c = CONFIGS["tiny"]
    assert k.shape == (2, c.n_kv_heads, 8 + 3 + 1, c.head_dim) and k.dtype == torch.bfloat16
    assert k.float().std() > 0.3  # filled with random values, not zeros
    ref = random_llama("tiny", max_seq_len=12, max_batch=2)
    assert model.inv_freq.dtype == torch.bfloat16
    torch.testing.assert_close(model.inv_freq.float(), ref.inv_freq.to(torch.bfloat16).float())


def test_build_model_spellings_share_weights_and_caches():
    """Two spellings of one case: the same parameters and caches, the same logits (bf16)."""
    models = {
        sp: dl.build_model("tiny", batch=1, ctx=8, steps=2, device="cpu", spelling=sp)
        for sp in ("canonical", "written")
    }
    assert models["written"].c.spelling == "written" and models["canonical"].c.spelling == "canonical"
    canonical, written = models["canonical"].state_dict(), models["written"].state_dict()
    assert canonical.keys() == written.keys() and all(torch.equal(canonical[k], written[k]) for k in canonical)
    assert torch.equal(models["canonical"].layers[1].attn.k_cache, models["written"].layers[1].attn.k_cache)
    tok, pos = torch.tensor([[3]]), torch.tensor([8])
    with torch.no_grad():
        got, want = (models[sp](tok, pos).float() for sp in ("written", "canonical"))
    assert dl.rel(got, want) < 3e-2


def test_dry_run_needs_no_gpu(capsys):
    assert dl.main(["--dry-run", "--models", "llama-3.1-8b", "--batches", "16", "--ctxs", "4096"]) == 0
    out = capsys.readouterr().out
    assert "1 cases" in out and "llama-3.1-8b" in out and "8.592" in out  # KV read GB


def test_dry_run_lists_each_spelling(capsys):
    argv = [
        "--dry-run",
        "--models",
        "llama-3.2-1b",
        "--batches",
        "1",
        "--ctxs",
        "512",
        "--spelling",
        "canonical",
        "written",
    ]
    assert dl.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert "2 cases" in out[0] and "spelling" in out[1]
    rows = [line.split() for line in out[2:]]
    assert [r[3] for r in rows] == ["canonical", "written"]
    assert rows[0][4:] == rows[1][4:]  # the same model: the same bytes


def test_compile_options_parse_literals():
    args = dl.parse_args(["--opt", "schedule=dynamic", "--opt", "num_warps=4", "--opt", "matmul_tile=(16, 64, 256)"])
    assert dl.compile_options(args.opt) == {"schedule": "dynamic", "num_warps": 4, "matmul_tile": (16, 64, 256)}
    with pytest.raises(SystemExit, match="K=V"):
        dl.compile_options(["schedule"])
