"""Prefill matmul efficiency: what share of the measured bf16 matmul rate the megakernel's
matmul instructions reach on a matmul-bound prefill (issue 7's second figure; also the large-M
tiles tensor-parallel prefill and large-batch decode run on), for compile variants side by side.

    python benchmarks/prefill_matmul.py --model llama-3.1-8b --layers 2 --tokens 2048 \\
        --variant "" --variant "matmul_tile=(128,128,64)" --json /tmp/prefill.json
    python benchmarks/prefill_matmul.py --dry-run     # no GPU: tiny shapes in the interpreter

Random bf16 weights of the model's real shapes (examples/llama.py) with --layers layers, one
sequence of --tokens tokens at positions 0..T-1 (logits of every position: the LM head is a
matmul like the others). Per run:
- the reference rate: every matmul of the compiled graph (M, N, K as the megakernel runs them)
  timed alone with torch.mm (cuBLAS) on fresh random bf16 operands; rate = their FLOPs / their
  summed times (the "measured bf16 matmul rate" for exactly this work);
- per variant (each --variant is a space-separated list of k=v compile options; "" is the
  default): compile, a first call checked against eager (relative error of the logits), the
  kernel timed (`mk.launch()`, do_bench median), then one profiled run: the matmul
  instructions' FLOPs / (their summed ready->end time / workers) is the rate the matmul
  instructions reach while they run, printed as a share of the reference rate; the matmul FLOPs
  / the whole kernel's time is printed beside it;
- baselines in the same process: eager, and torch.compile in --baseline-modes (default
  max-autotune-no-cudagraphs and max-autotune; "none" for none).
--time-budget S skips what its estimate says would end after S seconds. --opt K=V (repeatable)
applies to every variant (`--opt backend=gluon`: each variant on the Gluon backend; a row records
the backend that ran it and any fallback warning). --mlp-only times the layers' MLPs alone
(x + down(silu(gate(x)) * up(x)) per layer on random hidden states: no norms, attention,
embedding or LM head), a graph of matmuls and elementwise ops the Gluon backend runs whole:

    python benchmarks/prefill_matmul.py --mlp-only --opt backend=gluon --variant "" --json /tmp/gluon.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from benchmarks.decode_latency import (  # noqa: E402
    bench,
    compile_options,
    default_dtype_and_device,
    free_memory,
    git_info,
    rel,
)
from benchmarks.stamps_report import save_stamps  # noqa: E402
from examples.llama import random_llama  # noqa: E402

DEFAULT_MODES = ("max-autotune-no-cudagraphs", "max-autotune")
ESTIMATE_S = {"variant": 150.0, "baseline": 240.0}  # per phase, before one was measured (8B, 2 layers)


def say(*a) -> None:
    print(*a, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Prefill matmul efficiency of the megakernel against cuBLAS.")
    p.add_argument("--model", default="llama-3.1-8b", help="examples/llama.py CONFIGS name (default llama-3.1-8b)")
    p.add_argument("--layers", type=int, default=2, help="layers built (default 2)")
    p.add_argument("--tokens", type=int, default=2048, help="prefill tokens (default 2048)")
    p.add_argument("--variant", action="append", default=None, metavar="OPTS", help='k=v options ("": default)')
    p.add_argument("--baseline-modes", default=",".join(DEFAULT_MODES), help='torch.compile modes, or "none"')
    p.add_argument("--time-budget", type=float, default=None, help="seconds: skip what would end after this")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rep", type=int, default=50, help="do_bench repetition time (ms)")
    p.add_argument("--dry-run", action="store_true", help="no GPU: tiny model, 8 tokens, the Triton interpreter")
    p.add_argument("--opt", action="append", default=[], metavar="K=V", help="an option for every variant")
    p.add_argument("--mlp-only", action="store_true", help="the layers' MLPs alone (no norms, attention, head)")
    p.add_argument(
        "--stamps",
        default=None,
        metavar="DIR",
        help="save each variant's per-instruction stamps as DIR/stamps_<n>.npz (stamps_report.py reads them) "
        "and print its profile summary (waiting per worker)",
    )
    return p


class MLPStack(torch.nn.Module):
    """The Llama's layers' MLPs with their residual adds, nothing else: x [T, dim] -> [T, dim]."""

    def __init__(self, llama):
        super().__init__()
        self.mlps = torch.nn.ModuleList(layer.mlp for layer in llama.layers)

    def forward(self, x):
        for mlp in self.mlps:
            x = x + mlp(x)
        return x


def parse_args(argv=None) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    a.variant = a.variant if a.variant is not None else [""]
    a.modes = [] if a.baseline_modes.strip() == "none" else [m for m in a.baseline_modes.split(",") if m]
    if a.dry_run:
        a.model, a.layers, a.tokens, a.modes = "tiny", 1, 8, []
    return a


def timer(args):
    """ms per call: do_bench's median on a GPU (decode_latency.bench); wall time of a call in the
    dry run."""
    if torch.cuda.is_available():
        return lambda fn: bench(fn, args)

    def host(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return host


def matmul_shapes(mk) -> dict[tuple[int, int, int], int]:
    """(M, N, K) -> how many matmul ops of the compiled graph have it."""
    shapes: dict[tuple[int, int, int], int] = {}
    for op in mk.graph.ops:
        if op.kind == "matmul":
            a, c = op.inputs[0], op.outputs[0]
            key = (c.shape[-2], c.shape[-1], a.shape[-1])
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def reference_rate(shapes: dict, time_ms, device, dtype) -> dict:
    """cuBLAS (torch.mm) on every shape: total FLOPs / total time, and each shape's rate."""
    per, flops, ms = {}, 0.0, 0.0
    for (m, n, k), count in shapes.items():
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = time_ms(lambda a=a, b=b: torch.mm(a, b))
        per[f"{m}x{n}x{k}"] = {"count": count, "ms": t, "tflops": 2 * m * n * k / (t * 1e-3) / 1e12}
        flops, ms = flops + count * 2.0 * m * n * k, ms + count * t
        del a, b
    return {"tflops": flops / (ms * 1e-3) / 1e12, "ms": ms, "flops": flops, "shapes": per}


