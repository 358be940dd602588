"""The fuzz campaign of tests/test_gpu_fuzz.py as a library: random models from tests/test_fuzz.py's
generator, compiled, called on fresh inputs and compared with eager; failures reduced to small
reproducers saved as files; a report of what ran.

    report = run_campaign(Config(seed=0, models=200, budget_s=240, device="cuda", jobs=8))
    print(report.summary())

A case is a Program (test_fuzz.py), its compile options and the seed of its parameters and
inputs. Cases are drawn from the seed with hypothesis (the same strategies as the CPU fuzz, so
the same op kinds, ragged shapes, dtype modes and compile options), deduplicated, in a fixed
order. On a GPU every case runs on the device's default worker count (one per SM); in the
interpreter with the CPU fuzz's kernel options (1-4 workers, dynamic when more than one).

Each case: compile, then `calls` calls, each on fresh random inputs with outputs poisoned
first; every output within test_fuzz.mismatches' tolerance of the float64 reference. Inputs
whose eager or exact result overflows are skipped (the CPU fuzz rejects them too). An
exception anywhere (compile, launch, wait timeout) is a failure. A failing case is reduced
(reduce_case: smaller programs, simpler options, kept while it still fails) and saved under
Config.repro_dir, one Python file per failure (save_reproducer, load_reproducer).

Compile time dominates on a GPU: a small megakernel's Triton compile takes about a second of
one CPU core, the passes a few tenths, the calls milliseconds. With Config.jobs > 0, other
processes (spawned, one CUDA context each, nothing launched) compile the next cases' kernels
ahead (Prewarmer): the main process then finds them in Triton's and mkcompiler's on-disk caches
and pays only the cache loads. That is a speed-up only: the main process compiles every case
itself, so a prewarm that fails or is late changes no result.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import random
import runpy
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from test_fuzz import (
    DTYPE_MODES,
    FuzzModel,
    Program,
    Step,
    Value,
    compile_options,
    exact_twin,
    meta_value,
    mismatches,
    moderate,
    programs,
    random_inputs,
    references,
)

import mkcompiler

# Options a reduction tries instead of the drawn ones, in this order (None: the default).
SIMPLER_OPTIONS = (("split_k", None), ("row_chunk", 1024), ("row_block", 4), ("elementwise_block", None))
REPRO_HEADER = '"""GPU fuzz reproducer'
FATAL = ("CUDA error", "illegal memory access", "unspecified launch failure")  # the context is gone


class DeviceLost(RuntimeError):
    """A CUDA error that leaves the process's context unusable: nothing more can run."""


def fatal(problem: str) -> bool:
    return any(s in problem for s in FATAL)


@dataclass(frozen=True)
class Case:
    """One fuzzed model: the program, its compile options (sorted items) and the seed of its
    parameters (the seed) and inputs (seed + 1 + call)."""

    program: Program
    options: tuple[tuple[str, object], ...]
    seed: int

    @property
    def kwargs(self) -> dict:
        return dict(self.options)

    def with_options(self, **changes) -> Case:
        return replace(self, options=tuple(sorted({**self.kwargs, **changes}.items())))


@dataclass(frozen=True)
class Config:
    seed: int = 0
    models: int = 200  # cases to draw; the campaign stops earlier at budget_s
    budget_s: float = 240.0  # no new case starts after this (reductions have their own budget)
    calls: int = 3  # calls per case, each on fresh inputs
    device: str = "cuda"  # "cpu": the Triton interpreter
    jobs: int = 0  # prewarm processes (GPU only; 0: none)
    max_steps: int = 8  # program size (test_fuzz.programs)
    max_numel: int = 4096
    reduce_failures: int = 2  # failures reduced and saved (later ones are only reported)
    reduce_budget_s: float = 45.0  # per reduced failure
    repro_dir: str | None = None  # where reproducers go (None: not saved)

    @property
    def interpret(self) -> bool:
        return self.device == "cpu"


@dataclass
class Outcome:
    """What one case did. `problem` is None when every call matched eager."""

    case: Case
    problem: str | None = None
    calls: int = 0  # calls compared with eager
    skipped: int = 0  # calls whose reference overflowed
    compile_s: float = 0.0
    first_call_s: float = 0.0  # includes Triton's compile (or its cache load) on a GPU
    kernel: str = ""  # a digest of the generated source
    cache: str = ""  # the compile cache's answer (pipeline.Compilation.cache): "hit" after a prewarm
    workers: int = 0


