"""Llama decode/prefill on the GPU: correctness against eager and timing against baselines.

    python benchmarks/bench_llama.py --model llama-3.2-1b --batch 1 --ctx 512 --prefill 512

Random bf16 weights of the real shapes (examples/llama.py). Checks prefill and decode logits
against an eager copy of the same model, then times one decode step: mkcompiler (call and
kernel only), eager, torch.compile max-autotune without and with CUDA graphs, all in this
process; prints ms, ratios and % of the HBM floor (weight + KV-cache bytes / copy bandwidth).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mkcompiler  # noqa: E402
from benchmarks.bench_mlp import copy_bandwidth  # noqa: E402
from examples.llama import random_llama  # noqa: E402


def say(*a) -> None:
    print(*a, flush=True)


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def greedy_loop(model, ref, tok, args) -> dict:
    """N greedy tokens as N back-to-back launches of one megakernel (state on the device), then
    the same N tokens from eager: how many agree before the first difference (bf16 near-ties)."""
    from examples.llama import GreedyLoop

    loop = GreedyLoop(model, args.batch, args.loop)
    mk = mkcompiler.compile(loop, ())
    start = args.ctx + args.steps  # the slots after the checked decode steps
    loop.start(tok, start)
    mk.launch()  # warm-up (compiles); restart the loop state afterwards
    mk.check()
    loop.start(tok, start)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.loop):
        mk.launch()  # no host work in between: no sync, no copies, no checks
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / args.loop
    mk.check()
    got = loop.generated.clone()
    t, want = tok, []
    for i in range(args.loop):
        t = ref(t, torch.tensor([start + i], device=tok.device))[:, -1].argmax(-1, keepdim=True)
        want.append(t)
    want = torch.cat(want, dim=1)
    agree = int((got == want).all(0).long().cumprod(0).sum().item())
    say(
        f"greedy loop: {args.loop} tokens, {ms:.3f} ms/token ({1e3 / ms:.0f} tokens/s per sequence), "
        f"{agree}/{args.loop} leading tokens equal to eager"
    )
    return dict(ms_per_token=ms, agree=agree, tokens=args.loop)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ctx", type=int, default=512, help="decode position (tokens already in the cache)")
    p.add_argument("--prefill", type=int, default=0, help="also compile and check a prefill of this many tokens")
    p.add_argument("--steps", type=int, default=4, help="decode steps checked against eager")
    p.add_argument("--baselines", action="store_true", help="time torch.compile baselines too")
    p.add_argument("--loop", type=int, default=0, help="generate this many tokens with GreedyLoop: launches only")
    p.add_argument(
        "--fp32-ref",
        action="store_true",
        help="also compare mkcompiler and eager bf16 with an fp32 copy of the model (more memory)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = "cuda"
    max_seq = max(args.ctx + args.steps + args.loop + 1, args.prefill + 1)
    model = random_llama(args.model, dtype=torch.bfloat16, device=dev, max_seq_len=max_seq, max_batch=args.batch)
    ref = copy.deepcopy(model)
    ref32 = copy.deepcopy(model).float() if args.fp32_ref else None
    c = model.c
    res: dict = dict(device=torch.cuda.get_device_name(), args=vars(args))
    gen = torch.Generator(device=dev).manual_seed(1)
    if args.prefill:
        toks = torch.randint(0, c.vocab_size, (args.batch, args.prefill), device=dev, generator=gen)
        pos = torch.arange(args.prefill, device=dev)
        t0 = time.perf_counter()
        pre = mkcompiler.compile(model, (toks, pos))
        res["prefill_compile_s"] = time.perf_counter() - t0
        say(f"prefill compiled in {res['prefill_compile_s']:.1f} s: {len(pre.queue)} instructions")
        got, want = pre(toks, pos), ref(toks, pos)
        res["prefill_err"] = rel(got, want)
        if ref32 is not None:
            truth = ref32(toks, pos)
            res["prefill_vs_fp32"] = (rel(got, truth), rel(want, truth))
            say(f"prefill vs fp32 model: mkcompiler {rel(got, truth):.2e}, eager bf16 {rel(want, truth):.2e}")
        del got, want
        res["prefill_ms"] = triton.testing.do_bench(lambda: pre(toks, pos), warmup=5, rep=50, return_mode="median")
        res["prefill_eager_ms"] = triton.testing.do_bench(
            lambda: ref(toks, pos), warmup=5, rep=50, return_mode="median"
        )
        say(
            f"prefill {args.prefill}: rel err {res['prefill_err']:.1e}, {res['prefill_ms']:.2f} ms (eager {res['prefill_eager_ms']:.2f} ms)"
        )
    # Fill the caches up to ctx (same contents in both models), then check decode steps.
    for i, (layer, rlayer) in enumerate(zip(model.layers, ref.layers)):
        for name in ("k_cache", "v_cache"):
            t = torch.randn_like(getattr(layer.attn, name)) * 0.5
            getattr(layer.attn, name).copy_(t)
            getattr(rlayer.attn, name).copy_(t)
            if ref32 is not None:
                getattr(ref32.layers[i].attn, name).copy_(t)
    tok = torch.randint(0, c.vocab_size, (args.batch, 1), device=dev, generator=gen)
    pos = torch.tensor([args.ctx], device=dev)
    t0 = time.perf_counter()
    dec = mkcompiler.compile(model, (tok, pos))
    res["decode_compile_s"] = time.perf_counter() - t0
    res["instructions"] = len(dec.queue)
    say(f"decode compiled in {res['decode_compile_s']:.1f} s: {len(dec.queue)} instructions; timings {dec.timings}")
    errs = []
    for i in range(args.steps):
        pos = torch.tensor([args.ctx + i], device=dev)
        out, expect = dec(tok, pos), ref(tok, pos)
        errs.append(rel(out, expect))
        extra = ""
        if ref32 is not None:
            truth = ref32(tok, pos)
            res.setdefault("vs_fp32", []).append((rel(out, truth), rel(expect, truth)))
            extra = f"; vs fp32 model: mkcompiler {rel(out, truth):.2e}, eager bf16 {rel(expect, truth):.2e}"
        say(f"decode step {i}: rel err vs eager bf16 {errs[-1]:.2e}{extra}")
        tok = expect[:, -1].argmax(-1, keepdim=True)
    res["decode_errs"] = errs
    res["cache_err"] = max(rel(a.attn.k_cache, b.attn.k_cache) for a, b in zip(model.layers, ref.layers))
    pos = torch.tensor([args.ctx], device=dev)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    kv_bytes = 2 * c.n_layers * args.batch * c.n_kv_heads * (args.ctx + 1) * c.head_dim * 2
    bw = copy_bandwidth()
    floor = (weight_bytes + kv_bytes) / bw * 1e3
    rows = {
        "mkcompiler call": triton.testing.do_bench(lambda: dec(tok, pos), warmup=20, rep=200, return_mode="median"),
        "mkcompiler kernel": triton.testing.do_bench(dec.launch, warmup=20, rep=200, return_mode="median"),
        "eager": triton.testing.do_bench(lambda: ref(tok, pos), warmup=5, rep=50, return_mode="median"),
    }
    say(
        f"mkcompiler {rows['mkcompiler call']:.3f} ms/step (kernel {rows['mkcompiler kernel']:.3f}), eager {rows['eager']:.3f}"
    )
    if args.baselines:
        with torch.no_grad():
            for mode, name in (
                ("max-autotune-no-cudagraphs", "torch.compile max-autotune (no graphs)"),
                ("max-autotune", "torch.compile max-autotune + CUDA graphs"),
            ):
                torch._dynamo.reset()
                f = torch.compile(ref, mode=mode, fullgraph=True)
                for _ in range(3):
                    f(tok, pos)
                rows[name] = triton.testing.do_bench(lambda f=f: f(tok, pos), warmup=20, rep=200, return_mode="median")
                say(f"{name}: {rows[name]:.3f} ms")
    if args.loop:
        res["loop"] = greedy_loop(model, ref, tok, args)
    res.update(floor_ms=floor, bw=bw, ms=rows)
    print(
        f"\n{res['device']}: {args.model} batch {args.batch} ctx {args.ctx} bf16; {len(dec.queue)} instructions; "
        f"floor {floor:.3f} ms ({(weight_bytes + kv_bytes) / 1e9:.2f} GB at {bw / 1e9:.0f} GB/s)"
    )
    print(
        f"decode rel err per step {', '.join(f'{e:.1e}' for e in errs)}; kv-cache rel err {res['cache_err']:.1e}; "
        f"decode compile {res['decode_compile_s']:.1f} s"
    )
    if args.prefill:
        print(
            f"prefill {args.prefill}: rel err {res['prefill_err']:.1e}, {res['prefill_ms']:.2f} ms "
            f"(eager {res['prefill_eager_ms']:.2f} ms), compile {res['prefill_compile_s']:.1f} s"
        )
    print(f"{'decode step':<44}{'ms':>9}{'% floor':>9}{'vs mk':>8}")
    for k, ms in rows.items():
        print(f"{k:<44}{ms:>9.3f}{100 * floor / ms:>8.1f}%{ms / rows['mkcompiler call']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
