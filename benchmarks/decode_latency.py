"""Decode latency of Llama-3.2-1B and Llama-3.1-8B shapes: mkcompiler against eager and
torch.compile, over a grid of batch sizes and context lengths, with the HBM floor of every case.

    python benchmarks/decode_latency.py                       # 2 models x batch 1/4/16 x ctx 512/4096
    python benchmarks/decode_latency.py --models llama-3.2-1b --batches 1 16 --ctxs 512 \\
        --baseline-modes max-autotune --time-budget 540 --json /tmp/decode.json
    python benchmarks/decode_latency.py --dry-run             # the case grid and its bytes, no GPU
    python benchmarks/decode_latency.py --models llama-3.2-1b --batches 1 --ctxs 512 \\
        --spelling canonical written --no-torch-compile         # the same model spelled two ways
    python benchmarks/decode_latency.py --models llama-3.2-1b --batches 1 --ctxs 512 \\
        --backend triton gluon --no-torch-compile               # the same model on both kernel generators
    python benchmarks/decode_latency.py --dry-run --backend triton gluon

Random bf16 weights of the real shapes (examples/llama.py), KV caches filled with random values,
decode at position ctx (ctx tokens already in the cache). Everything runs in one process, one
case after another; every case builds its model (max_seq_len = ctx + steps + 1, max_batch =
batch), compiles one megakernel for it and frees everything before the next case.
--spelling picks how examples/llama.py writes the norms, RoPE and attention (LlamaConfig.spelling:
canonical, written); each spelling is a case of its own (same weights, caches and tokens), next to
the other spellings of the same shape.
--backend picks mkcompiler's kernel generator (Settings.backend: triton, gluon); each backend is a
case of its own, next to the other backends of the same (model, batch, ctx, spelling). Those
cases share one model (built once: the same weights, caches and tokens), compile one megakernel
each in turn (the previous one freed first), and share one run of the baselines (eager,
torch.compile): every row holds the same baseline figures. A row records the megakernel class
that ran (a Gluon compile that falls back to Triton warns, GluonFallbackWarning: the row keeps
the text and its notes say "fell back to triton"). `--opt backend=...` alone means --backend.

Per case:
- mkcompiler: `mkcompiler.compile(model, (tok, pos), backend=<the case's>, <--opt K=V>...)` once;
  times the full call `mk(tok, pos)` (input checks, launch, error-record read, output copy) and
  `mk.launch()` alone (kernel);
- eager (the same module, under torch.no_grad);
- torch.compile(mode="max-autotune-no-cudagraphs") and torch.compile(mode="max-autotune")
  (CUDA graphs), each 40-60 s of compile and autotuning: --baseline-modes picks them,
  --no-torch-compile drops them;
- correctness: for --steps-check steps from position ctx, mkcompiler's logits and the KV-cache
  slot it writes against eager's, teacher-forced (mkcompiler and eager share the module, so both
  start every step from the same cache; eager's token feeds the next step). bf16 on both sides:
  relative errors above --tol (5e-2) are flagged, not fatal.

Timings are medians of triton.testing.do_bench (L2 flushed between runs). The floor is
(weight bytes read + KV bytes read) / measured device-to-device copy bandwidth, where weights
read are all parameters except the embedding table, plus one embedding row per sequence, and KV
read is ctx + 1 positions of K and V in every layer. (bench_llama.py counts the whole embedding
table: its floor is higher, 17% for 1B.)

--time-budget S stops before a phase (build + mkcompiler, eager, each torch.compile mode) that
its estimate says would end after S seconds, and stops at S seconds at the latest (SIGALRM;
SIGTERM, as sent by `timeout`, does the same): the table and the JSON of what was done are
printed and written either way. Set S some 30-60 s under a hard limit (start-up, exit). The JSON
is also rewritten after every case.

Exit status: 0, or 1 when a case raised an error (out of memory, compile failure, ...);
tolerance flags are printed and recorded but do not change it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import gc
import itertools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from examples.llama import CONFIGS, SPELLINGS, LlamaConfig, fill_caches, random_llama  # noqa: E402

# Nothing here touches CUDA at import time: mkcompiler, triton and bench_mlp are imported in the
# functions that run on the GPU.

DEFAULT_MODELS = ("llama-3.2-1b", "llama-3.1-8b")
DEFAULT_BATCHES = (1, 4, 16)
DEFAULT_CTXS = (512, 4096)
DEFAULT_SPELLINGS = ("canonical",)
BACKENDS = ("triton", "gluon")  # mkcompiler.ir.settings.BACKENDS (not imported here: see above); a test compares
DEFAULT_BACKENDS = ("triton",)
GLUON_MK = "mkcompiler.runtime.gluon.GluonMegakernel"  # what a Gluon compile that did not fall back returns
DEFAULT_TC_MODES = ("max-autotune-no-cudagraphs", "max-autotune")
TC_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
TOL = 5e-2  # relative error of bf16 logits vs eager bf16 above which a case is flagged
DTYPE_BYTES = 2  # bf16

MK_CALL, MK_KERNEL, EAGER = "mkcompiler call", "mkcompiler kernel", "eager"
MK_IMPLS = (MK_CALL, MK_KERNEL)


def tc_name(mode: str) -> str:
    return f"torch.compile {mode}"


IMPL_ORDER = (MK_CALL, MK_KERNEL, EAGER, *(tc_name(m) for m in TC_MODES))
SHORT = {
    MK_CALL: "mk call",
    MK_KERNEL: "mk kernel",
    EAGER: "eager",
    tc_name("default"): "tc default",
    tc_name("reduce-overhead"): "tc reduce-overhead",
    tc_name("max-autotune-no-cudagraphs"): "tc",
    tc_name("max-autotune"): "tc+graphs",
}

# Phase duration guesses (s) before one has been measured (H100; the 8B model, ctx 4096 and
# batch 16 take longer): used only by --time-budget.
DEFAULT_ESTIMATES = {"setup": 20.0, "mkcompiler": 120.0, "eager": 10.0, "tc": 100.0}
SAFETY = 1.3  # measured phase times are scaled by this before deciding whether a phase still fits
RESERVE_S = 10.0  # kept free at the end of the budget for the table, the JSON and exit


def say(*a) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------- arguments and the case grid


def _list_of(kind, what: str):
    def parse(text: str):
        out = []
        for piece in text.split(","):
            piece = piece.strip()
            if not piece:
                continue
            try:
                v = kind(piece)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{what}: expected {kind.__name__} values, got {piece!r}") from None
            if kind is int and v < 1:
                raise argparse.ArgumentTypeError(f"{what}: expected positive integers, got {v}")
            out.append(v)
        return out

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Llama decode latency: mkcompiler vs eager and torch.compile, with the HBM floor.",
    )
    p.add_argument(
        "--models",
        nargs="+",
        type=_list_of(str, "--models"),
        default=None,
        help=f"model shapes (space- or comma-separated) from examples/llama.py CONFIGS; default {' '.join(DEFAULT_MODELS)}",
    )
    p.add_argument(
        "--batches",
        nargs="+",
        type=_list_of(int, "--batches"),
        default=None,
        help=f"batch sizes; default {' '.join(map(str, DEFAULT_BATCHES))}",
    )
    p.add_argument(
        "--ctxs",
        nargs="+",
        type=_list_of(int, "--ctxs"),
        default=None,
        help=f"context lengths (decode position); default {' '.join(map(str, DEFAULT_CTXS))}",
    )
    p.add_argument(
        "--spelling",
        nargs="+",
        type=_list_of(str, "--spelling"),
        default=None,
        help=f"how the model writes its norms, RoPE and attention ({', '.join(SPELLINGS)}); each a case; "
        f"default {' '.join(DEFAULT_SPELLINGS)}",
    )
    p.add_argument(
        "--backend",
        nargs="+",
        type=_list_of(str, "--backend"),
        default=None,
        help=f"mkcompiler's kernel generator ({', '.join(BACKENDS)}; Settings.backend); each a case, sharing the "
        f"baselines of its shape; default {' '.join(DEFAULT_BACKENDS)}",
    )
    p.add_argument(
        "--steps-check",
        type=int,
        default=2,
        help="decode steps whose logits are checked against eager (default 2; 0: none)",
    )
    p.add_argument(
        "--tol", type=float, default=TOL, help=f"flag a relative error of logits above this (default {TOL:g})"
    )
    p.add_argument(
        "--fp32-ref",
        action="store_true",
        help="also compare mkcompiler's and eager's logits with an fp32 copy of the model (same weights and "
        "caches): flags mkcompiler when its error vs fp32 exceeds FP32_RATIO x eager's (both are bf16 roundings "
        "of the same math; their distance from each other is not mkcompiler's error)",
    )
    p.add_argument(
        "--baseline-modes",
        nargs="+",
        type=_list_of(str, "--baseline-modes"),
        default=None,
        help=f"torch.compile modes to time ({', '.join(TC_MODES)}, or none); default {' '.join(DEFAULT_TC_MODES)}",
    )
    p.add_argument("--no-torch-compile", action="store_true", help="no torch.compile baselines")
    p.add_argument("--no-eager", action="store_true", help="do not time eager (it still checks mkcompiler)")
    p.add_argument("--warmup", type=float, default=25.0, help="do_bench warm-up, ms (default 25)")
    p.add_argument("--rep", type=float, default=200.0, help="do_bench measuring time, ms (default 200)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds: stop gracefully before this")
    p.add_argument("--json", default=None, help="write everything measured here (rewritten after every case)")
    p.add_argument("--seed", type=int, default=0, help="weights, caches and tokens (default 0)")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="K=V",
        help="mkcompiler.compile option (repeatable), e.g. schedule=dynamic; backend=B alone is --backend B",
    )
    p.add_argument("--dry-run", action="store_true", help="print the cases and their bytes; no GPU needed")
    return p


def _flatten(lists, default):
    return list(default) if lists is None else [v for chunk in lists for v in chunk]


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.models = _flatten(args.models, DEFAULT_MODELS)
    args.batches = _flatten(args.batches, DEFAULT_BATCHES)
    args.ctxs = _flatten(args.ctxs, DEFAULT_CTXS)
    args.spelling = _flatten(args.spelling, DEFAULT_SPELLINGS)
    args.backend = backends_of(p, args)
    modes = _flatten(args.baseline_modes, DEFAULT_TC_MODES)
    for name in args.models:
        if name not in CONFIGS:
            p.error(f"--models: unknown model {name!r}; known: {', '.join(CONFIGS)}")
    for name in args.spelling:
        if name not in SPELLINGS:
            p.error(f"--spelling: unknown spelling {name!r}; known: {', '.join(SPELLINGS)}")
    for name in args.backend:
        if name not in BACKENDS:
            p.error(f"--backend: unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    if modes == ["none"] or args.no_torch_compile:
        modes = []
    for m in modes:
        if m not in TC_MODES:
            p.error(f"--baseline-modes: unknown torch.compile mode {m!r}; known: {', '.join(TC_MODES)} or none")
    args.baseline_modes = list(dict.fromkeys(modes))  # keep the order, drop repeats
    for what in ("models", "batches", "ctxs", "spelling", "backend"):
        setattr(args, what, list(dict.fromkeys(getattr(args, what))))
        if not getattr(args, what):
            p.error(f"--{what}: empty")
    if args.steps_check < 0:
        p.error("--steps-check: expected 0 or more steps")
    if args.time_budget is not None and args.time_budget <= 0:
        p.error("--time-budget: expected a positive number of seconds")
    return args


def backends_of(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """--backend, or the backend `--opt backend=B` names (one axis, so that every row says which
    backend it asked for); both at once is an error."""
    opt = compile_options(args.opt).get("backend")
    if args.backend is not None and opt is not None:
        p.error(f"--opt backend={opt} and --backend: give the backends with --backend only")
    if args.backend is None:
        return [opt] if opt is not None else list(DEFAULT_BACKENDS)
    return _flatten(args.backend, DEFAULT_BACKENDS)


def case_grid(args) -> list[tuple[str, int, int, str, str]]:
    """(model, batch, ctx, spelling, backend) in run order: model, then batch, then context, then
    spelling, then backend (same-batch cases in a row let torch.compile reuse its autotuning of the
    matmul shapes; the spellings of one shape side by side; the backends of one (model, batch,
    ctx, spelling) in a row: they share its model and baselines, see shape_groups)."""
    return list(itertools.product(args.models, args.batches, args.ctxs, args.spelling, args.backend))


# ---------------------------------------------------------------- bytes and the floor


def config_of(name_or_config) -> LlamaConfig:
    return CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config


def param_count(c: LlamaConfig) -> int:
    """Parameters of examples/llama.py's Llama (embedding and lm_head not tied)."""
    d, hd = c.dim, c.head_dim
    attn = d * c.n_heads * hd + 2 * d * c.n_kv_heads * hd + c.n_heads * hd * d
    mlp = 3 * d * c.hidden
    per_layer = attn + mlp + 2 * d  # + two RMSNorm weights
    return 2 * c.vocab_size * d + c.n_layers * per_layer + d  # embed, lm_head, layers, final norm


