"""Soak: 100,000 calls of a small decode megakernel in one process: no error, no slowdown, memory flat.

    python benchmarks/soak.py                                   # GPU: 100,000 calls
    python benchmarks/soak.py --launches 4 --window 2 --warmup 0 --max-ratio 100   # CPU smoke run

The model: the GPU tests' small Llama (dim 256, 2 layers, 8 heads / 2 KV heads, hidden 512,
vocab 1000, 1024 positions) in bf16 on a GPU; the "tiny" config in fp32 in the interpreter. KV
caches hold random values. Every call is a full call mk(tok, pos) (inputs bound and checked,
launch, error record read, outputs copied), cycling over 16 (token, position) pairs made on the
device beforehand, each call timed on the host.

Checks; the last line says SOAK PASS or SOAK FAIL and why (exit status 0 or 1):
- no call raised (a wait that gives up, a launch error);
- slowdown: the median call of the last window (--window calls) at most --max-ratio times the
  median of the first window (the first after --warmup calls). Medians: a host hiccup in one
  window does not decide it; a slowdown that lasts does;
- memory flat: CUDA memory allocated at the end of the first window and of the last equal within
  1 MiB; the process's resident memory grows by at most --max-rss-growth-mib;
- the logits still match eager at the end as at the start (bf16 5e-2, fp32 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The GPU tests' small Llama (tests/test_gpu.py test_llama_decode_matches_eager_on_the_gpu).
SMALL = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, hidden=512, vocab_size=1000, max_seq_len=1024)
TOL = {torch.bfloat16: 5e-2, torch.float32: 1e-4}
PAIRS = 16  # distinct (token, position) inputs the calls cycle over
MIB = 1 << 20
CUDA_GROWTH_BYTES = MIB


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Soak a small decode megakernel: many calls in one process.")
    p.add_argument("--launches", type=int, default=100_000, help="timed calls (default 100000)")
    p.add_argument("--window", type=int, default=1000, help="calls per window compared (default 1000)")
    p.add_argument("--warmup", type=int, default=100, help="untimed calls first (default 100)")
    p.add_argument("--max-ratio", type=float, default=1.10, help="last window's median over the first's (1.10)")
    p.add_argument("--max-rss-growth-mib", type=float, default=64.0, help="host memory growth allowed (64)")
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args(argv)
    if a.launches < 2 * a.window or a.window < 1:
        p.error("--launches must be at least twice --window (the first and the last window are compared)")
    return a


def rss_bytes() -> int:
    """Resident memory of this process (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def build(device: str):
    """(model, dtype, pairs): the soak's model with random caches, and the inputs it cycles over."""
    from examples.llama import fill_caches, random_llama

    if device == "cuda":
        dtype, model = torch.bfloat16, random_llama("tiny", dtype=torch.bfloat16, device="cuda", **SMALL)
    else:
        dtype, model = torch.float32, random_llama("tiny", dtype=torch.float32)
    fill_caches(model.eval())
    c = model.c
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, c.vocab_size, (PAIRS, 1, 1), generator=g).to(device)
    base = c.max_seq_len // 2
    pairs = [(toks[i], torch.tensor([base + i], device=device)) for i in range(PAIRS)]
    return model, dtype, pairs


