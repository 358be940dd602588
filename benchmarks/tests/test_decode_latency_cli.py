"""benchmarks/decode_latency.py without a GPU: the case grid its flags select, the floor
arithmetic, the markdown table, the time budget and the model it builds (tiny, on the CPU)."""

import math
import sys
import warnings
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
    assert grid[0] == ("llama-3.2-1b", 1, 512, "canonical", "triton")
    assert grid[1] == ("llama-3.2-1b", 1, 4096, "canonical", "triton")  # context inner: same-batch cases in a row
    assert grid[-1] == ("llama-3.1-8b", 16, 4096, "canonical", "triton")
    assert {m for m, _, _, _, _ in grid} == {"llama-3.2-1b", "llama-3.1-8b"}
    assert {b for _, b, _, _, _ in grid} == {1, 4, 16}
    assert {c for _, _, c, _, _ in grid} == {512, 4096}
    assert {s for _, _, _, s, _ in grid} == {"canonical"}
    assert {be for _, _, _, _, be in grid} == {"triton"}
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
        ("llama-3.1-8b", 1, 4096, "canonical", "triton"),
        ("llama-3.1-8b", 16, 4096, "canonical", "triton"),
    ]


def test_each_spelling_is_a_case_beside_the_others_of_its_shape():
    argv = ["--models", "llama-3.2-1b", "--batches", "1", "4", "--ctxs", "512", "--spelling", "canonical", "written"]
    assert dl.case_grid(dl.parse_args(argv)) == [
        ("llama-3.2-1b", 1, 512, "canonical", "triton"),
        ("llama-3.2-1b", 1, 512, "written", "triton"),
        ("llama-3.2-1b", 4, 512, "canonical", "triton"),
        ("llama-3.2-1b", 4, 512, "written", "triton"),
    ]
    assert dl.parse_args(["--spelling", "written,written"]).spelling == ["written"]


def test_each_backend_is_a_case_beside_the_others_of_its_shape():
    argv = ["--models", "llama-3.2-1b", "--batches", "1", "--ctxs", "512", "4096", "--spelling", "canonical", "written"]
    args = dl.parse_args([*argv, "--backend", "triton", "gluon"])
    assert dl.case_grid(args) == [
        ("llama-3.2-1b", 1, 512, "canonical", "triton"),
        ("llama-3.2-1b", 1, 512, "canonical", "gluon"),
        ("llama-3.2-1b", 1, 512, "written", "triton"),
        ("llama-3.2-1b", 1, 512, "written", "gluon"),
        ("llama-3.2-1b", 1, 4096, "canonical", "triton"),
        ("llama-3.2-1b", 1, 4096, "canonical", "gluon"),
        ("llama-3.2-1b", 1, 4096, "written", "triton"),
        ("llama-3.2-1b", 1, 4096, "written", "gluon"),
    ]
    # one model and one run of the baselines per (model, batch, ctx, spelling): its backends in a row
    groups = dl.shape_groups(dl.case_rows(args))
    assert [[(r["ctx"], r["spelling"], r["backend"]) for r in g] for g in groups] == [
        [(512, "canonical", "triton"), (512, "canonical", "gluon")],
        [(512, "written", "triton"), (512, "written", "gluon")],
        [(4096, "canonical", "triton"), (4096, "canonical", "gluon")],
        [(4096, "written", "triton"), (4096, "written", "gluon")],
    ]
    assert dl.parse_args([*argv, "--backend", "gluon,triton"]).backend == ["gluon", "triton"]  # the order given
    assert dl.parse_args(["--backend", "gluon", "gluon"]).backend == ["gluon"]
    assert dl.parse_args([]).backend == ["triton"]


def test_backend_names_are_mkcompilers():
    from mkcompiler.ir.settings import BACKENDS
    from mkcompiler.runtime.gluon import GluonMegakernel

    assert dl.BACKENDS == BACKENDS
    assert f"{GluonMegakernel.__module__}.{GluonMegakernel.__qualname__}" == dl.GLUON_MK


