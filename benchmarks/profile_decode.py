"""Profile one Llama decode step on the GPU: per-instruction stamps, saved for offline analysis.

    python benchmarks/profile_decode.py --model llama-3.2-1b --batch 1 --ctx 512 --out DIR

Writes DIR/stamps<tag>.npz (stamps, op names, opcode names, descs: for analysis by op name),
prints the profile's summary, then times the kernel and the call. Options after `--opt k=v` are passed
to mkcompiler.compile (Python literals parsed). Several `--variant "k=v k=v"` run one after another on
the same model in one process (A/B on one card), a SUMMARY line each at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from decode_latency import compile_options  # noqa: E402  (this directory: run as a script)
from stamps_report import save_stamps  # noqa: E402

import mkcompiler  # noqa: E402
from examples.llama import random_llama  # noqa: E402


def profile_variant(model, tok, pos, opts: dict, out: str, tag: str, ref: torch.Tensor) -> dict:
    """Compile, check against eager's logits `ref`, profile (stamps saved to out/stamps<tag>.npz,
    summary printed) and time one variant."""
    t0 = time.perf_counter()
    mk = mkcompiler.compile(model, (tok, pos), **opts)
    print(f"compiled in {time.perf_counter() - t0:.1f} s, {len(mk.queue)} instructions", flush=True)
    got = mk(tok, pos).float()
    err = float((got - ref).norm() / ref.norm())
    for _ in range(3):
        prof = mk.profile(tok, pos)
    save_stamps(mk, prof, os.path.join(out, f"stamps{tag}.npz"))
    print(prof.summary())  # per op kind, per SM, idle gaps (mkcompiler/tools/profiling.py)
    span = prof.span() / 1e3  # us
    kernel = triton.testing.do_bench(mk.launch, warmup=20, rep=200, return_mode="median")
    call = triton.testing.do_bench(lambda: mk(tok, pos), warmup=20, rep=200, return_mode="median")
    print(
        f"RESULT {opts}: kernel {kernel:.3f} ms, call {call:.3f} ms, profiled span {span / 1e3:.3f} ms, "
        f"logits rel err vs eager {err:.1e}",
        flush=True,
    )
    return {"options": opts, "kernel_ms": kernel, "call_ms": call, "span_ms": span / 1e3, "rel_err": err}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/mk_out"))
    p.add_argument("--tag", default="", help="suffix of the stamps file")
    p.add_argument("--opt", action="append", default=[], help="compile option k=v (every variant)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="space-separated k=v options of one variant (repeatable; each profiled and timed in this "
        "process on the same model; '' is --opt alone); stamps<tag>_<n>.npz",
    )
    args = p.parse_args()
    dev = "cuda"
    model = random_llama(args.model, dtype=torch.bfloat16, device=dev, max_seq_len=args.ctx + 8, max_batch=args.batch)
    tok = torch.randint(0, model.c.vocab_size, (args.batch, 1), device=dev)
    pos = torch.tensor([args.ctx], device=dev)
    with torch.no_grad():
        ref = model(tok, pos).float()  # eager's logits (the step writes the same cache slot each call)
    variants = args.variant or [""]
    results = []
    for n, variant in enumerate(variants):
        opts = compile_options(args.opt + variant.split())
        tag = args.tag if len(variants) == 1 else f"{args.tag}_{n}"
        print(f"=== variant {n}: {opts}", flush=True)
        try:
            results.append(profile_variant(model, tok, pos, opts, args.out, tag, ref))
        except Exception as e:  # noqa: BLE001  (one variant failing must not lose the others' figures)
            print(f"variant {n} failed: {type(e).__name__}: {e}", flush=True)
    for r in results:
        print(
            f"SUMMARY kernel {r['kernel_ms']:.3f} ms  call {r['call_ms']:.3f} ms  err {r['rel_err']:.1e}  {r['options']}"
        )


if __name__ == "__main__":
    main()