def matmul_rate(prof) -> dict:
    """From a profile: matmul FLOPs over their busy time spread across the workers, and over the
    kernel's span; the matmul share of the busy time."""
    import numpy as np

    ok, worker, _, ready, end, _ = prof._times()
    kinds = np.array(prof.kinds(), dtype=object)
    _, flops = prof.work()
    sel = ok & (kinds == "matmul")
    workers = len(set(worker[ok].tolist()))
    busy = float((end - ready)[sel].sum())
    span = prof.span()
    f = float(flops[sel].sum())
    out = {"flops": f, "busy_share": busy / max(float((end - ready)[ok].sum()), 1.0), "unit": prof.unit}
    if prof.unit == "ns" and busy and span:
        out["tflops_busy"] = f / (busy / workers * 1e-9) / 1e12
        out["tflops_span"] = f / (span * 1e-9) / 1e12
    return out


def run_variant(model, inputs, opts_text: str, ref_logits, time_ms, stamps: str | None = None) -> dict:
    import mkcompiler

    row = {"variant": opts_text or "default"}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mk = mkcompiler.compile(model, inputs, **compile_options(opts_text.split()))
    row["compile_s"] = time.perf_counter() - t0
    row["backend"] = type(mk).__name__
    fallback = [str(w.message) for w in caught if "backend=" in str(w.message)]
    if fallback:
        row["fallback"] = fallback[0][:2000]
        say(f"  {row['variant']}: {row['fallback'][:400]}")
    row["instructions"], row["workers"] = len(mk.queue), mk.num_workers
    row["tiles"] = sorted({str(op.attrs.tile) for op in mk.graph.ops if op.kind == "matmul"})
    out = mk(*inputs)
    row["rel_err"] = rel(out.float(), ref_logits)
    row["kernel_ms"] = time_ms(mk.launch)
    mk.check()
    prof = mk.profile(*inputs)
    row["matmul"] = matmul_rate(prof)
    if stamps is not None:
        save_stamps(mk, prof, stamps)
        row["stamps"] = stamps
        say(prof.summary())
    row["shapes"] = matmul_shapes(mk)
    say(
        f"  {row['variant']}: {row['instructions']} instructions, tiles {', '.join(row['tiles'])}; "
        f"kernel {row['kernel_ms']:.3f} ms; rel err vs eager {row['rel_err']:.2e}"
    )
    return row


def run_baselines(model, inputs, modes, time_ms, rows: dict, budget) -> None:
    with torch.no_grad():
        rows["eager"] = time_ms(lambda: model(*inputs))
        for mode in modes:
            if not budget("baseline"):
                say(f"  torch.compile {mode}: skipped (time budget)")
                continue
            torch._dynamo.reset()
            f = torch.compile(model, mode=mode, fullgraph=True)
            for _ in range(3):  # CUDA graphs are recorded on a later call
                f(*inputs)
            rows[f"torch.compile {mode}"] = time_ms(lambda f=f: f(*inputs))
            torch._dynamo.reset()
    say("  baselines: " + ", ".join(f"{k} {v:.3f} ms" for k, v in rows.items()))