def test_opt_backend_is_the_backend_axis_unless_backend_is_given(capsys):
    args = dl.parse_args(["--opt", "backend=gluon", "--opt", "schedule=static"])
    assert args.backend == ["gluon"]
    assert dl.compile_options(args.opt) == {"backend": "gluon", "schedule": "static"}  # run_mkcompiler overrides it
    with pytest.raises(SystemExit) as e:
        dl.parse_args(["--backend", "triton", "gluon", "--opt", "backend=gluon"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--opt backend=gluon and --backend" in err and "--backend only" in err


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
        ["--backend", "cuda"],
        ["--backend", ","],
        ["--opt", "backend=cuda"],
        ["--backend", "triton", "--opt", "backend=triton"],
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
            backend="gluon",
            megakernel=dl.GLUON_MK,
            skipped=["tc:max-autotune-no-cudagraphs (time budget)"],
            errors={"eager": "OutOfMemoryError: CUDA out of memory.\nmore"},
        ),
    ]
    lines = dl.format_table(rows).splitlines()
    assert len(lines) == 4
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:6] == ["model", "batch", "ctx", "spelling", "backend", "floor ms"]
    # implementations in a fixed order whatever order the rows give them in, three columns each
    assert head[6:9] == ["mk call ms", "mk call tok/s", "mk call % floor"]
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
    assert cells["backend"] == "triton"  # a row without one (recorded before --backend)
    assert cells["floor ms"] == "0.850"
    assert cells["mk call ms"] == "3.400" and cells["mk call tok/s"] == "294" and cells["mk call % floor"] == "25.0%"
    assert cells["tc+graphs tok/s"] == "714" and cells["best baseline"] == "tc+graphs"
    assert cells["mk call speed-up"] == "0.41x" and cells["mk kernel speed-up"] == "0.82x"
    assert cells["mk rel err"] == "3.1e-02" and cells["notes"] == ""
    cells = dict(zip(head, (c.strip() for c in lines[3].strip("|").split("|"))))
    assert cells["spelling"] == "written" and cells["backend"] == "gluon"
    assert cells["tc ms"] == "—" and cells["tc % floor"] == "—"  # not measured
    assert cells["mk call tok/s"] == "2000" and cells["mk kernel % floor"] == "160.0%"
    assert cells["best baseline"] == "tc+graphs" and cells["mk call speed-up"] == "1.25x"
    notes = cells["notes"]
    assert "FLAG" in notes and "partial" in notes and "time budget" in notes and "OutOfMemoryError" in notes
    assert "more" not in notes  # first line of an error only
    assert "fell back" not in notes  # the Gluon megakernel ran
    assert lines[3].count("|") == lines[0].count("|")  # no stray pipes from notes


def _backend_rows(baseline_ms: dict, triton_ms: dict, gluon_ms: dict, **gluon_extra) -> list[dict]:
    rows = dl.case_rows(
        dl.parse_args(["--models", "llama-3.2-1b", "--batches", "1", "--ctxs", "512", "--backend", "triton", "gluon"])
    )
    part = dl.baseline_part()
    part["ms"].update(baseline_ms)
    part["floor_ms"] = 1.0
    for row, ms in zip(rows, (triton_ms, gluon_ms)):
        row["ms"].update(ms)
        row["status"] = "done"
    rows[0]["megakernel"] = "mkcompiler.runtime.megakernel.Megakernel"
    rows[1].update(gluon_extra)
    dl.share(part, rows)
    return rows


def test_table_has_a_row_per_backend_with_the_shared_baselines():
    tcg = dl.tc_name("max-autotune")
    rows = _backend_rows(
        {dl.EAGER: 9.0, tcg: 2.0},
        {dl.MK_CALL: 4.0, dl.MK_KERNEL: 2.5},
        {dl.MK_CALL: 1.6, dl.MK_KERNEL: 1.0},
        megakernel=dl.GLUON_MK,
    )
    lines = dl.format_table(rows).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    assert [c["backend"] for c in cells] == ["triton", "gluon"]
    assert head.index("backend") == head.index("spelling") + 1
    for c in cells:  # the same baseline figures in both rows
        assert c["eager ms"] == "9.000" and c["tc+graphs ms"] == "2.000" and c["best baseline"] == "tc+graphs"
    # each row's speed-up against that best baseline
    assert [c["mk call speed-up"] for c in cells] == ["0.50x", "1.25x"]
    assert [c["mk kernel speed-up"] for c in cells] == ["0.80x", "2.00x"]
    assert [c["notes"] for c in cells] == ["", ""]
    assert "backend = " in dl.legend(["max-autotune"])
    assert [dl.case_name(r) for r in rows] == ["llama-3.2-1b b1 ctx512", "llama-3.2-1b b1 ctx512 gluon"]