def weight_bytes_read(c: LlamaConfig, batch: int, dtype_bytes: int = DTYPE_BYTES) -> int:
    """Weight bytes one decode step must read: every parameter but the embedding table, of
    which only one row per sequence."""
    return (param_count(c) - c.vocab_size * c.dim + batch * c.dim) * dtype_bytes


def kv_bytes_read(c: LlamaConfig, batch: int, ctx: int, dtype_bytes: int = DTYPE_BYTES) -> int:
    """K and V of positions 0..ctx (the context and the new token) in every layer."""
    return 2 * c.n_layers * batch * c.n_kv_heads * (ctx + 1) * c.head_dim * dtype_bytes


def kv_bytes_allocated(c: LlamaConfig, batch: int, max_seq_len: int, dtype_bytes: int = DTYPE_BYTES) -> int:
    return 2 * c.n_layers * batch * c.n_kv_heads * max_seq_len * c.head_dim * dtype_bytes


def floor_ms(weight_bytes: float, kv_bytes: float, bandwidth: float) -> float:
    """The HBM floor of one decode step in ms: bytes that must be read / bandwidth (bytes/s)."""
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive bytes/s, got {bandwidth!r}")
    return (weight_bytes + kv_bytes) / bandwidth * 1e3


# ---------------------------------------------------------------- derived numbers and the table