@dataclass
class Failure:
    outcome: Outcome
    reduced: Case | None = None
    reduced_problem: str | None = None
    path: str | None = None


@dataclass
class Report:
    config: Config
    planned: int
    outcomes: list[Outcome] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    stopped_by_budget: bool = False
    aborted: str | None = None  # a fatal device error stopped the campaign
    elapsed_s: float = 0.0
    reduce_s: float = 0.0

    @property
    def ran(self) -> int:
        return len(self.outcomes)

    def counts(self) -> dict[str, int]:
        c = Counter()
        for o in self.outcomes:
            kw = o.case.kwargs
            c["static" if kw.get("schedule") == "static" else "dynamic"] += 1
            dtypes = {v.dtype for v in values_of(o.case.program)}
            c["with bf16" if torch.bfloat16 in dtypes else "fp32 only"] += 1
            c["calls"] += o.calls
            c["skipped calls"] += o.skipped
        return dict(c)

    @property
    def kernels(self) -> int:
        """Distinct generated kernels among the cases that compiled."""
        return len({o.kernel for o in self.outcomes if o.kernel})

    @property
    def cache_hits(self) -> int:
        return sum(o.cache == "hit" for o in self.outcomes)

    def workers(self) -> list[int]:
        return sorted({o.workers for o in self.outcomes if o.workers})

    def op_kinds(self) -> dict[str, int]:
        return dict(Counter(s.kind for o in self.outcomes for s in o.case.program.steps).most_common())

    def summary(self) -> str:
        c = self.counts()
        compile_s = sum(o.compile_s for o in self.outcomes)
        first_s = sum(o.first_call_s for o in self.outcomes)
        lines = [
            f"fuzz campaign seed {self.config.seed} on {self.config.device}: {self.ran} of {self.planned} models ran"
            + (" (stopped at the time budget)" if self.stopped_by_budget else "")
            + (f" (aborted: {self.aborted})" if self.aborted else ""),
            f"  {c.get('fp32 only', 0)} fp32 only, {c.get('with bf16', 0)} with bf16; {c.get('static', 0)} static, "
            f"{c.get('dynamic', 0)} dynamic schedules; {c.get('calls', 0)} calls compared with eager "
            f"({c.get('skipped calls', 0)} skipped: reference overflow); "
            f"{self.kernels} distinct kernels; workers {self.workers()}",
            f"  steps by kind: {self.op_kinds()}",
            f"  {self.elapsed_s:.1f} s: mkcompiler.compile {compile_s:.1f} s, first calls {first_s:.1f} s, "
            f"reductions {self.reduce_s:.1f} s; prewarm jobs {self.config.jobs}, "
            f"{self.cache_hits} compiles found in the cache",
            f"  {len(self.failures)} failures",
        ]
        for i, f in enumerate(self.failures):
            lines.append(f"  failure {i}: {f.outcome.problem}\n{indent(repr(f.outcome.case.program))}")
            lines.append(f"    options {f.outcome.case.kwargs}, seed {f.outcome.case.seed}")
            if f.reduced is not None:
                lines.append(f"    reduced ({f.reduced_problem}):\n{indent(repr(f.reduced.program))}")
                lines.append(f"    options {f.reduced.kwargs}, seed {f.reduced.seed}")
            if f.path:
                lines.append(f"    saved: {f.path}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "config": asdict(self.config),
            "planned": self.planned,
            "ran": self.ran,
            "stopped_by_budget": self.stopped_by_budget,
            "aborted": self.aborted,
            "elapsed_s": round(self.elapsed_s, 2),
            "reduce_s": round(self.reduce_s, 2),
            "counts": self.counts(),
            "op_kinds": self.op_kinds(),
            "distinct_kernels": self.kernels,
            "workers": self.workers(),
            "compile_s": round(sum(o.compile_s for o in self.outcomes), 2),
            "first_call_s": round(sum(o.first_call_s for o in self.outcomes), 2),
            "cache_hits": self.cache_hits,
            "failures": [
                {
                    "problem": f.outcome.problem,
                    "program": repr(f.outcome.case.program),
                    "reduced": None if f.reduced is None else repr(f.reduced.program),
                    "path": f.path,
                }
                for f in self.failures
            ],
        }