def error_against_eager(mk, model, tok, pos) -> float:
    """Eager writes the step's cache slot, then the kernel does: both read the same other slots."""
    with torch.no_grad():
        want = model(tok, pos)
    out = mk(tok, pos)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def soak(args, device: str) -> dict:
    import mkcompiler

    model, dtype, pairs = build(device)
    t0 = time.perf_counter()
    mk = mkcompiler.compile(model, pairs[0])
    r = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"}
    r["compile_s"] = round(time.perf_counter() - t0, 2)
    r["instructions"], r["workers"] = len(mk.queue), mk.num_workers
    r["err_start"] = error_against_eager(mk, model, *pairs[0])
    for i in range(args.warmup):
        mk(*pairs[i % PAIRS])
    cuda = device == "cuda"
    times = np.zeros(args.launches)
    mem = {}
    r["launches_done"] = 0
    try:
        for i in range(args.launches):
            tok, pos = pairs[i % PAIRS]
            t = time.perf_counter()
            mk(tok, pos)
            times[i] = time.perf_counter() - t
            r["launches_done"] = i + 1
            if i + 1 in (args.window, args.launches):
                if cuda:
                    torch.cuda.synchronize()
                mem[i + 1] = (torch.cuda.memory_allocated() if cuda else 0, rss_bytes())
    except Exception as e:  # the soak's first criterion: report it, with where it happened
        r["error"] = f"call {r['launches_done']}: {type(e).__name__}: {e}"
        return r
    r["err_end"] = error_against_eager(mk, model, *pairs[0])
    w = args.window
    first, last = times[:w], times[-w:]
    r["first_median_ms"], r["last_median_ms"] = 1e3 * np.median(first), 1e3 * np.median(last)
    r["first_total_s"], r["last_total_s"] = first.sum(), last.sum()
    r["total_s"] = times.sum()
    r["window_medians_ms"] = [round(1e3 * float(np.median(times[k : k + w])), 4) for k in range(0, len(times), w)]
    (r["cuda_first"], r["rss_first"]), (r["cuda_last"], r["rss_last"]) = mem[w], mem[args.launches]
    r["tol"] = TOL[dtype]
    return r


def verdict(r: dict, args) -> list[str]:
    """What failed (empty: PASS)."""
    if "error" in r:
        return [r["error"]]
    problems = []
    ratio = r["last_median_ms"] / r["first_median_ms"]
    if ratio > args.max_ratio:
        problems.append(f"slowdown {ratio:.3f}x > {args.max_ratio}x")
    if abs(r["cuda_last"] - r["cuda_first"]) > CUDA_GROWTH_BYTES:
        problems.append(f"CUDA memory {r['cuda_first'] / MIB:.1f} -> {r['cuda_last'] / MIB:.1f} MiB")
    if r["rss_last"] - r["rss_first"] > args.max_rss_growth_mib * MIB:
        problems.append(f"host memory {r['rss_first'] / MIB:.0f} -> {r['rss_last'] / MIB:.0f} MiB")
    for when in ("err_start", "err_end"):
        if not r[when] <= r["tol"]:
            problems.append(f"logits off eager at the {when[4:]}: rel err {r[when]:.3g} > {r['tol']:g}")
    return problems


def report(r: dict, args) -> str:
    if "error" in r:
        return f"{r['launches_done']} calls before the error"
    ratio = r["last_median_ms"] / r["first_median_ms"]
    return (
        f"{r['launches_done']} calls in {r['total_s']:.1f} s on {r['device']} ({r['instructions']} instructions, "
        f"{r['workers']} workers, compiled in {r['compile_s']} s); median call {r['first_median_ms']:.4f} ms in the "
        f"first {args.window}, {r['last_median_ms']:.4f} ms in the last ({ratio:.3f}x; totals "
        f"{r['first_total_s']:.3f} s, {r['last_total_s']:.3f} s); CUDA memory {r['cuda_first'] / MIB:.1f} -> "
        f"{r['cuda_last'] / MIB:.1f} MiB; host {r['rss_first'] / MIB:.0f} -> {r['rss_last'] / MIB:.0f} MiB; rel err "
        f"vs eager {r['err_start']:.2e} -> {r['err_end']:.2e}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    r = soak(args, device)
    problems = verdict(r, args)
    r["passed"], r["problems"] = not problems, problems
    print(report(r, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: (float(v) if isinstance(v, np.floating) else v) for k, v in r.items()}, f, indent=1)
    print("SOAK PASS" if not problems else "SOAK FAIL: " + "; ".join(problems), flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
