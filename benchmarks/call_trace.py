"""Where a megakernel call's time goes beyond the kernel (issue 19): per spelling of
examples/llama.py, the host time of each part of `mk(tok, pos)` (bind, launch, error check with
its wait, output copy) and the GPU kernels one call runs (torch.profiler).

    python benchmarks/call_trace.py [--model llama-3.2-1b] [--ctx 512] [--calls 200]

One process; both spellings share weights, caches and tokens (decode_latency.build_model).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from decode_latency import build_model  # noqa: E402

import mkcompiler  # noqa: E402

PARTS = ("bind", "launch", "check", "outputs")


def parts_of_call(mk, tok, pos, calls: int) -> dict[str, float]:
    """Median host microseconds of each part of Megakernel.__call__ (check includes the wait for
    the kernel: it reads the error record)."""
    times = {p: [] for p in PARTS}
    for _ in range(calls):
        t0 = time.perf_counter()
        mk._bind((tok, pos), {})
        t1 = time.perf_counter()
        mk.launch()
        t2 = time.perf_counter()
        mk.check()
        t3 = time.perf_counter()
        mk.outputs()
        t4 = time.perf_counter()
        for p, a, b in zip(PARTS, (t0, t1, t2, t3), (t1, t2, t3, t4)):
            times[p].append((b - a) * 1e6)
    return {p: sorted(v)[len(v) // 2] for p, v in times.items()}


def kernels_of_call(mk, tok, pos) -> list[tuple[str, float]]:
    """(name, microseconds) of every GPU kernel or copy one call runs."""
    from torch.profiler import ProfilerActivity, profile

    mk(tok, pos)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        mk(tok, pos)
        torch.cuda.synchronize()
    return [
        (e.key[:70], e.device_time_total)
        for e in prof.key_averages()
        if e.device_time_total > 0 and e.self_device_time_total > 0
    ]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--spelling", nargs="+", default=["canonical", "written"])
    p.add_argument("--rounds", type=int, default=4, help="measuring rounds, the order alternating")
    args = p.parse_args()
    runs = {}
    for spelling in args.spelling:  # every model compiled first: then measured interleaved
        model = build_model(args.model, 1, args.ctx, 2, "cuda", spelling=spelling)
        tok = torch.randint(
            0, model.c.vocab_size, (1, 1), device="cuda", generator=torch.Generator("cuda").manual_seed(1)
        )
        pos = torch.tensor([args.ctx], device="cuda")
        mk = mkcompiler.compile(model, (tok, pos), cache=False)
        mk(tok, pos)
        runs[spelling] = (model, mk, tok, pos)
    # Rounds in alternating order (A B, then B A, ...): a difference that follows the order, not
    # the spelling, is the process (allocator, caches, clocks), not the megakernel's call path.
    for r in range(args.rounds):
        order = args.spelling if r % 2 == 0 else args.spelling[::-1]
        for spelling in order:
            _, mk, tok, pos = runs[spelling]
            kernel = triton.testing.do_bench(mk.launch, return_mode="median") * 1e3
            call = triton.testing.do_bench(lambda mk=mk, t=tok, q=pos: mk(t, q), return_mode="median") * 1e3
            parts = parts_of_call(mk, tok, pos, args.calls)
            print(
                f"== round {r} {spelling}: kernel {kernel:.1f} us, call {call:.1f} us (gap {call - kernel:.1f} us); "
                + "host parts (median us): "
                + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
            )
    for spelling, (_, mk, tok, pos) in runs.items():
        print(
            f"== {spelling}: {len(mk.graph.inputs)} inputs, {len(mk.buffers)} buffers, {len(mk.graph.outputs)} outputs"
        )
        for name, us in kernels_of_call(mk, tok, pos):
            print(f"   gpu {us:9.1f} us  {name}")


if __name__ == "__main__":
    main()