def indent(text: str, prefix: str = "      ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# ---- drawing cases ----


def target_options(options: dict, interpret: bool) -> dict:
    """The drawn compile options for the target: on a GPU the device's worker count (one per
    SM); in the interpreter (programs run one after another) a static schedule only on one worker."""
    options = dict(options)
    if not interpret:
        options.pop("num_workers")
    elif options["num_workers"] > 1:
        options["schedule"] = "dynamic"
    return options


def draw_cases(config: Config) -> list[Case]:
    """config.models distinct cases in a random order, the same for the same seed (and hypothesis version)."""
    cases: list[Case] = []
    seen: set[str] = set()

    def collect(data, options, seed):
        # Always draws (hypothesis requires the same draws for the same choices); keeps new cases.
        mode = data.draw(st.sampled_from(list(DTYPE_MODES)), label="dtype mode")
        program = data.draw(programs(mode, config.max_steps, config.max_numel), label="program")
        case = Case(program, tuple(sorted(target_options(options, config.interpret).items())), seed)
        if repr(case) not in seen and len(cases) < config.models:
            seen.add(repr(case))
            cases.append(case)

    for round_ in range(10):  # duplicates (hypothesis starts with the simplest programs): draw again
        missing = config.models - len(cases)
        if missing <= 0:
            break
        run = settings(
            max_examples=missing + missing // 4 + 5,
            phases=[Phase.generate],
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )(given(data=st.data(), options=compile_options, seed=st.integers(0, 2**16))(collect))
        hypothesis_seed(config.seed * 100 + round_)(run)()
    # Hypothesis draws its simplest programs first: mixed, a campaign stopped by its budget still
    # ran every kind of case.
    random.Random(config.seed).shuffle(cases)
    return cases


# ---- running one case ----


def run_case(case: Case, device: str, calls: int, prewarmed: bool = False) -> Outcome:
    """Compile and call the case. `prewarmed`: a Prewarmer process compiled exactly this case
    without error, with the pass invariants checked (MKCOMPILER_DEBUG=1): the compile here then
    skips the checks and takes the cached queue without capturing the model again."""
    out = Outcome(case)
    model = FuzzModel(case.program, case.seed).to(device)
    exact_model = exact_twin(model)
    options = {**case.kwargs, "debug": 0} if prewarmed else case.kwargs
    t0 = time.perf_counter()
    try:
        mk = mkcompiler.compile(model, random_inputs(case.program, case.seed + 1, device), **options)
    except Exception as e:
        out.problem = f"compile: {describe(e)}"
        return out
    out.compile_s = time.perf_counter() - t0
    out.cache, out.workers = mk.compilation.cache, mk.num_workers
    out.kernel = hashlib.sha256(mk.source.encode()).hexdigest()[:16]
    for c in range(calls):
        inputs = random_inputs(case.program, case.seed + 1 + c, device)
        eager, exact = references(model, exact_model, inputs)
        if not moderate(eager + exact):
            out.skipped += 1
            continue
        mk.poison()
        t0 = time.perf_counter()
        try:
            outs = mk(*inputs)
        except Exception as e:
            out.problem = f"call {c}: {describe(e)}"
            return out
        if out.calls == 0:
            out.first_call_s = time.perf_counter() - t0
        bad = mismatches(case.program, outs, eager, exact)
        if bad:
            out.problem = f"call {c}: " + "; ".join(bad)
            return out
        out.calls += 1
    return out


def describe(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}{at}"


# ---- reducing a failure ----


def values_of(program: Program) -> list[Value]:
    vals = list(program.inputs)
    for step in program.steps:
        vals.append(meta_value(step, vals))
    return vals


def restrict(program: Program, outputs, bypass: dict[int, int] | None = None) -> Program | None:
    """The part of `program` that computes `outputs` (value indices), with each value b read as
    bypass[b] instead; steps and inputs nothing needs are dropped. None: no program is left."""
    bypass = bypass or {}
    n_in = len(program.inputs)

    def resolve(v: int) -> int:
        while v in bypass:
            v = bypass[v]
        return v

    outs = list(dict.fromkeys(resolve(o) for o in outputs))
    if any(o < n_in for o in outs):
        return None  # an input returned as it is: not a model
    needed, stack = set(), list(outs)
    while stack:
        v = stack.pop()
        if v not in needed:
            needed.add(v)
            if v >= n_in:
                stack.extend(resolve(a) for a in program.steps[v - n_in].args)
    index: dict[int, int] = {}
    inputs = []
    for i, val in enumerate(program.inputs):
        if i in needed:
            index[i] = len(inputs)
            inputs.append(val)
    steps = []
    for s, step in enumerate(program.steps):
        if n_in + s in needed:
            index[n_in + s] = len(inputs) + len(steps)
            steps.append(Step(step.kind, tuple(index[resolve(a)] for a in step.args), step.attrs))
    if not inputs or not steps:
        return None
    return Program(tuple(inputs), tuple(steps), tuple(index[o] for o in outs))


def smaller_programs(program: Program) -> Iterator[Program]:
    """Candidates with fewer steps or outputs, smallest change in kind first: one output alone;
    an intermediate as the only output; one step skipped (its result read as an argument of the
    same shape and dtype)."""
    n_in = len(program.inputs)
    vals = values_of(program)
    if len(program.outputs) > 1:
        for o in program.outputs:
            yield restrict(program, [o])
    for v in range(n_in, len(vals)):
        if v not in program.outputs:
            yield restrict(program, [v])
    for s, step in enumerate(program.steps):
        for a in dict.fromkeys(step.args):
            if vals[a] == vals[n_in + s]:
                yield restrict(program, program.outputs, {n_in + s: a})


def smaller_cases(case: Case) -> Iterator[Case]:
    size = (len(case.program.steps), len(case.program.outputs))
    for p in smaller_programs(case.program):
        if p is not None and (len(p.steps), len(p.outputs)) < size:
            yield replace(case, program=p)
    for name, simple in SIMPLER_OPTIONS:
        if name in case.kwargs and case.kwargs[name] != simple:
            yield case.with_options(**{name: simple})


def reduce_case(case: Case, problem_of: Callable[[Case], str | None], deadline: float) -> tuple[Case, str | None]:
    """Greedy reduction: the first smaller case that still fails replaces the case, until none
    does or the deadline (time.monotonic) passes. Returns the case and its problem."""
    best, problem = case, problem_of(case)
    if problem is None:
        return case, None  # did not fail again (a flaky failure): saved as found
    progress = True
    while progress and time.monotonic() < deadline:
        progress = False
        for candidate in smaller_cases(best):
            if time.monotonic() >= deadline:
                break
            p = problem_of(candidate)
            if p is not None:
                best, problem, progress = candidate, p, True
                break
    return best, problem


# ---- reproducer files ----


def case_source(case: Case) -> str:
    """Python source that rebuilds the case (PROGRAM, OPTIONS, SEED)."""
    p = case.program
    inputs = ", ".join(f"Value({v.shape!r}, {v.dtype!r})" for v in p.inputs)
    steps = "".join(f"        Step({s.kind!r}, {s.args!r}, {s.attrs!r}),\n" for s in p.steps)
    return (
        f"PROGRAM = Program(\n    inputs=({inputs},),\n    steps=(\n{steps}    ),\n    outputs={p.outputs!r},\n)\n"
        f"OPTIONS = {case.kwargs!r}\nSEED = {case.seed!r}\n"
    )


def save_reproducer(case: Case, problem: str, directory: str, stem: str, found: Case | None = None) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{stem}.py")
    found_text = (
        f"\nAs found ({len(found.program.steps)} steps):\n{indent(repr(found.program), '    ')}\n" if found else ""
    )
    text = (
        f"{REPRO_HEADER}: {problem.splitlines()[0][:200]}\n\n"
        "Saved by tests/fuzz_campaign.py; tests/test_gpu_fuzz.py runs every file of this directory on the\n"
        "GPU (pytest -m gpu) and in the interpreter. Keep it once fixed, as a regression test.\n\n"
        f"{indent(repr(case.program), '    ')}\n{found_text}"
        '"""\n\nimport torch\nfrom test_fuzz import Program, Step, Value\n\n'
        f"{case_source(case)}PROBLEM = {problem!r}\n"
    )
    with open(path, "w") as f:
        f.write(text)
    return path


def load_reproducer(path: str) -> tuple[Case, str]:
    ns = runpy.run_path(path)
    return Case(ns["PROGRAM"], tuple(sorted(ns["OPTIONS"].items())), ns["SEED"]), ns.get("PROBLEM", "")


def reproducers(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".py"))