def ordered_impls(names) -> list[str]:
    names = set(names)
    return [n for n in IMPL_ORDER if n in names] + sorted(names - set(IMPL_ORDER))


def metrics(row: dict) -> dict:
    """tokens/s and % of floor per implementation, the best baseline and mkcompiler's speed-up
    over it (best baseline ms / mkcompiler ms: above 1, mkcompiler is faster)."""
    ms = {k: v for k, v in row.get("ms", {}).items() if v is not None and v > 0}
    floor = row.get("floor_ms")
    out = {
        "tokens_per_s": {k: row["batch"] / v * 1e3 for k, v in ms.items()},
        "pct_floor": {k: 100.0 * floor / v for k, v in ms.items()} if floor else {},
        "best_baseline": None,
        "best_baseline_ms": None,
        "speedup_call": None,
        "speedup_kernel": None,
    }
    baselines = {k: v for k, v in ms.items() if k not in MK_IMPLS}
    if baselines:
        best = min(baselines, key=baselines.get)
        out["best_baseline"], out["best_baseline_ms"] = best, baselines[best]
        if MK_CALL in ms:
            out["speedup_call"] = baselines[best] / ms[MK_CALL]
        if MK_KERNEL in ms:
            out["speedup_kernel"] = baselines[best] / ms[MK_KERNEL]
    return out


