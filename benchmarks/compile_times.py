"""Cold and warm compile times of a Llama decode step (issue 5): each in a fresh process.

    python benchmarks/compile_times.py --model llama-3.2-1b

cold: an empty mkcompiler cache (and Triton's cache left as it is: the first call's Triton
compile is reported separately); warm: a second process with the same mkcompiler cache. Prints
one line per process: mkcompiler.compile seconds, cache status, first-call seconds.

    python benchmarks/compile_times.py --model llama-3.2-1b --stages [--prefill 512]

--stages: where the compile's time goes (issue 21: a serving engine precompiles ~20 step
shapes), in this process, with no cache: a decode step (and with --prefill N a prefill of N
tokens), each stage's seconds (capture, every pass, codegen). Without a GPU the kernel is only
generated (interpret=False, nothing launches), with --workers programs (132: an H100's SMs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def one(model_name: str) -> dict:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import mkcompiler
    from examples.llama import random_llama

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_llama(model_name, dtype=torch.bfloat16, device=dev, max_seq_len=520, max_batch=1)
    tok = torch.randint(0, model.c.vocab_size, (1, 1), device=dev)
    pos = torch.tensor([512], device=dev)
    t0 = time.perf_counter()
    mk = mkcompiler.compile(model, (tok, pos), progress=False)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mk(tok, pos)
    if dev == "cuda":
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - t0
    status = getattr(mk.compilation, "cache", "?")
    return dict(compile_s=compile_s, cache=status, first_call_s=first_call_s, instructions=len(mk.queue))


def stages(model_name: str, prefill: int, workers: int) -> None:
    """Per-stage compile seconds of a decode step and (prefill > 0) a prefill, no cache."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import mkcompiler
    from examples.llama import fill_caches, random_llama

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = fill_caches(random_llama(model_name, dtype=torch.bfloat16, device=dev, max_seq_len=1024, max_batch=1))
    shapes = {"decode": (torch.tensor([[5]], device=dev), torch.tensor([512], device=dev))}
    if prefill:
        tokens = torch.randint(0, model.c.vocab_size, (1, prefill), device=dev)
        shapes[f"prefill {prefill}"] = (tokens, torch.arange(prefill, device=dev))
    for name, inputs in shapes.items():
        t0 = time.perf_counter()
        mk = mkcompiler.compile(model, inputs, interpret=False, num_workers=workers, cache=False, progress=False)
        total = time.perf_counter() - t0
        timings = mk.compilation.timings
        codegen = total - sum(timings.values())  # codegen and the Megakernel's set-up: what is left
        shown = " ".join(f"{k} {v:.2f}" for k, v in timings.items() if v >= 0.005)
        print(f"{name}: {total:.2f} s, {len(mk.queue)} instructions: {shown} codegen+rest {codegen:.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--stages", action="store_true", help="per-stage seconds in this process, no cache")
    p.add_argument("--prefill", type=int, default=0, help="with --stages: also a prefill of this many tokens")
    p.add_argument("--workers", type=int, default=132, help="with --stages: num_workers")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.stages:
        stages(a.model, a.prefill, a.workers)
        return
    if a.child:
        print("RESULT " + json.dumps(one(a.model)), flush=True)
        return
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, MKCOMPILER_CACHE=cache)
        for what in ("cold", "warm"):
            out = subprocess.run(
                [sys.executable, __file__, "--model", a.model, "--child"], env=env, capture_output=True, text=True
            )
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{what}: failed\n{out.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(line[7:])
            print(
                f"{what}: mkcompiler.compile {r['compile_s']:.2f} s (cache {r['cache']}), first call "
                f"(Triton compile or its cache) {r['first_call_s']:.2f} s, {r['instructions']} instructions",
                flush=True,
            )


if __name__ == "__main__":
    main()