# ---- compiling ahead in other processes ----


class _CompileOnly:
    """Stands in for a Megakernel's JITFunction: `kernel[grid](*args, **kwargs)` compiles the
    kernel for exactly those arguments (Triton's warmup) without launching it."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return functools.partial(self.kernel.warmup, grid=grid)


def compile_kernel(mk) -> None:
    """Triton-compile mk's kernel as mk.launch() would launch it (into Triton's on-disk cache)."""
    if mk.interpret:
        return  # the interpreter compiles nothing
    kernel = mk._kernel
    mk._kernel = _CompileOnly(kernel)
    try:
        mk.launch()
    finally:
        mk._kernel = kernel


def prewarm(case: Case, device: str) -> str | None:
    """Runs in a Prewarmer process: the case's compile as run_case does it (into mkcompiler's
    cache), and its kernel's. Returns the problem, if any (the main process finds it again)."""
    try:
        model = FuzzModel(case.program, case.seed).to(device)
        compile_kernel(mkcompiler.compile(model, random_inputs(case.program, case.seed + 1, device), **case.kwargs))
    except Exception as e:
        return describe(e)
    return None


class Prewarmer:
    """`jobs` spawned processes compile the cases in order, ahead of the main process."""

    WAIT_S = 60.0  # longest wait for one case's prewarm before compiling it here anyway

    def __init__(self, cases: list[Case], jobs: int, device: str):
        self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        self.futures = [self.pool.submit(prewarm, case, device) for case in cases]
        self.failed = 0

    def wait(self, i: int) -> bool:
        """Whether case i was compiled without a problem (else the main process compiles it in
        full, and finds the same problem, if any)."""
        try:
            ok = self.futures[i].result(timeout=self.WAIT_S) is None
        except Exception:
            ok = False
        self.failed += not ok
        return ok

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# ---- the campaign ----


