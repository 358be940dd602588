"""Weight-streaming bandwidth of the Gluon stream_matvec kernel (GPU only).

All matvec tiles of all Llama-3.2-1B decoder weights (16 layers: W_q 2048x2048, W_k 512x2048,
W_v 512x2048, W_o 2048x2048, W_gate 8192x2048, W_up 8192x2048, W_down 2048x8192; bf16, each kind
stacked across layers as one [16*N, K] tensor) in ONE launch. The tiles are independent: this
measures streaming with cross-tile prefetch (the loader warp runs ahead into the next tile), not
dependencies. Prints ms, achieved GB/s and % of the device copy bandwidth measured in the same
process (torch copy of a large tensor: read + write bytes / time), for a few (BN, BK, NUM_BUF).

    python benchmarks/gluon_stream_bw.py [--iters 20] [--configs 64,128,4 128,64,6]

--chain L: instead, a DEPENDENT chain of 2L matvecs shaped as Llama-3.2-1B's MLP without the
activation (up 8192x2048, then down 2048x8192, L times; each reads the previous one's fp32
output after waiting for all its tiles): the Gluon streamer with its waits and signals (the
loader streams the next matvec's weights while compute waits), the same tiles without waits
(streaming alone), the Triton megakernel of the same chain (`mkcompiler.compile` of an
nn.Sequential of bias-free Linears, batch 1, bf16, `mk.launch()`), and eager; one process.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

LAYERS = 16
# kind: (N, K)
SHAPES = {
    "q": (2048, 2048),
    "k": (512, 2048),
    "v": (512, 2048),
    "o": (2048, 2048),
    "gate": (8192, 2048),
    "up": (8192, 2048),
    "down": (2048, 8192),
}
DEFAULT_CONFIGS = ["64,128,4", "128,64,6", "64,256,4", "32,256,6", "128,128,4"]


def time_ms(fn, iters: int, warmup: int = 3, batch: int = 1) -> float:
    """Median GPU time of one call; `batch` calls back to back between the events hide the host's
    launch cost (the GPU never waits for the next launch)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(batch):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / batch)
    times.sort()
    return times[len(times) // 2]  # median


def copy_bandwidth(iters: int) -> float:
    """Device copy bandwidth in GB/s (bytes read + written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB: far beyond L2
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters)
    return 2 * src.numel() / ms / 1e6


def build_tiles(BN: int):
    """One tile per BN rows of every (layer, kind), in layer order; each (layer, kind) has its own
    x (offset in xs) and writes rows [l*N, (l+1)*N) of its kind's y (offset in ys)."""
    rows, xo, yo, x_base, y_base = [], 0, 0, {}, {}
    for name, (n, k) in SHAPES.items():
        x_base[name], y_base[name] = xo, yo
        xo, yo = xo + LAYERS * k, yo + LAYERS * n
    for layer in range(LAYERS):
        for i, (name, (n, k)) in enumerate(SHAPES.items()):
            for n0 in range(layer * n, (layer + 1) * n, BN):
                rows.append([i, n0, x_base[name] + layer * k, y_base[name], k, LAYERS * n, -1, 0, -1, 0, 0, 0])
    return torch.tensor(rows, dtype=torch.int32), x_base, y_base, xo, yo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="BN,BK,NUM_BUF triples")
    p.add_argument("--batch", type=int, default=5, help="launches per timed sample")
    p.add_argument("--num-programs", type=int, default=None, help="default: one per SM")
    p.add_argument("--chain", type=int, default=0, metavar="L", help="the dependent up/down chain of L pairs")
    p.add_argument(
        "--profile", metavar="NPZ", help="--chain: profile the first config with waits (stamps saved to NPZ)"
    )
    a = p.parse_args()
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("gluon_stream_bw.py needs a CUDA GPU (Hopper, sm_90): nothing to measure here")
    from mkcompiler.backends.gluon import stream as gs

    if not gs.HAVE_GLUON:
        sys.exit("triton.experimental.gluon is not importable (needs Triton 3.6)")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    if a.chain:
        return chain(gs, a, props)
    weights = [torch.randn(LAYERS * n, k, device="cuda").to(torch.bfloat16) for n, k in SHAPES.values()]
    w_bytes = sum(w.numel() * w.element_size() for w in weights)
    copy_gbs = copy_bandwidth(a.iters)
    print(f"{props.name}, {props.multi_processor_count} SMs; weights {w_bytes / 1e9:.3f} GB in {len(weights)} tensors")
    print(f"device copy bandwidth (torch copy_ of 1 GiB, read+write): {copy_gbs:.0f} GB/s")
    print(f"HBM floor for the weights at copy bandwidth: {w_bytes / copy_gbs / 1e6:.3f} ms\n")

    # eager reference point: one torch.mv per (layer, kind), bf16
    xs_eager = {name: torch.randn(LAYERS, k, device="cuda").to(torch.bfloat16) for name, (n, k) in SHAPES.items()}
    views = [
        (w[layer * n : (layer + 1) * n], xs_eager[name][layer])
        for layer in range(LAYERS)
        for w, (name, (n, k)) in zip(weights, SHAPES.items())
    ]
    ms = time_ms(lambda: [torch.mv(w, x) for w, x in views], a.iters)
    print(f"eager torch.mv x{len(views)} (bf16, launch overheads included): {ms:.3f} ms, {w_bytes / ms / 1e6:.0f} GB/s")

    for cfg in a.configs:
        BN, BK, NUM_BUF = (int(v) for v in cfg.split(","))
        tiles, x_base, y_base, nx, ny = build_tiles(BN)
        xs = torch.randn(nx, device="cuda").to(torch.bfloat16)
        ys = torch.full((ny,), float("nan"), device="cuda", dtype=torch.float32)
        try:  # validation and descriptors once, off the clock
            launch = gs.prepare_stream_matvec(
                weights, xs, ys, tiles, BN=BN, BK=BK, NUM_BUF=NUM_BUF, num_programs=a.num_programs
            )
            launch()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  (a config that does not fit: report and go on)
            print(f"BN={BN:4d} BK={BK:4d} NUM_BUF={NUM_BUF}: FAILED {type(e).__name__}: {str(e)[:200]}")
            continue
        # check every config against torch: first and last layer of every kind (all rows written)
        worst = 0.0
        for w, (name, (n, k)) in zip(weights, SHAPES.items()):
            for layer in (0, LAYERS - 1):
                x = xs[x_base[name] + layer * k : x_base[name] + (layer + 1) * k].float()
                ref = w[layer * n : (layer + 1) * n].float() @ x
                got = ys[y_base[name] + layer * n : y_base[name] + (layer + 1) * n]
                worst = max(worst, ((got - ref).norm() / ref.norm()).item())
        if worst > 1e-2 or ys.isnan().any().item():
            print(f"BN={BN} BK={BK} NUM_BUF={NUM_BUF}: WRONG RESULT (worst rel err {worst:.2e} or NaN left)")
            continue
        ms = time_ms(launch, a.iters, batch=a.batch)
        gbs = w_bytes / ms / 1e6
        print(
            f"BN={BN:4d} BK={BK:4d} NUM_BUF={NUM_BUF}: {ms:.3f} ms, {gbs:.0f} GB/s, "
            f"{100 * gbs / copy_gbs:.0f}% of copy BW  ({tiles.shape[0]} tiles, rel err {worst:.1e})"
        )


