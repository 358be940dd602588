"""Decode-shaped benchmark: a stack of Llama-style MLP blocks at batch 1, bf16.

Baselines run in the same process: eager, torch.compile max-autotune without and with CUDA
graphs. Prints ms per call, ratios, and the percentage of the HBM floor (weight bytes /
measured copy bandwidth).

    python benchmarks/bench_mlp.py --dim 2048 --hidden 8192 --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from models import TransformerMLP  # noqa: E402

import mkcompiler  # noqa: E402


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-compile-baselines", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = TransformerMLP(args.dim, args.hidden, args.layers).cuda().to(torch.bfloat16)
    x = torch.randn(args.batch, args.dim, device="cuda", dtype=torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth()
    floor_ms = weight_bytes / bw * 1e3
    mk = mkcompiler.compile(model, (x,))
    ref = model(x)
    err = ((mk(x).float() - ref.float()).norm() / ref.float().norm()).item()
    rows = {"eager": bench(lambda: model(x))}
    rows["mkcompiler call"] = bench(lambda: mk(x))
    rows["mkcompiler kernel"] = bench(mk.launch)
    if not args.no_compile_baselines:
        with torch.no_grad():
            c1 = torch.compile(model, mode="max-autotune-no-cudagraphs")
            c1(x)
            rows["torch.compile max-autotune (no graphs)"] = bench(lambda: c1(x))
            torch._dynamo.reset()
            c2 = torch.compile(model, mode="max-autotune")
            for _ in range(3):
                c2(x)
            rows["torch.compile max-autotune + CUDA graphs"] = bench(lambda: c2(x))
    name = torch.cuda.get_device_name()
    print(
        f"\n{name}: {args.layers} MLP blocks dim {args.dim} hidden {args.hidden} batch {args.batch} bf16; "
        f"weights {weight_bytes / 1e6:.1f} MB, copy bandwidth {bw / 1e9:.0f} GB/s, floor {floor_ms:.4f} ms; "
        f"mkcompiler rel err {err:.2e}; {mk}"
    )
    print(f"{'what':<44}{'ms':>9}{'x floor':>9}{'% floor':>9}{'vs mk':>8}")
    for k, ms in rows.items():
        print(f"{k:<44}{ms:>9.4f}{ms / floor_ms:>9.2f}{100 * floor_ms / ms:>8.1f}%{ms / rows['mkcompiler call']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, args=vars(args), floor_ms=floor_ms, bw=bw, err=err, ms=rows), f, indent=1)


if __name__ == "__main__":
    main()
