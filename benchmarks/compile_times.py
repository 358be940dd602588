"""Cold and warm compile times of a Llama decode step (issue 5): each in a fresh process.

    python benchmarks/compile_times.py --model llama-3.2-1b

cold: an empty mkcompiler cache (and Triton's cache left as it is: the first call's Triton
compile is reported separately); warm: a second process with the same mkcompiler cache. Prints
one line per process: mkcompiler.compile seconds, cache status, first-call seconds.
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
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
