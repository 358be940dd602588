"""Dependent stages of a decode step, per compile variant, without a GPU: the longest chain of the
tile DAG (each link a wait, a wake-up and a small tile's fixed cost on the GPU).

    python benchmarks/decode_stages.py --model llama-3.2-1b --variant "" \\
        --variant "fuse_norm=False"

The sources are the GPU's (as offline sm_90 compiles see them): bf16 tensor-core dots
(interpret=False: a GPU kernel, not run) and rms_norm kept whole (a CPU export decomposes it,
a GPU's does not), 132 workers. Batch 1 at position --ctx. Prints instructions, the chain in
tiles and per layer: (chain - OUTSIDE_LAYERS) / layers, an estimate that puts 4 links outside
the decoder layers (the embedding and the LM head among them).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from benchmarks.decode_latency import compile_options  # noqa: E402
from examples.llama import CONFIGS, random_llama  # noqa: E402

OUTSIDE_LAYERS = 4  # links of the chain taken to lie outside the decoder layers (an estimate)


def stages(model, inputs, options: dict, workers: int) -> dict:
    import networkx as nx

    import mkcompiler

    mk = mkcompiler.compile(model, inputs, num_workers=workers, cache=False, interpret=False, **options)
    chain = nx.dag_longest_path_length(mk.dag.graph) + 1
    layers = model.c.n_layers
    return {"instructions": len(mk.queue), "chain": chain, "per_layer": (chain - OUTSIDE_LAYERS) / layers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Dependent stages of a decode step per compile variant (CPU).")
    p.add_argument("--model", default="llama-3.2-1b", choices=sorted(CONFIGS))
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the model's (faster)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--workers", type=int, default=132)
    p.add_argument("--variant", action="append", default=None, metavar="OPTS", help='k=v options ("": default)')
    a = p.parse_args(argv)
    overrides = {"max_seq_len": a.ctx + 8} | ({"n_layers": a.layers} if a.layers else {})
    model = random_llama(a.model, dtype=torch.bfloat16, **overrides).eval()
    inputs = (torch.randint(0, model.c.vocab_size, (1, 1)), torch.tensor([a.ctx]))
    print(
        f"| variant | instructions | chain (tiles) | per layer |  ({a.model}, {model.c.n_layers} layers, ctx {a.ctx})"
    )
    print("|---|---|---|---|")
    for opts in a.variant if a.variant is not None else [""]:
        r = stages(model, inputs, compile_options(opts.split()), a.workers)
        print(f"| {opts or 'defaults'} | {r['instructions']} | {r['chain']} | {r['per_layer']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
