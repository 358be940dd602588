"""Fuzzing on the GPU, where SMs really run side by side: random models (tests/test_fuzz.py's
generator) on the real kernel with one worker per SM, each called on fresh inputs and compared
with eager; a mismatch is reduced and saved under tests/fuzz_repros/ (tests/fuzz_campaign.py).

    python -m pytest -m gpu tests/test_gpu_fuzz.py --fuzz-seed 1 --fuzz-budget-s 180 -s

Options (repository conftest.py; or MKCOMPILER_FUZZ_SEED / _MODELS / _BUDGET_S / _JOBS):
--fuzz-seed, --fuzz-models (200), --fuzz-budget-s (no model starts after it), --fuzz-jobs
(processes compiling kernels ahead). The summary is printed (-s or -rP shows it)
and written as JSON to $MKCOMPILER_FUZZ_REPORT, or $OUT/gpu_fuzz.json where $OUT is set.

On the CPU the campaign itself runs too, on three tiny models through the interpreter, and a
planted mismatch must be caught, reduced and saved. Every saved reproducer runs here as a test
of its own, on the GPU and in the interpreter.
"""

import os

import pytest
import torch
import torch.utils._pytree as pytree
from fuzz_campaign import (
    Case,
    Config,
    Prewarmer,
    load_reproducer,
    reproducers,
    run_campaign,
    run_case,
    write_json,
)
from test_fuzz import Program, Step, Value

from mkcompiler.runtime.megakernel import Megakernel

REPRO_DIR = os.environ.get("MKCOMPILER_FUZZ_REPRO_DIR", os.path.join(os.path.dirname(__file__), "fuzz_repros"))
INTERPRETS = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETS, reason="runs the campaign in the Triton interpreter")


@pytest.mark.gpu
@pytest.mark.timeout(1200)  # the campaign stops itself at --fuzz-budget-s (plus reductions)
def test_random_models_match_eager_on_the_gpu(request):
    opt = request.config.getoption
    config = Config(
        seed=opt("--fuzz-seed"),
        models=opt("--fuzz-models"),
        budget_s=opt("--fuzz-budget-s"),
        jobs=opt("--fuzz-jobs"),
        device="cuda",
        repro_dir=REPRO_DIR,
    )
    report = run_campaign(config)
    summary = report.summary()
    print(summary)
    path = os.environ.get("MKCOMPILER_FUZZ_REPORT") or (
        os.path.join(os.environ["OUT"], "gpu_fuzz.json") if os.environ.get("OUT") else None
    )
    if path:
        write_json(report, path)
    assert report.ran > 0, summary
    assert not report.failures, summary
    assert report.counts()["calls"] > 0, summary


# ---- the campaign's own tests, in the interpreter ----


@needs_interpreter
def test_campaign_runs_tiny_models_in_the_interpreter(tmp_path):
    config = Config(seed=7, models=3, calls=2, device="cpu", max_steps=4, max_numel=256, repro_dir=str(tmp_path))
    report = run_campaign(config, log=print)
    summary = report.summary()
    assert report.ran == 3 and not report.stopped_by_budget, summary
    assert not report.failures, summary
    counts = report.counts()
    assert counts["calls"] + counts.get("skipped calls", 0) == 3 * 2, counts
    assert "3 of 3 models ran" in summary and "0 failures" in summary
    assert not os.listdir(tmp_path)  # nothing to reproduce


def _planted_bug(monkeypatch) -> None:
    """Outputs of any megakernel with a matmul come back doubled."""
    real = Megakernel.outputs

    def doubled(mk):
        out = real(mk)
        if any(op.kind == "matmul" for op in mk.graph.ops):
            return pytree.tree_map(lambda t: t * 2 if isinstance(t, torch.Tensor) else t, out)
        return out

    monkeypatch.setattr(Megakernel, "outputs", doubled)


FIVE_STEPS = Case(
    Program(
        inputs=(Value((4, 8), torch.float32),),
        steps=(
            Step("unary", (0,), (("fn", "relu"),)),
            Step("linear", (1,), (("out", 6), ("bias", True))),
            Step("unary", (2,), (("fn", "sin"),)),
            Step("reduce", (3,), (("fn", "sum"), ("keepdim", True))),
            Step("binary", (3, 4), (("fn", "add"),)),
        ),
        outputs=(5,),
    ),
    options=tuple(
        sorted(
            dict(
                num_workers=2,
                schedule="dynamic",
                matmul_tile=(16, 16, 16),
                split_k=2,
                elementwise_block=32,
                row_block=2,
                row_chunk=16,
            ).items()
        )
    ),
    seed=11,
)


@needs_interpreter
def test_planted_mismatch_is_caught_reduced_and_saved(monkeypatch, tmp_path):
    config = Config(seed=3, calls=1, device="cpu", repro_dir=str(tmp_path), reduce_budget_s=300)
    assert run_case(FIVE_STEPS, "cpu", 1).problem is None  # the model itself compiles right
    _planted_bug(monkeypatch)
    report = run_campaign(config, cases=[FIVE_STEPS], log=print)
    assert report.ran == 1 and len(report.failures) == 1, report.summary()
    failure = report.failures[0]
    assert "relative error" in failure.outcome.problem
    # Reduced to the matmul alone, on its input, with the simplest options.
    assert [s.kind for s in failure.reduced.program.steps] == ["linear"], failure.reduced.program
    assert failure.reduced.program.inputs == FIVE_STEPS.program.inputs
    assert failure.reduced.kwargs["split_k"] is None and failure.reduced.kwargs["row_chunk"] == 1024
    assert "1 failures" in report.summary() and failure.path in report.summary()
    # The saved file rebuilds the reduced case, which fails with the bug and passes without it.
    case, problem = load_reproducer(failure.path)
    assert case == failure.reduced and "relative error" in problem
    assert run_case(case, "cpu", 1).problem is not None
    monkeypatch.undo()
    assert run_case(case, "cpu", 1).problem is None


@needs_interpreter
def test_prewarm_processes_compile_cases_ahead():
    """The prewarm pool's processes start (spawned from pytest), unpickle cases and compile them."""
    warm = Prewarmer([FIVE_STEPS], jobs=1, device="cpu")
    try:
        assert warm.futures[0].result(timeout=240) is None
        assert warm.wait(0) and warm.failed == 0
    finally:
        warm.close()
    outcome = run_case(FIVE_STEPS, "cpu", 1, prewarmed=True)  # from the cache the other process filled
    assert outcome.problem is None and outcome.cache == "hit", outcome


# ---- saved reproducers ----


def interpreter_options(case: Case) -> Case:
    """A GPU case's options in the interpreter: its default 4 workers, static only on one."""
    kwargs = case.kwargs
    if "num_workers" not in kwargs:
        return case.with_options(num_workers=1 if kwargs.get("schedule") == "static" else 4)
    return case


@pytest.mark.gpu
@pytest.mark.parametrize("path", reproducers(REPRO_DIR), ids=os.path.basename)
def test_saved_reproducer_on_the_gpu(path):
    case, problem = load_reproducer(path)
    found = run_case(case, "cuda", 3).problem
    assert found is None, f"{path} (saved: {problem}): {found}"


@needs_interpreter
@pytest.mark.parametrize("path", reproducers(REPRO_DIR), ids=os.path.basename)
def test_saved_reproducer_in_the_interpreter(path):
    case, problem = load_reproducer(path)
    found = run_case(interpreter_options(case), "cpu", 2).problem
    assert found is None, f"{path} (saved: {problem}): {found}"