def table(result: dict) -> str:
    ref = result["reference"]["tflops"]
    best = min(result["baselines"].values()) if result["baselines"] else None
    lines = [
        f"### prefill {result['tokens']} tokens, {result['model']} x {result['layers']} layers, {result['device']}",
        "",
        f"cuBLAS on the same matmuls: {ref:.1f} TFLOP/s ({result['reference']['ms']:.3f} ms in all)",
        "",
        "| variant | tiles | kernel ms | vs best baseline | matmul TFLOP/s while running | % of cuBLAS "
        "| matmul TFLOP/s over the kernel | rel err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["variants"]:
        if "kernel_ms" not in r:
            lines.append(f"| {r['variant']} | {r.get('error') or r.get('skipped', '')} | | | | | | |")
            continue
        m = r["matmul"]
        vs = f"{best / r['kernel_ms']:.2f}x" if best else "—"
        rates = "— | — | —"
        if m.get("tflops_busy"):
            rates = f"{m['tflops_busy']:.1f} | {100 * m['tflops_busy'] / ref:.1f}% | {m['tflops_span']:.1f}"
        lines.append(
            f"| {r['variant']} | {' '.join(r['tiles'])} | {r['kernel_ms']:.3f} | {vs} | {rates} | {r['rel_err']:.2e} |"
        )
    for k, v in result["baselines"].items():
        lines.append(f"| {k} | | {v:.3f} | {best / v:.2f}x | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        say("prefill_matmul needs a CUDA GPU (or --dry-run)")
        return 2
    start = time.perf_counter()
    spent: dict[str, float] = {}

    def budget(phase: str) -> bool:
        if args.time_budget is None:
            return True
        need = spent.get(phase, ESTIMATE_S[phase]) * 1.3
        return time.perf_counter() - start + need < args.time_budget

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    time_ms = timer(args)
    with default_dtype_and_device(dtype, device):
        model = random_llama(args.model, dtype=dtype, device=device, n_layers=args.layers, max_seq_len=args.tokens)
    model.eval()
    gen = torch.Generator(device=device).manual_seed(1)
    if args.mlp_only:
        model = MLPStack(model).eval()
        dim = model.mlps[0].gate.in_features
        inputs = (torch.randn(args.tokens, dim, device=device, generator=gen).to(dtype),)
    else:
        tokens = torch.randint(0, model.c.vocab_size, (1, args.tokens), device=device, generator=gen)
        inputs = (tokens, torch.arange(args.tokens, device=device))
    with torch.no_grad():
        ref_logits = model(*inputs).float()
    result = {
        "model": args.model,
        "layers": args.layers,
        "tokens": args.tokens,
        "mlp_only": args.mlp_only,
        "opt": args.opt,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU (interpreter)",
        "git": git_info(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "variants": [],
        "baselines": {},
    }
    say(f"prefill_matmul: {args.model} x {args.layers} layers, {args.tokens} tokens, {result['device']}")
    for n, opts in enumerate(args.variant):
        opts = " ".join([*args.opt, opts]).strip()
        stamps = os.path.join(args.stamps, f"stamps_{n}.npz") if args.stamps else None
        if not budget("variant"):
            result["variants"].append({"variant": opts or "default", "skipped": "time budget"})
            continue
        t0 = time.perf_counter()
        try:
            row = run_variant(model, inputs, opts, ref_logits, time_ms, stamps)
        except Exception as e:  # noqa: BLE001 - one variant's failure must not lose the others
            row = {"variant": opts or "default", "error": f"{type(e).__name__}: {str(e)[:2000]}"}
            say(f"  {row['variant']} FAILED: {row['error'][:400]}")
        result["variants"].append(row)
        spent["variant"] = time.perf_counter() - t0
        free_memory()
    shapes = next((r["shapes"] for r in result["variants"] if "shapes" in r), {})
    result["reference"] = reference_rate(shapes, time_ms, device, dtype)
    for r in result["variants"]:
        r["shapes"] = {f"{m}x{n}x{k}": c for (m, n, k), c in r.get("shapes", {}).items()}
    t0 = time.perf_counter()
    run_baselines(model, inputs, args.modes, time_ms, result["baselines"], budget)
    spent["baseline"] = time.perf_counter() - t0
    say("")
    say(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 1 if any("error" in r for r in result["variants"]) else 0


if __name__ == "__main__":
    sys.exit(main())