def _fmt(v, spec: str, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:{spec}}{suffix}"


def fell_back(row: dict) -> bool:
    """The Gluon backend was asked for and the Triton one ran: it warned, or (should a fallback ever
    not warn) another megakernel class ran."""
    ran = row.get("megakernel")
    return bool(row.get("fallback")) or (backend_of(row) == "gluon" and ran is not None and ran != GLUON_MK)


def notes_of(row: dict) -> str:
    notes = []
    if row.get("tol_exceeded"):
        notes.append("FLAG rel err > tol")
    if fell_back(row):
        notes.append("fell back to triton")
    if row.get("status") not in (None, "done"):
        notes.append(str(row["status"]))
    for phase in row.get("skipped", []):
        notes.append(f"skipped {phase}")
    for phase, err in row.get("errors", {}).items():
        notes.append(f"{phase} failed: {err.splitlines()[0][:80] if err else ''}")
    return "; ".join(notes).replace("|", "/")


def spelling_of(row: dict) -> str:
    return row.get("spelling", "canonical")  # rows recorded before --spelling existed: canonical


def backend_of(row: dict) -> str:
    return row.get("backend", "triton")  # rows recorded before --backend existed: triton


def shape_of(row: dict) -> tuple:
    """What the backend cases of one shape share: one model, one run of the baselines."""
    return row["model"], row["batch"], row["ctx"], spelling_of(row)


def shape_groups(rows: list[dict]) -> list[list[dict]]:
    """Runs of consecutive rows of one shape (case_grid puts the backends of a shape in a row)."""
    return [list(g) for _, g in itertools.groupby(rows, key=shape_of)]


def case_name(row: dict) -> str:
    extra = [v for v, default in ((spelling_of(row), "canonical"), (backend_of(row), "triton")) if v != default]
    return f"{row['model']} b{row['batch']} ctx{row['ctx']}" + "".join(f" {v}" for v in extra)