def chain(gs, a, props) -> None:
    import mkcompiler

    dim, hidden = SHAPES["down"]
    linears = []
    for _ in range(a.chain):
        linears += [torch.nn.Linear(dim, hidden, bias=False), torch.nn.Linear(hidden, dim, bias=False)]
    model = torch.nn.Sequential(*linears).cuda().to(torch.bfloat16)
    for m in linears:
        m.weight.data /= m.in_features**0.5  # activations stay O(1) along the chain
    weights = [m.weight.data.contiguous() for m in linears]
    w_bytes = sum(w.numel() * w.element_size() for w in weights)
    copy_gbs = copy_bandwidth(a.iters)
    floor = w_bytes / copy_gbs / 1e6
    print(f"{props.name}, {props.multi_processor_count} SMs; chain of {len(weights)} matvecs, {w_bytes / 1e9:.3f} GB")
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s; floor {floor:.3f} ms\n")
    x = torch.randn(dim, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        want = model(x[None]).float()[0]
        rows = [("eager (nn.Sequential, bf16)", time_ms(lambda: model(x[None]), a.iters), 0.0)]
        mk = mkcompiler.compile(model, (x[None],))
        got = mk(x[None]).float()[0]
        err = ((got - want).norm() / want.norm()).item()
        rows.append(("mkcompiler Triton megakernel (`mk.launch()`)", time_ms(mk.launch, a.iters, batch=a.batch), err))
    offs, o = [], dim
    for w in weights:
        offs.append(o)
        o += w.shape[0]
    for cfg in a.configs:
        BN, BK, NUM_BUF = (int(v) for v in cfg.split(","))
        buf = torch.zeros(o, device="cuda")
        buf[:dim] = x.float()
        counters = torch.zeros(len(weights), dtype=torch.int32, device="cuda")
        dep = gs.chain_tiles(weights, 0, offs, BN)
        free = dep.clone()
        free[:, 6], free[:, 8] = -1, -1  # the same tiles, no waits: streaming alone (wrong values)
        for name, tiles in (("with waits", dep), ("no waits (streaming only)", free)):
            try:
                launch = gs.prepare_stream_matvec(
                    weights,
                    buf,
                    buf,
                    tiles,
                    BN=BN,
                    BK=BK,
                    NUM_BUF=NUM_BUF,
                    num_programs=a.num_programs,
                    counters=counters,
                )
                launch()
                torch.cuda.synchronize()
                if launch.errors()[0]:
                    raise gs.GluonStreamError("a wait gave up")
            except Exception as e:  # noqa: BLE001  (a config that does not fit: report and go on)
                print(f"gluon BN={BN} BK={BK} NUM_BUF={NUM_BUF} {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            err = 0.0
            if tiles is dep:
                last = buf[offs[-1] : offs[-1] + dim]
                err = ((last - want).norm() / want.norm()).item()
            rows.append(
                (f"gluon BN={BN} BK={BK} NUM_BUF={NUM_BUF} {name}", time_ms(launch, a.iters, batch=a.batch), err)
            )
    if a.profile:
        BN, BK, NUM_BUF = (int(v) for v in a.configs[0].split(","))
        tiles = gs.chain_tiles(weights, 0, offs, BN)
        launch = gs.prepare_stream_matvec(
            weights, buf, buf, tiles, BN=BN, BK=BK, NUM_BUF=NUM_BUF, num_programs=a.num_programs, counters=counters,
            profile=True,
        )  # fmt: skip
        launch()
        stamps = launch.stamps()
        import numpy as np

        np.savez(a.profile, stamps=stamps.numpy(), tiles=tiles.numpy(), programs=launch.programs)
        png = os.path.splitext(a.profile)[0] + ".png"
        try:
            title = f"{props.name}: {len(weights)} dependent matvecs, BN={BN} BK={BK} NUM_BUF={NUM_BUF}"
            gs.prefetch_gantt(stamps, tiles, launch.programs, png, title)
        except ImportError:
            png = "(no matplotlib: no picture)"
        r = gs.prefetch_report(stamps, tiles.shape[0], launch.programs)
        print(
            f"profile (BN={BN} BK={BK} NUM_BUF={NUM_BUF}, {r['pairs']} consecutive tile pairs): "
            f"{100 * r['ahead']:.0f}% of tiles had their first weight block asked for before the tile before them "
            f"ended (median lead {r['lead_us']:.2f} us); median wait for inputs {r['wait_us']:.2f} us; "
            f"span {r['span_us']:.1f} us; stamps in {a.profile}, picture {png}\n"
        )
    print("| what | ms | GB/s | % of copy floor | rel err vs eager |")
    print("|---|---|---|---|---|")
    for name, ms, err in rows:
        gbs = w_bytes / ms / 1e6
        print(f"| {name} | {ms:.3f} | {gbs:.0f} | {100 * floor / ms:.1f}% | {err:.1e} |")


if __name__ == "__main__":
    main()
