"""The models benchmarks/sanitize.sh runs under compute-sanitizer: each compiled, called a few
times on fresh inputs with outputs poisoned first, and compared with eager.

    python benchmarks/sanitize_models.py [--calls 3] [--max-spin N] [--fuzz 6] [--only NAME ...]
    python benchmarks/sanitize_models.py --list

On a GPU (one worker per SM): the GPU tests' small MLPs (tests/test_gpu.py CASES) in fp32 and
bf16, static and dynamic; random models with ragged shapes (tests/fuzz_campaign.py, seed 0);
the GPU tests' small Llama decode (bf16, with defaults and with split_k=2) and the tiny Llama
decode. In the interpreter (a smoke run of this script): small MLPs and the fuzz models only.
One line per model ("ok" or "FAIL"), then "sanitize models: N ok, M failed"; exit status 1 when
any failed. --max-spin raises the wait bound: under memcheck every instruction is slower, and
a waiting worker must not give up on a producer that is only slow. --num-workers: fewer
workers, should the cooperative launch not fit beside the tool.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

# The GPU tests' small Llama (tests/test_gpu.py test_llama_decode_matches_eager_on_the_gpu).
SMALL_LLAMA = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, hidden=512, vocab_size=1000, max_seq_len=1024)
LLAMA_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class Check:
    """A model to run: build(device) gives (model, make_inputs(call) -> args, tolerance)."""

    name: str
    build: Callable
    options: tuple = ()


def mlp(cls_name: str, kwargs: dict, shape: tuple, dtype: torch.dtype):
    """A tests/models.py MLP, compared with eager in float64 (tests/helpers.reference)."""

    def build(device):
        import models
        from helpers import TOL

        torch.manual_seed(0)
        model = getattr(models, cls_name)(**kwargs).to(device, dtype)
        return model, lambda call: (torch.randn(*shape, device=device, dtype=dtype),), TOL[dtype]

    return build


def llama(dtype: torch.dtype, shape: dict | None):
    """examples/llama.py's decode step with random caches, compared with eager in its dtype."""

    def build(device):
        from examples.llama import fill_caches, random_llama

        model = random_llama("tiny", dtype=dtype, device=device, **(shape or {}))
        fill_caches(model.eval())
        c = model.c

        def inputs(call):
            tok = torch.randint(0, c.vocab_size, (1, 1), device=device)
            return tok, torch.tensor([c.max_seq_len // 2 + call], device=device)

        return model, inputs, LLAMA_TOL[dtype]

    return build


def checks(device: str) -> list[Check]:
    gpu = device == "cuda"
    cases = [
        ("ResidualMLP", dict(dim=256, hidden=512), (8, 256)),
        ("TransformerMLP", dict(dim=256, hidden=1024, layers=2), (4, 256)),
    ]
    if not gpu:  # interpreter-sized
        cases = [("ResidualMLP", dict(dim=32, hidden=48), (3, 32))]
    out = []
    for cls_name, kwargs, shape in cases:
        for dtype, schedule in ((torch.float32, "static"), (torch.bfloat16, "dynamic")):
            if not gpu:
                schedule = "dynamic"
            name = f"{cls_name}{shape} {str(dtype)[6:]} {schedule}"
            out.append(Check(name, mlp(cls_name, kwargs, shape, dtype), (("schedule", schedule),)))
    if gpu:
        out.append(Check("small Llama decode bf16", llama(torch.bfloat16, SMALL_LLAMA)))
        out.append(Check("small Llama decode bf16 split_k=2", llama(torch.bfloat16, SMALL_LLAMA), (("split_k", 2),)))
        out.append(Check("tiny Llama decode fp32", llama(torch.float32, None)))
    return out


def run_check(check: Check, device: str, calls: int, extra: dict) -> str | None:
    """Compile, then `calls` poisoned calls against eager in float64. The problem, or None."""
    from helpers import reference, rel_err

    import mkcompiler
    from examples.llama import Llama

    model, make_inputs, tol = check.build(device)
    mk = mkcompiler.compile(model, make_inputs(0), **dict(check.options), **extra)
    for call in range(calls):
        args = make_inputs(call)
        with torch.no_grad():  # a Llama's eager step writes its cache slot first, then the kernel does
            want = model(*args) if isinstance(model, Llama) else reference(model, args)
        mk.poison()
        err = rel_err(mk(*args), want)
        if not err <= tol:
            return f"call {call}: relative error {err:.3g} > {tol:g}"
    return None


def run_fuzz(n: int, device: str, calls: int, extra: dict) -> list[tuple[str, str | None]]:
    from fuzz_campaign import Config, draw_cases, run_case

    small = dict(max_steps=4, max_numel=256) if device == "cpu" else {}
    cases = draw_cases(Config(seed=0, models=n, device=device, **small))
    out = []
    for i, case in enumerate(cases):
        kinds = ",".join(s.kind for s in case.program.steps)
        problem = run_case(case.with_options(**extra), device, calls).problem
        out.append((f"fuzz model {i} ({kinds})", problem))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Small models' megakernels, run for compute-sanitizer.")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--max-spin", type=int, default=None, help="polls before a wait gives up (Settings.max_spin)")
    p.add_argument("--num-workers", type=int, default=None, help="workers (default: one per SM)")
    p.add_argument("--fuzz", type=int, default=6, help="random models (tests/fuzz_campaign.py, seed 0)")
    p.add_argument("--only", nargs="*", default=None, help="run only the named models (see --list)")
    p.add_argument("--list", action="store_true")
    a = p.parse_args(argv)
    import mkcompiler  # noqa: F401  (before any kernel: chooses the interpreter without a GPU)

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    todo = checks(device)
    if a.list:
        print("\n".join(c.name for c in todo))
        return 0
    if a.only is not None:
        todo = [c for c in todo if c.name in a.only]
    extra = {k: v for k, v in (("max_spin", a.max_spin), ("num_workers", a.num_workers)) if v is not None}
    results = []
    for check in todo:
        t0 = time.perf_counter()
        try:
            problem = run_check(check, device, a.calls, extra)
        except Exception:
            problem = traceback.format_exc(limit=3).strip().replace("\n", " | ")
        results.append((check.name, problem))
        print(f"{'ok' if problem is None else 'FAIL'} {check.name} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if problem:
            print(f"    {problem}", flush=True)
    if a.only is None and a.fuzz:
        for name, problem in run_fuzz(a.fuzz, device, a.calls, extra):
            results.append((name, problem))
            print(f"{'ok' if problem is None else 'FAIL'} {name}" + (f"\n    {problem}" if problem else ""), flush=True)
    failed = sum(problem is not None for _, problem in results)
    print(f"sanitize models: {len(results) - failed} ok, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