def run_campaign(config: Config, cases: list[Case] | None = None, log: Callable[[str], None] = print) -> Report:
    """Run `cases` (default: draw_cases(config)) until config.budget_s; reduce and save the first
    config.reduce_failures failures. A fatal device error stops the campaign."""
    start = time.monotonic()
    cases = draw_cases(config) if cases is None else cases
    report = Report(config, planned=len(cases))
    warm = Prewarmer(cases, config.jobs, config.device) if config.jobs > 0 and not config.interpret else None
    try:
        for i, case in enumerate(cases):
            if time.monotonic() - start > config.budget_s:
                report.stopped_by_budget = True
                break
            prewarmed = warm is not None and warm.wait(i)
            outcome = run_case(case, config.device, config.calls, prewarmed)
            report.outcomes.append(outcome)
            if outcome.problem is None:
                continue
            log(f"model {i} failed: {outcome.problem}\n{indent(repr(case.program))}\n    options {case.kwargs}")
            if fatal(outcome.problem):  # nothing runs on this device any more: save as found
                report.aborted = outcome.problem
                path = config.repro_dir and save_reproducer(case, outcome.problem, config.repro_dir, stem(config, i))
                report.failures.append(Failure(outcome, path=path or None))
                break
            report.failures.append(_reduce(report, i, outcome, log))
            if report.aborted:
                break
    finally:
        if warm is not None:
            warm.close()
        report.elapsed_s = time.monotonic() - start
    return report


def _reduce(report: Report, index: int, outcome: Outcome, log) -> Failure:
    config = report.config
    failure = Failure(outcome)
    if len(report.failures) >= config.reduce_failures:
        return failure
    t0 = time.monotonic()

    def problem_of(case: Case) -> str | None:
        problem = run_case(case, config.device, config.calls).problem
        if problem is not None and fatal(problem):
            raise DeviceLost(problem)
        return problem

    try:
        failure.reduced, failure.reduced_problem = reduce_case(outcome.case, problem_of, t0 + config.reduce_budget_s)
    except DeviceLost as e:  # a candidate broke the device: nothing more runs; save the case as found
        report.aborted = f"while reducing: {e}"
    report.reduce_s += time.monotonic() - t0
    if failure.reduced_problem is None:  # did not fail again, or the device was lost: keep the case as found
        why = "reduction stopped: the device was lost" if report.aborted else "did not fail again"
        failure.reduced, failure.reduced_problem = outcome.case, f"({why}) {outcome.problem}"
    log(f"  reduced to {len(failure.reduced.program.steps)} steps: {failure.reduced_problem}")
    if config.repro_dir:
        failure.path = save_reproducer(
            failure.reduced, failure.reduced_problem, config.repro_dir, stem(config, index), found=outcome.case
        )
    return failure


def stem(config: Config, index: int) -> str:
    """A reproducer's file name (without .py)."""
    return f"{config.device}_seed{config.seed}_model{index}"


def write_json(report: Report, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=1)
