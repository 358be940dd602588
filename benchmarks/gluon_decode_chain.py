"""The dependent chain of issue 17 through the compiler: 8 bf16 matvecs (up 8192x2048, down
2048x8192, x4; batch 1), compiled with backend="gluon" and backend="triton" in one process,
against eager. Times kernel launches only (triton.testing.do_bench of `mk.launch`, inputs bound
once; the error record is checked after), checks each output against eager, prints a table.

    python benchmarks/gluon_decode_chain.py                 # on a GPU (H100)
    python benchmarks/gluon_decode_chain.py --dry-run       # CPU: a small chain, both kernels generated

--dry-run compiles a small chain for sm_90 source (interpret=False, nothing launched) with both
backends and prints the structure instead of times: what a GPU run would launch.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mkcompiler  # noqa: E402
from mkcompiler.runtime.gluon import GluonFallbackWarning, GluonMegakernel  # noqa: E402

BACKENDS = ("gluon", "triton")
GPU = (2048, 8192, 4)  # (dim, hidden, up/down pairs): issue 17's chain
DRY = (256, 512, 2)


class Chain(torch.nn.Module):
    """x -> up -> down -> up -> ... (pairs of bias-free Linear layers, no activation)."""

    def __init__(self, dim: int, hidden: int, pairs: int):
        super().__init__()
        layers = []
        for _ in range(pairs):
            layers += [torch.nn.Linear(dim, hidden, bias=False), torch.nn.Linear(hidden, dim, bias=False)]
        self.layers = torch.nn.ModuleList(layers)
        for layer in self.layers:  # unit-variance activations along the chain
            torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def compile_backend(model, x, backend: str, **options):
    """(megakernel, the backend that runs it): a fallback's warning is printed, not raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GluonFallbackWarning)
        mk = mkcompiler.compile(model, (x,), backend=backend, cache=False, **options)
    for w in caught:
        print(f"  warning: {w.message}")
    return mk, "gluon" if isinstance(mk, GluonMegakernel) else "triton"


def describe(mk) -> str:
    q = mk.queue
    extra = (
        f", ring {mk.kernel.num_buf} x {mk.kernel.box}, {len(mk.stacks)} descriptors" if hasattr(mk, "kernel") else ""
    )
    return f"{len(q)} instructions, {len(q.opcode_keys)} opcodes, {q.num_counters} counters{extra}"


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def dry_run(args) -> int:
    torch.manual_seed(0)
    dim, hidden, pairs = args.dim or DRY[0], args.hidden or DRY[1], args.pairs or DRY[2]
    model = Chain(dim, hidden, pairs).to(torch.bfloat16)
    x = torch.randn(1, dim, dtype=torch.bfloat16)
    print(
        f"dry run: chain of {len(model.layers)} matvecs {hidden}x{dim} / {dim}x{hidden}, bf16, batch 1 (sm_90 source, not launched)"
    )
    print(f"{'asked':<8} {'runs on':<8} structure")
    for backend in BACKENDS:
        mk, runs = compile_backend(model, x, backend, interpret=False, num_workers=args.workers or 132)
        print(f"{backend:<8} {runs:<8} {describe(mk)}")
        if backend == "gluon" and runs != "gluon":
            return 1
    return 0


def gpu_run(args) -> int:
    from triton.testing import do_bench

    torch.manual_seed(0)
    dim, hidden, pairs = args.dim or GPU[0], args.hidden or GPU[1], args.pairs or GPU[2]
    model = Chain(dim, hidden, pairs).to("cuda", torch.bfloat16)
    x = torch.randn(1, dim, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        ref = model(x)
        eager_ms = do_bench(lambda: model(x), warmup=args.warmup, rep=args.rep)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"chain of {len(model.layers)} matvecs {hidden}x{dim} / {dim}x{hidden}, bf16, batch 1, "
          f"{weight_bytes / 1e6:.1f} MB of weights; {torch.cuda.get_device_name()}")  # fmt: skip
    print(f"{'backend':<8} {'runs on':<8} {'ms':>8} {'GB/s':>8} {'rel err':>9}  structure")
    print(f"{'eager':<8} {'torch':<8} {eager_ms:>8.4f} {weight_bytes / eager_ms / 1e6:>8.0f} {0.0:>9.2e}")
    failed = 0
    for backend in BACKENDS:
        options = {"num_workers": args.workers} if args.workers else {}
        mk, runs = compile_backend(model, x, backend, **options)
        err = rel_err(mk(x), ref)
        ms = do_bench(mk.launch, warmup=args.warmup, rep=args.rep)
        mk.check()  # every timed launch's error record
        failed += err > 3e-2 or (backend == "gluon" and runs != "gluon")
        print(f"{backend:<8} {runs:<8} {ms:>8.4f} {weight_bytes / ms / 1e6:>8.0f} {err:>9.2e}  {describe(mk)}")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: generate both kernels for a small chain, no timing")
    p.add_argument("--dim", type=int, default=None, help=f"default {GPU[0]} ({DRY[0]} dry)")
    p.add_argument("--hidden", type=int, default=None, help=f"default {GPU[1]} ({DRY[1]} dry)")
    p.add_argument("--pairs", type=int, default=None, help=f"up/down pairs, default {GPU[2]} ({DRY[2]} dry)")
    p.add_argument("--workers", type=int, default=None, help="num_workers (default: the GPU's SMs; 132 dry)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetitions, ms")
    args = p.parse_args(argv)
    return dry_run(args) if args.dry_run else gpu_run(args)


if __name__ == "__main__":
    raise SystemExit(main())