def test_a_gluon_fallback_is_in_the_row_notes():
    rows = _backend_rows(
        {dl.EAGER: 9.0},
        {dl.MK_CALL: 4.0},
        {dl.MK_CALL: 4.1},
        megakernel="mkcompiler.runtime.megakernel.Megakernel",
        fallback="mkcompiler: backend='gluon' cannot run X; compiling on the Triton backend",
    )
    assert dl.fell_back(rows[1]) and not dl.fell_back(rows[0])
    assert dl.notes_of(rows[1]) == "fell back to triton" and dl.notes_of(rows[0]) == ""
    rows[1]["fallback"] = None  # a Triton megakernel for backend="gluon" without the warning: still a fallback
    assert dl.notes_of(rows[1]) == "fell back to triton"
    rows[1]["megakernel"] = None  # its compile never finished: nothing ran
    assert dl.notes_of(rows[1]) == ""


def test_share_gives_each_row_the_baselines_and_keeps_its_own():
    part = dl.baseline_part()
    part["ms"][dl.EAGER] = 5.0
    part["skipped"].append("tc:max-autotune (time budget)")
    part["errors"]["tc:default"] = "OutOfMemoryError"
    part["floor_ms"] = 0.5
    rows = [dl.new_row("tiny", 1, 8, 2, backend=b) for b in ("triton", "gluon")]
    rows[0]["ms"][dl.MK_CALL] = 1.0
    rows[1]["errors"]["mkcompiler"] = "GluonUnsupported"
    dl.share(part, rows)
    assert rows[0]["ms"] == {dl.MK_CALL: 1.0, dl.EAGER: 5.0} and rows[1]["ms"] == {dl.EAGER: 5.0}
    assert rows[0]["errors"] == {"tc:default": "OutOfMemoryError"}
    assert rows[1]["errors"] == {"mkcompiler": "GluonUnsupported", "tc:default": "OutOfMemoryError"}
    assert all(r["skipped"] == ["tc:max-autotune (time budget)"] and r["floor_ms"] == 0.5 for r in rows)


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