def format_table(rows: list[dict]) -> str:
    """A markdown table, one line per case: model, batch, ctx, spelling, backend, floor, then per
    implementation ms/step, tokens/s and % of floor, then the best baseline, mkcompiler's speed-up
    over it (call and kernel), the largest relative error of its logits vs eager and notes."""
    impls = ordered_impls(k for r in rows for k in r.get("ms", {}))
    head = ["model", "batch", "ctx", "spelling", "backend", "floor ms"]
    for k in impls:
        s = SHORT.get(k, k)
        head += [f"{s} ms", f"{s} tok/s", f"{s} % floor"]
    head += ["best baseline", "mk call speed-up", "mk kernel speed-up", "mk rel err", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        m = metrics(r)
        cells = [str(r["model"]), str(r["batch"]), str(r["ctx"]), spelling_of(r), backend_of(r)]
        cells.append(_fmt(r.get("floor_ms"), ".3f"))
        for k in impls:
            cells += [
                _fmt(r.get("ms", {}).get(k), ".3f"),
                _fmt(m["tokens_per_s"].get(k), ".0f"),
                _fmt(m["pct_floor"].get(k), ".1f", "%"),
            ]
        best = m["best_baseline"]
        cells += [
            SHORT.get(best, best) if best else "—",
            _fmt(m["speedup_call"], ".2f", "x"),
            _fmt(m["speedup_kernel"], ".2f", "x"),
            _fmt(r.get("max_rel_err"), ".1e"),
            notes_of(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(modes) -> str:
    parts = [
        "spelling = how examples/llama.py writes its norms, RoPE and attention (LlamaConfig.spelling)",
        "backend = mkcompiler's kernel generator asked for (Settings.backend; a Gluon compile that fell back "
        "to Triton says so in notes); the backends of one (model, batch, ctx, spelling) share its model and "
        "one run of the baselines (the same baseline figures in each of their rows)",
        "mk call = `mk(tok, pos)` (checks, launch, error read, output copy)",
        "mk kernel = `mk.launch()`",
        "eager = the module under torch.no_grad",
    ]
    parts += [f"{SHORT[tc_name(m)]} = torch.compile(mode={m!r}, fullgraph=True)" for m in modes]
    parts += [
        "tok/s = batch / ms * 1000",
        "% floor = floor / ms",
        "speed-up = best baseline ms / mkcompiler ms (> 1: mkcompiler faster)",
        "mk rel err = largest relative error of mkcompiler's logits vs eager over the checked steps",
    ]
    return "; ".join(parts) + "."


# ---------------------------------------------------------------- time budget


class BudgetExceeded(BaseException):
    """Raised by SIGALRM/SIGTERM; a BaseException so that no `except Exception` swallows it."""


class Budget:
    """Decides whether a phase still fits in --time-budget, from the longest time the same phase
    took so far (for the same model if it ran, else for any model, else a guess)."""

    def __init__(self, seconds: float | None, clock=time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self.start = clock()
        self.seen: dict[tuple[str, str], float] = {}

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def estimate(self, phase: str, model: str) -> float:
        if (model, phase) in self.seen:
            return SAFETY * self.seen[(model, phase)]
        other = [v for (_, ph), v in self.seen.items() if ph == phase]
        guess = DEFAULT_ESTIMATES.get(phase.split(":")[0], 60.0)
        return max([guess] + [SAFETY * v for v in other])

    def fits(self, *phases: str, model: str) -> bool:
        if self.seconds is None:
            return True
        need = sum(self.estimate(ph, model) for ph in phases)
        return self.left() - RESERVE_S >= need

    def record(self, phase: str, model: str, seconds: float) -> None:
        key = (model, phase)
        self.seen[key] = max(seconds, self.seen.get(key, 0.0))


def _raise_budget(signum, frame):
    raise BudgetExceeded(signal.Signals(signum).name)


# ---------------------------------------------------------------- GPU work


# --fp32-ref: mkcompiler's logits may be this much further from the fp32 model's than eager bf16's
# (plus FP32_FLOOR): both are bf16 roundings of the same math (benchmarks/error_budget.py: at
# Llama-3.1-8B shapes each is ~4e-2 from fp32 and they are ~5e-2 from each other).
FP32_RATIO = 1.1
FP32_FLOOR = 1e-3


def fp32_twin(model: torch.nn.Module) -> torch.nn.Module:
    """An fp32 copy of the model, caches included, in their state now (the exact reference)."""
    return copy.deepcopy(model).float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def default_dtype_and_device(dtype: torch.dtype, device):
    """Build modules straight on the device in their final dtype: an 8B model made on the CPU in
    fp32 first takes a minute and 32 GB of host memory."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_model(
    name: str, batch: int, ctx: int, steps: int, device, seed: int = 0, dtype=torch.bfloat16, spelling="canonical"
):
    """Random weights, caches sized for this case and filled with random values (N(0, 0.5)); the
    same for every spelling."""
    max_seq_len = ctx + steps + 1
    with default_dtype_and_device(dtype, device):
        model = random_llama(
            name, dtype=dtype, device=device, seed=seed, max_seq_len=max_seq_len, max_batch=batch, spelling=spelling
        )
    fill_caches(model.eval())
    return model


def free_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    with contextlib.suppress(Exception):
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def git_info() -> dict:
    info = {"commit": None, "dirty": None}
    with contextlib.suppress(Exception):
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            info["commit"] = r.stdout.strip()
            d = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, capture_output=True, timeout=10)
            info["dirty"] = d.returncode != 0
    return info


def env_info() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "gpu_memory_gb": props.total_memory / 1e9,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git": git_info(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def bench(fn, args) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")


def new_row(model: str, batch: int, ctx: int, steps: int, spelling: str = "canonical", backend: str = "triton") -> dict:
    c = config_of(model)
    w, kv = weight_bytes_read(c, batch), kv_bytes_read(c, batch, ctx)
    return {
        "model": model,
        "batch": batch,
        "ctx": ctx,
        "spelling": spelling,
        "backend": backend,
        "megakernel": None,  # the class that ran: GLUON_MK, or Megakernel where Gluon fell back
        "fallback": None,  # the GluonFallbackWarning's text
        "max_seq_len": ctx + steps + 1,
        "status": "not run",
        "weight_bytes_read": w,
        "weight_bytes_all": param_count(c) * DTYPE_BYTES,
        "kv_bytes_read": kv,
        "kv_bytes_allocated": kv_bytes_allocated(c, batch, ctx + steps + 1),
        "floor_ms": None,
        "ms": {},
        "rel_errs": [],
        "kv_rel_errs": [],
        "fp32_rel_errs": [],  # per checked step, with --fp32-ref: (mkcompiler, eager) vs the fp32 copy
        "max_rel_err": None,
        "tol_exceeded": False,
        "tc_rel_err": {},
        "compile_s": {},
        "phase_s": {},
        "skipped": [],
        "errors": {},
    }


def case_rows(args) -> list[dict]:
    """A row per case of case_grid, not run yet."""
    return [new_row(m, b, c, args.steps_check, sp, be) for m, b, c, sp, be in case_grid(args)]


def _error(row: dict, phase: str, e: BaseException, also=()) -> None:
    """Records the error in `row` (and the rows in `also`: other backends of a shape that failed
    before their own phases) and says it once."""
    row["errors"][phase] = f"{type(e).__name__}: {e}"[:4000]
    row.setdefault("tracebacks", {})[phase] = traceback.format_exc()[-8000:]
    for other in also:
        other["errors"][phase] = row["errors"][phase]
        other.setdefault("tracebacks", {})[phase] = row["tracebacks"][phase]
    say(f"  {phase} FAILED: {type(e).__name__}: {str(e)[:500]}")


def compile_options(pairs: list[str]) -> dict:
    """`k=v` strings -> options; values are Python literals where they parse (1, False, (16, 64, 256))."""
    opts = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"--opt expects K=V, got {kv!r}")
        try:
            opts[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            opts[k] = v
    return opts


def compile_megakernel(model, inputs, options: dict):
    """`mkcompiler.compile(model, inputs, **options)` -> (megakernel, text of the Gluon backend's
    fallback warning or None). The fallback warning is caught (the caller records and says it);
    any other warning is shown as usual."""
    import mkcompiler

    if options.get("backend") != "gluon":  # only the Gluon backend falls back (and needs its import)
        return mkcompiler.compile(model, inputs, **options), None
    from mkcompiler.runtime.gluon import GluonFallbackWarning

    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GluonFallbackWarning)
            mk = mkcompiler.compile(model, inputs, **options)
    finally:  # outside catch_warnings: the others go to the warning machinery it replaced
        for w in caught:
            if not issubclass(w.category, GluonFallbackWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    fallback = [str(w.message) for w in caught if issubclass(w.category, GluonFallbackWarning)]
    return mk, "; ".join(fallback) or None


def class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def run_mkcompiler(model, tok, ctx: int, row: dict, args, dev, said: set) -> None:
    """Compiles and times the row's backend; `said`: fallback texts already in the log."""
    t0 = time.perf_counter()
    pos = torch.tensor([ctx], device=dev)
    mk, row["fallback"] = compile_megakernel(
        model, (tok, pos), {**compile_options(args.opt), "backend": row["backend"]}
    )
    row["compile_s"]["mkcompiler"] = time.perf_counter() - t0
    row["megakernel"] = class_name(mk)
    row["mk"] = {"instructions": len(mk.queue), "workers": mk.num_workers, "timings": mk.timings}
    say(
        f"  mkcompiler ({row['backend']}) compiled in {row['compile_s']['mkcompiler']:.1f} s: {row['megakernel']}, "
        f"{len(mk.queue)} instructions, {mk.num_workers} workers"
    )
    if row["fallback"]:
        known = row["fallback"] in said
        said.add(row["fallback"])
        say(f"  {row['backend']} fell back to triton" + (" (as above)" if known else f": {row['fallback']}"))
    t0 = time.perf_counter()
    mk(tok, pos)  # the first launch compiles the Triton kernel
    torch.cuda.synchronize()
    row["mk"]["first_call_s"] = time.perf_counter() - t0
    say(f"  first call (Triton compile of the megakernel) {row['mk']['first_call_s']:.1f} s")
    # Teacher-forced check: mkcompiler and eager run the same module from the same cache state.
    exact = fp32_twin(model) if args.fp32_ref and args.steps_check else None
    step_tok = tok
    for i in range(args.steps_check):
        p = torch.tensor([ctx + i], device=dev)
        out = mk(step_tok, p).float()
        kv_mk = torch.stack(
            [torch.stack((a.attn.k_cache[:, :, ctx + i], a.attn.v_cache[:, :, ctx + i])) for a in model.layers]
        )
        with torch.no_grad():
            expect = model(step_tok, p).float()
        kv_ref = torch.stack(
            [torch.stack((a.attn.k_cache[:, :, ctx + i], a.attn.v_cache[:, :, ctx + i])) for a in model.layers]
        )
        row["rel_errs"].append(rel(out, expect))
        row["kv_rel_errs"].append(rel(kv_mk, kv_ref))
        flag = "  FLAG: above tol" if row["rel_errs"][-1] > args.tol else ""
        say(
            f"  step {i} (pos {ctx + i}): logits rel err vs eager {row['rel_errs'][-1]:.2e}, new KV slot {row['kv_rel_errs'][-1]:.2e}{flag}"
        )
        if exact is not None:
            with torch.no_grad():
                truth = exact(step_tok, p).double()
            mk_err, eager_err = rel(out, truth), rel(expect, truth)
            row["fp32_rel_errs"].append((mk_err, eager_err))
            bad = not mk_err <= FP32_RATIO * eager_err + FP32_FLOOR
            say(
                f"  step {i}: vs fp32, mkcompiler {mk_err:.2e}, eager {eager_err:.2e} "
                f"({mk_err / max(eager_err, 1e-30):.2f}x){'  FLAG: above ' + str(FP32_RATIO) + 'x eager' if bad else ''}"
            )
            row["fp32_flag"] = row.get("fp32_flag", False) or bad
            del truth
        step_tok = expect[:, -1].argmax(-1, keepdim=True)
        del out, expect, kv_mk, kv_ref
    del exact
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the fp32 copy's memory, before the timings
    if row["rel_errs"]:
        row["max_rel_err"] = max(row["rel_errs"])
        row["tol_exceeded"] = not row["max_rel_err"] <= args.tol
    row["ms"][MK_CALL] = bench(lambda: mk(tok, pos), args)
    row["ms"][MK_KERNEL] = bench(mk.launch, args)
    mk.check()  # an error record left by the timed launches raises here
    say(
        f"  mkcompiler {row['ms'][MK_CALL]:.3f} ms/step (kernel {row['ms'][MK_KERNEL]:.3f}); floor {row['floor_ms']:.3f} ms"
    )


def run_eager(model, tok, pos, row: dict, args) -> None:
    with torch.no_grad():
        row["ms"][EAGER] = bench(lambda: model(tok, pos), args)
    say(f"  eager {row['ms'][EAGER]:.3f} ms/step")


def run_torch_compile(model, tok, pos, mode: str, row: dict, args) -> None:
    torch._dynamo.reset()
    f = torch.compile(model, mode=mode, fullgraph=True)
    with torch.no_grad():
        expect = model(tok, pos).float()
        t0 = time.perf_counter()
        f(tok, pos)
        torch.cuda.synchronize()
        row["compile_s"][tc_name(mode)] = time.perf_counter() - t0
        for _ in range(3):  # CUDA graphs are recorded on a later call
            out = f(tok, pos)
        row["tc_rel_err"][mode] = rel(out.float(), expect)
        del out
        row["ms"][tc_name(mode)] = bench(lambda: f(tok, pos), args)
    say(
        f"  torch.compile {mode}: compiled in {row['compile_s'][tc_name(mode)]:.1f} s, "
        f"{row['ms'][tc_name(mode)]:.3f} ms/step (rel err vs eager {row['tc_rel_err'][mode]:.1e})"
    )
    torch._dynamo.reset()


def baseline_part() -> dict:
    """Where a shape's baselines record what they measure (the keys run_eager, run_torch_compile
    and _error write), to be shared by its backend rows (share)."""
    return {"ms": {}, "tc_rel_err": {}, "compile_s": {}, "phase_s": {}, "skipped": [], "errors": {}}


def share(part: dict, rows: list[dict]) -> None:
    """Adds `part` (values measured once for a shape) to each of its rows: dicts merged, lists
    extended, other values set."""
    for r in rows:
        for k, v in part.items():
            if isinstance(v, dict):
                r.setdefault(k, {}).update(v)
            elif isinstance(v, list):
                r.setdefault(k, []).extend(v)
            else:
                r[k] = v


def run_phase(row: dict, phase: str, fn, budget: Budget, model: str) -> None:
    """Runs one phase, recording its time, or its error in `row` (an error does not end the case)."""
    t0 = time.perf_counter()
    failed = False
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
        _error(row, phase, e)
        failed = True
    if failed:  # out here the traceback (and the tensors its frames hold) is gone
        free_memory()
    row["phase_s"][phase] = time.perf_counter() - t0
    budget.record(phase, model, row["phase_s"][phase])


def run_shape(rows: list[dict], args, bw: float, budget: Budget, dev, said: set) -> None:
    """The backend rows of one (model, batch, ctx, spelling): one model, one megakernel per row (each
    freed before the next), then the baselines once, shared by every row. `said`: see run_mkcompiler."""
    first = rows[0]
    name, batch, ctx = first["model"], first["batch"], first["ctx"]
    model = tok = pos = None
    phases = []
    base = baseline_part()
    phase_t0 = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    for row in rows:
        row["status"] = "partial"
    try:
        model = build_model(name, batch, ctx, args.steps_check, dev, seed=args.seed, spelling=spelling_of(first))
        # Bytes from the module itself (the formulas above agree; tests check them on the CPU).
        es = model.embed.weight.element_size()
        built = {"weight_bytes_all": sum(p.numel() * p.element_size() for p in model.parameters())}
        built["weight_bytes_read"] = (
            built["weight_bytes_all"] - model.embed.weight.numel() * es + batch * model.c.dim * es
        )
        built["floor_ms"] = floor_ms(built["weight_bytes_read"], first["kv_bytes_read"], bw)
        gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
        tok = torch.randint(0, model.c.vocab_size, (batch, 1), device=dev, generator=gen)
        pos = torch.tensor([ctx], device=dev)
        torch.cuda.synchronize()
        built["phase_s"] = {"setup": time.perf_counter() - phase_t0}
        share(built, rows)
        budget.record("setup", name, built["phase_s"]["setup"])
        say(
            f"  built in {built['phase_s']['setup']:.1f} s: weights read {built['weight_bytes_read'] / 1e9:.2f} GB, "
            f"KV read {first['kv_bytes_read'] / 1e9:.3f} GB (allocated {first['kv_bytes_allocated'] / 1e9:.2f} GB), "
            f"floor {built['floor_ms']:.3f} ms"
        )
        for row in rows:  # the first always runs (main checked that it fits)
            if row is not first and not budget.fits("mkcompiler", model=name):
                row["skipped"].append("mkcompiler (time budget)")
                say(f"  skipped mkcompiler ({backend_of(row)}): {budget.left():.0f} s left")
                continue
            run_phase(
                row, "mkcompiler", lambda row=row: run_mkcompiler(model, tok, ctx, row, args, dev, said), budget, name
            )
            # The megakernel goes before the next. A Gluon one re-binds the module's parameters to
            # views of its weight stacks (runtime/gluon.py): the same values, kept by the module, so
            # the later megakernels and the baselines read the same weights.
            free_memory()
        if not args.no_eager:
            phases.append(("eager", lambda: run_eager(model, tok, pos, base, args)))
        for mode in args.baseline_modes:
            phases.append((f"tc:{mode}", lambda mode=mode: run_torch_compile(model, tok, pos, mode, base, args)))
        for phase, fn in phases:
            if not budget.fits(phase, model=name):
                base["skipped"].append(f"{phase} (time budget)")
                say(f"  skipped {phase}: {budget.left():.0f} s left, needs ~{budget.estimate(phase, name):.0f} s")
                continue
            run_phase(base, phase, fn, budget, name)
        for row in rows:
            row["status"] = "done"
    finally:
        share(base, rows)  # what the baselines measured, also when interrupted
        peak = torch.cuda.max_memory_allocated() / 1e9
        model = tok = pos = phases = None  # the phase closures hold the model too
        free_memory()
        for row in rows:
            row["peak_mem_gb"] = peak  # of the shape: its model, every backend's megakernel, the baselines
            row.update(metrics(row))
            row["mem_after_free_gb"] = torch.cuda.memory_allocated() / 1e9


def write_json(path: str | None, result: dict) -> None:
    if not path:
        return
    for r in result["cases"]:
        r.update(metrics(r))
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


def dry_run(args) -> int:
    rows = case_rows(args)
    say(
        f"{len(rows)} cases, {len(shape_groups(rows))} shapes (one model and one run of the baselines each); "
        f"torch.compile modes: {', '.join(args.baseline_modes) or 'none'}"
    )
    say(
        f"{'model':<14}{'batch':>6}{'ctx':>6}  {'spelling':<10}{'backend':<8}{'weights read GB':>17}{'KV read GB':>12}"
        f"{'KV alloc GB':>13}"
    )
    for r in rows:
        say(
            f"{r['model']:<14}{r['batch']:>6}{r['ctx']:>6}  {r['spelling']:<10}{r['backend']:<8}"
            f"{r['weight_bytes_read'] / 1e9:>17.3f}{r['kv_bytes_read'] / 1e9:>12.3f}{r['kv_bytes_allocated'] / 1e9:>13.3f}"
        )
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    budget = Budget(args.time_budget)
    if not torch.cuda.is_available():
        say("decode_latency needs a CUDA GPU (use --dry-run to list the cases)")
        return 2
    dev = "cuda"
    from benchmarks.bench_mlp import copy_bandwidth

    old_handlers = {s: signal.signal(s, _raise_budget) for s in (signal.SIGTERM, signal.SIGALRM)}
    if args.time_budget is not None:
        signal.setitimer(signal.ITIMER_REAL, max(args.time_budget - budget.elapsed(), 0.01))
    result = {"args": vars(args), "cases": [], "stopped": None}
    rc = 0
    try:
        result.update(env_info())
        result["bandwidth"] = bw = copy_bandwidth()
        say(
            f"{result['device']} ({result['sm_count']} SMs), torch {result['torch']}, triton {result['triton']}, "
            f"commit {result['git']['commit']}; copy bandwidth {bw / 1e9:.0f} GB/s"
        )
        result["cases"] = case_rows(args)
        groups = shape_groups(result["cases"])
        said = set()  # Gluon fallback texts already in the log
        for i, rows in enumerate(groups):
            first = rows[0]
            tag = (
                f"[{i + 1}/{len(groups)}] {first['model']} batch {first['batch']} ctx {first['ctx']} "
                f"{spelling_of(first)} {' '.join(backend_of(r) for r in rows)}"
            )
            if not budget.fits("setup", "mkcompiler", model=first["model"]):
                result["stopped"] = f"time budget: {budget.left():.0f} s left before {tag}"
                say(f"stopping: {result['stopped']}")
                break
            say(f"{tag} ({budget.elapsed():.0f} s elapsed)")
            failed = False
            try:
                run_shape(rows, args, bw, budget, dev, said)
            except Exception as e:  # noqa: BLE001 - an out-of-memory case must not end the run
                for row in rows:
                    row["status"] = "error"
                _error(first, "case", e, also=rows[1:])
                failed = True
            if failed:
                free_memory()
            if any(row["errors"] for row in rows):
                rc = 1
            write_json(args.json, result)
    except (BudgetExceeded, KeyboardInterrupt) as e:
        reason = f"{type(e).__name__} {e}".strip()
        result["stopped"] = f"interrupted ({reason}) after {budget.elapsed():.0f} s"
        say(f"\nstopping: {result['stopped']}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in old_handlers.items():
            signal.signal(s, h)
    done = [r for r in result["cases"] if r["status"] != "not run"]
    result["elapsed_s"] = budget.elapsed()
    write_json(args.json, result)
    if "device" in result:
        say(
            f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}, commit {result['git']['commit']}; "
            f"copy bandwidth {result.get('bandwidth', 0) / 1e9:.0f} GB/s; bf16, random weights; "
            f"{len([r for r in done if r['status'] == 'done'])} of {len(result['cases'])} cases done in {result['elapsed_s']:.0f} s"
        )
    if done:
        say("")
        say(format_table(done))
        say("")
        say(legend(args.baseline_modes))
    not_run = [case_name(r) for r in result["cases"] if r["status"] == "not run"]
    if not_run:
        say(f"not run: {', '.join(not_run)}")
    flagged = [f"{case_name(r)} ({r['max_rel_err']:.2e})" for r in done if r["tol_exceeded"]]
    if flagged:
        say(f"FLAG: mkcompiler logits rel err above {args.tol:g}: {', '.join(flagged)}")
    if args.json:
        say(f"wrote {args.json}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
