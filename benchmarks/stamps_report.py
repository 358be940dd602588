"""Read the per-instruction stamps profile_decode.py saved on the device (stamps*.npz), on the
CPU: one decoder layer's stages (ready/end span and median tile time per op), and optionally a
Gantt picture, for which the queue is rebuilt here with the same options (it must have as many
instructions as the stamps).

    python benchmarks/stamps_report.py OUT/stamps_v2.npz --layer 8
    python benchmarks/stamps_report.py OUT/stamps_v2.npz --kinds --slow   # per tile kind; slow tiles' workers
    python benchmarks/stamps_report.py OUT/stamps_v2.npz --gantt docs/x.png --opt waits=acquire --opt fuse_norm=True
"""

from __future__ import annotations

import argparse
import collections
import os

import numpy as np


def save_stamps(mk, prof, path: str) -> None:
    """Write a profile's stamps with each instruction's op and opcode names and descriptions:
    the file this module reads (profile_decode.py and prefill_matmul.py --stamps write it)."""
    from mkcompiler.ir.layout import Field

    q, dag, graph = mk.queue, mk.dag, mk.graph
    op_names = [graph.ops[dag.tasks[int(q.rows[i, Field.TASK])].op].name for i in range(len(q))]
    kinds = [q.opcode_name(i) for i in range(len(q))]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    np.savez_compressed(
        path,
        stamps=prof.stamps.astype(np.int64),
        op_names=np.array(op_names),
        kinds=np.array(kinds),
        descs=np.array(q.descs),
    )


def stages(path: str, layer: int) -> list[str]:
    """One line per op of the decoder layer `layer` (ops in order of first ready time; the layer
    is found by the k-th attention op), times in us from the step's first fetch."""
    d = np.load(path, allow_pickle=True)
    s, names, kinds = d["stamps"].astype(np.int64), d["op_names"], d["kinds"]
    t0 = s[:, 1].min()
    ops = collections.OrderedDict()
    for i, n in enumerate(names):
        ops.setdefault(n, []).append(i)
    rows = []
    for n, idx in ops.items():
        r = s[np.array(idx)]
        rows.append(
            (
                r[:, 2].min() - t0,
                n,
                len(idx),
                kinds[idx[0]],
                r[:, 2].max() - t0,
                r[:, 3].max() - t0,
                float(np.median(r[:, 3] - r[:, 2])),
            )
        )
    rows.sort()
    attn = [k for k, row in enumerate(rows) if row[3].startswith("attention#")]
    lo, hi = attn[layer] - 6, attn[layer + 1] - 6 if layer + 1 < len(attn) else len(rows)
    out = [f"{'op':28s} {'opcode':30s} {'tiles':>5s} {'ready us':>17s} {'last end':>9s} {'tile us':>7s}"]
    for ready, n, cnt, k, rmax, emax, tile in rows[lo:hi]:
        out.append(
            f"{n[:28]:28s} {k[:30]:30s} {cnt:5d} {ready / 1e3:8.2f}-{rmax / 1e3:8.2f} {emax / 1e3:9.2f} {tile / 1e3:7.2f}"
        )
    return out


def kind_medians(path: str) -> list[str]:
    """One line per opcode: its instructions and their median ready->end time (us): the figure to
    compare between backends or trees (two runs' opcodes are named the same when their ops are)."""
    d = np.load(path, allow_pickle=True)
    s, kinds = d["stamps"].astype(np.int64), d["kinds"]
    times = collections.defaultdict(list)
    for i, k in enumerate(kinds):
        times[str(k)].append((s[i, 3] - s[i, 2]) / 1e3)
    out = [f"{'opcode':34s} {'tiles':>6s} {'median us':>9s}"]
    out += [f"{k[:34]:34s} {len(v):6d} {np.median(v):9.2f}" for k, v in times.items()]
    return out


def slow_tiles(path: str, factor: float = 1.6, min_tiles: int = 32) -> list[str]:
    """Per op with at least `min_tiles` tiles: those slower than `factor` x the op's median, and the
    workers that ran them (a group of workers streaming at a lower rate shows here: session 13)."""
    d = np.load(path, allow_pickle=True)
    s, names = d["stamps"].astype(np.int64), d["op_names"]
    by_op = collections.defaultdict(list)
    for i, n in enumerate(names):
        by_op[str(n)].append(i)
    out = []
    for n, idx in by_op.items():
        if len(idx) < min_tiles:
            continue
        t = (s[idx, 3] - s[idx, 2]) / 1e3
        med = float(np.median(t))
        slow = [i for i, ti in zip(idx, t) if ti > factor * med]
        if slow:
            workers = sorted({int(s[i, 0]) for i in slow})
            worst = max((s[i, 3] - s[i, 2]) / 1e3 for i in slow)
            out.append(
                f"{n}: {len(slow)} of {len(idx)} tiles > {factor} x median {med:.2f} us (max {worst:.2f}), workers {workers}"
            )
    return out or [f"no op has tiles slower than {factor} x its median"]


def gantt(path: str, png: str, opts: dict, title: str, ctx: int) -> None:
    import sys

    import torch

    sys.path.insert(0, ".")
    import mkcompiler
    from examples.llama import random_llama
    from mkcompiler.tools.profiling import Profile

    # As profile_decode.py builds it (the cache length decides the split-KV tiles).
    model = random_llama("llama-3.2-1b", dtype=torch.bfloat16, max_seq_len=ctx + 8, max_batch=1)
    inputs = (torch.zeros(1, 1, dtype=torch.long), torch.tensor([ctx]))
    mk = mkcompiler.compile(model, inputs, num_workers=132, cache=False, interpret=False, **opts)  # the GPU's tiles
    stamps = np.load(path, allow_pickle=True)["stamps"]
    if len(stamps) != len(mk.queue):
        raise SystemExit(f"{len(stamps)} stamps but the rebuilt queue has {len(mk.queue)} instructions: other options?")
    Profile(mk.queue, stamps, "ns", "gpu", compilation=mk.compilation).gantt(png, title=title)
    print("wrote", png)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("stamps")
    p.add_argument("--layer", type=int, default=8)
    p.add_argument("--gantt", default=None, help="write a Gantt PNG here (rebuilds the queue on the CPU)")
    p.add_argument("--opt", action="append", default=[], help="compile option k=v of the profiled run")
    p.add_argument("--title", default="Llama-3.2-1B decode step")
    p.add_argument("--ctx", type=int, default=512, help="profile_decode.py's --ctx")
    p.add_argument("--kinds", action="store_true", help="median tile time per opcode")
    p.add_argument("--slow", action="store_true", help="tiles slower than 1.6 x their op's median, with their workers")
    a = p.parse_args()
    print("\n".join(stages(a.stamps, a.layer)))
    if a.kinds:
        print("\n".join(kind_medians(a.stamps)))
    if a.slow:
        print("\n".join(slow_tiles(a.stamps)))
    if a.gantt:
        from decode_latency import compile_options  # this directory: run as a script

        gantt(a.stamps, a.gantt, compile_options(a.opt), a.title, a.ctx)


if __name__ == "__main__":
    main()