def test_dry_run_lists_each_backend(capsys):
    argv = ["--dry-run", "--models", "llama-3.2-1b", "--batches", "1", "4", "--ctxs", "512"]
    assert dl.main([*argv, "--backend", "triton", "gluon"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("4 cases, 2 shapes") and out[1].split()[3:5] == ["spelling", "backend"]
    rows = [line.split() for line in out[2:]]
    assert [(r[1], r[4]) for r in rows] == [("1", "triton"), ("1", "gluon"), ("4", "triton"), ("4", "gluon")]
    assert rows[0][5:] == rows[1][5:] and rows[2][5:] == rows[3][5:]  # one shape: the same bytes
    assert rows[0][5:] != rows[2][5:]


@pytest.fixture
def cpu_cuda(monkeypatch):
    """What run_shape asks of torch.cuda (memory figures, synchronize), answered on the CPU."""
    for name, value in [
        ("reset_peak_memory_stats", None),
        ("synchronize", None),
        ("max_memory_allocated", 3e9),
        ("memory_allocated", 0),
    ]:
        monkeypatch.setattr(torch.cuda, name, lambda value=value: value)


def test_run_shape_builds_once_and_runs_the_baselines_once(monkeypatch, cpu_cuda):
    """The backends of a shape: one model (the same object for every megakernel and baseline), a
    megakernel per backend, each baseline once, its figures in every row."""
    args = dl.parse_args(
        ["--models", "tiny", "--batches", "1", "--ctxs", "8", "--backend", "triton", "gluon"]
        + ["--baseline-modes", "default", "max-autotune"]
    )
    rows = dl.case_rows(args)
    calls = []
    built = []
    real_build = dl.build_model

    def build(*a, **k):
        built.append(real_build(*a, **k))
        return built[-1]

    def mk(model, tok, ctx, row, args, dev, said):
        calls.append(("mk", row["backend"], model))
        row["ms"][dl.MK_CALL] = {"triton": 2.0, "gluon": 1.0}[row["backend"]]
        row["megakernel"] = dl.GLUON_MK if row["backend"] == "gluon" else "Megakernel"

    def eager(model, tok, pos, row, args):
        calls.append(("eager", None, model))
        row["ms"][dl.EAGER] = 8.0

    def tc(model, tok, pos, mode, row, args):
        calls.append((mode, None, model))
        if mode == "default":
            raise RuntimeError("inductor failed\ndetails")
        row["ms"][dl.tc_name(mode)] = 4.0
        row["compile_s"][dl.tc_name(mode)] = 30.0

    monkeypatch.setattr(dl, "build_model", build)
    monkeypatch.setattr(dl, "run_mkcompiler", mk)
    monkeypatch.setattr(dl, "run_eager", eager)
    monkeypatch.setattr(dl, "run_torch_compile", tc)
    dl.run_shape(rows, args, 1e12, dl.Budget(None), "cpu", set())
    assert len(built) == 1 and all(model is built[0] for *_, model in calls)
    assert [c[:2] for c in calls] == [
        ("mk", "triton"),
        ("mk", "gluon"),
        ("eager", None),
        ("default", None),
        ("max-autotune", None),
    ]
    tcg = dl.tc_name("max-autotune")
    for row in rows:
        assert row["status"] == "done" and row["floor_ms"] > 0 and row["peak_mem_gb"] == 3.0
        assert {k: v for k, v in row["ms"].items() if k != dl.MK_CALL} == {dl.EAGER: 8.0, tcg: 4.0}
        assert row["compile_s"] == {tcg: 30.0} and set(row["errors"]) == {"tc:default"}
        assert {"setup", "mkcompiler", "eager", "tc:max-autotune"} <= set(row["phase_s"])
        assert row["best_baseline"] == tcg
    assert [r["speedup_call"] for r in rows] == [2.0, 4.0]


def test_run_shape_skips_a_later_backend_that_does_not_fit(monkeypatch, cpu_cuda):
    args = dl.parse_args(["--models", "tiny", "--batches", "1", "--ctxs", "8", "--backend", "triton", "gluon"])
    args.no_eager, args.baseline_modes = True, []
    rows = dl.case_rows(args)
    ran = []
    now = [0.0]

    def mk(model, tok, ctx, row, args, dev, said):
        ran.append(row["backend"])
        now[0] += 100.0  # the first backend's compile takes most of the budget

    monkeypatch.setattr(dl, "run_mkcompiler", mk)
    budget = dl.Budget(150, clock=lambda: now[0])
    budget.record("mkcompiler", "tiny", 100.0)  # as if an earlier shape's compile took 100 s
    dl.run_shape(rows, args, 1e12, budget, "cpu", set())
    assert ran == ["triton"]
    assert rows[1]["skipped"] == ["mkcompiler (time budget)"] and rows[0]["skipped"] == []
    assert "skipped mkcompiler (time budget)" in dl.notes_of(rows[1])


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)), torch.randn(2, 32)


@pytest.mark.parametrize("backend", ["triton", "gluon"])
def test_compile_megakernel_on_the_cpu_names_the_class_and_the_fallback(backend):
    """On the CPU (Triton's interpreter) the Gluon backend falls back, with a warning: caught and
    returned, not shown; the Triton megakernel runs and matches eager."""
    from mkcompiler.runtime.gluon import GluonFallbackWarning

    model, x = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GluonFallbackWarning)  # shown would raise here
        mk, fallback = dl.compile_megakernel(model, (x,), {"backend": backend})
    assert dl.class_name(mk) == "mkcompiler.runtime.megakernel.Megakernel" != dl.GLUON_MK
    if backend == "gluon":
        assert "backend='gluon' cannot run Triton's interpreter" in fallback
    else:
        assert fallback is None
    with torch.no_grad():
        torch.testing.assert_close(mk(x), model(x), rtol=1e-4, atol=1e-5)


def test_compile_megakernel_shows_other_warnings(monkeypatch):
    import mkcompiler
    from mkcompiler.runtime.gluon import GluonFallbackWarning

    def compile_(model, inputs, **options):
        assert options == {"backend": "gluon", "schedule": "static"}
        warnings.warn("something else", UserWarning, stacklevel=2)
        warnings.warn("first reason", GluonFallbackWarning, stacklevel=2)
        warnings.warn("second reason", GluonFallbackWarning, stacklevel=2)
        return "mk"

    monkeypatch.setattr(mkcompiler, "compile", compile_)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert dl.compile_megakernel(None, (), {"backend": "gluon", "schedule": "static"}) == (
            "mk",
            "first reason; second reason",
        )
    assert [(w.category, str(w.message)) for w in shown] == [(UserWarning, "something else")]


def test_compile_options_parse_literals():
    args = dl.parse_args(["--opt", "schedule=dynamic", "--opt", "num_warps=4", "--opt", "matmul_tile=(16, 64, 256)"])
    assert dl.compile_options(args.opt) == {"schedule": "dynamic", "num_warps": 4, "matmul_tile": (16, 64, 256)}
    with pytest.raises(SystemExit, match="K=V"):
        dl.compile_options(["schedule"])


@pytest.mark.gpu
def test_both_backends_run_side_by_side_on_a_gpu(tmp_path, capsys):
    """One process, a tiny Llama on both backends: a row each, the eager baseline measured once and
    shown in both, each megakernel checked against eager, the class that ran recorded (a Gluon
    fallback in the row and its notes)."""
    import json

    path = tmp_path / "decode.json"
    argv = ["--models", "tiny", "--batches", "1", "--ctxs", "16", "--backend", "triton", "gluon"]
    argv += ["--no-torch-compile", "--warmup", "2", "--rep", "10", "--json", str(path)]
    assert dl.main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(path.read_text())["cases"]
    assert [(r["backend"], r["status"]) for r in rows] == [("triton", "done"), ("gluon", "done")]
    assert rows[0]["megakernel"] == "mkcompiler.runtime.megakernel.Megakernel" and rows[0]["fallback"] is None
    assert (rows[1]["megakernel"] == dl.GLUON_MK) != bool(rows[1]["fallback"])
    assert rows[0]["ms"][dl.EAGER] == rows[1]["ms"][dl.EAGER] and out.count("  eager ") == 1
    for r in rows:
        assert r["max_rel_err"] <= dl.TOL and r["ms"][dl.MK_CALL] > 0 and not r["errors"]
    assert ("fell back to triton" in out) == bool(rows[1]["fallback"])


def test_fp32_twin_is_the_model_and_its_caches_in_fp32():
    """--fp32-ref's reference: the same weights and cache contents in fp32, the original untouched;
    its logits are closer to bf16 eager's than bf16 noise allows them to differ."""
    model = dl.build_model("tiny", batch=1, ctx=8, steps=2, device="cpu")
    exact = dl.fp32_twin(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in exact.parameters()} == {torch.float32}
    k, k32 = model.layers[0].attn.k_cache, exact.layers[0].attn.k_cache
    assert k32.dtype == torch.float32 and torch.equal(k32, k.float()) and k32.data_ptr() != k.data_ptr()
    tok, pos = torch.tensor([[3]]), torch.tensor([8])
    with torch.no_grad():
        err = dl.rel(model(tok, pos).float(), exact(tok, pos).double())
    assert 0 < err < 3e-2


def test_fp32_ref_flag():
    assert dl.parse_args(["--fp32-ref"]).fp32_ref and not dl.parse_args([]).fp32_ref
