"""Where a bf16 decode step's logits error comes from: eager bf16 and mkcompiler against an fp32
reference of the same weights, on the CPU (no GPU: mkcompiler's queue runs in the reference VM).

    python benchmarks/error_budget.py --layers 2 --vocab 8192 --batch 1 --ctx 512
    python benchmarks/error_budget.py --layers 2 --batch 64 --ctx 1024 --probe

Llama-3.1-8B hidden sizes (dim 4096, 32 heads, 8 kv heads, intermediate 14336; --model picks
another of examples/llama.py's CONFIGS) with --layers layers and a --vocab token vocabulary (the
real 128256 only makes the LM head slower), random weights and caches as
benchmarks/decode_latency.py builds them, one decode step at position ctx. Memory: about 4 GB a
layer at batch 64, ctx 1024 (bf16 and fp32 copies of weights and caches).

Findings (2026-12, CPU, VM with --kernel-attention): mkcompiler is as far from fp32 as eager bf16
is (4 layers: 1.42e-2 / 1.47e-2 at batch 1, 1.43e-2 / 1.46e-2 at batch 64), the two errors mostly
independent; every rounding kind adds about equally, none dominates; both grow as sqrt(layers).
The logits are computed:
- fp32: the same bf16 weights and caches cast to fp32 (the exact reference);
- eager bf16: the model as it is;
- mkcompiler: the compiled queue (num_workers 132, an H100's tiling and split-K) executed by the
  reference VM (mkcompiler/vm.py) with each op's torch reference; --kernel-attention replaces the
  attention reference by one with the kernel's two extra roundings (q * scale and P to bf16,
  ops/attention.py), which the reference computes in float64;
- emulated: an fp32 step (emulate) that rounds to bf16 only where asked (ROUNDINGS, one op kind at
  a time), to show which kind of rounding the error comes from.
Errors are decode_latency.py's `rel` (relative Frobenius norm). --probe also compares the
residual stream after every layer (mkcompiler compiled a second time with those as outputs).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.decode_latency import default_dtype_and_device, rel  # noqa: E402
from examples.llama import fill_caches, random_llama  # noqa: E402

# The op kinds whose outputs eager bf16 rounds to bf16 (what emulate can leave in fp32).
# "table": the RoPE cos/sin tables, which the bf16 model casts to bf16 (its fp32 copy keeps fp32).
ROUNDINGS = ("matmul", "norm", "rope", "table", "attn", "act", "residual")
H100_WORKERS = 132  # mkcompiler's tiling and split-K depend on the worker count: an H100's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="examples/llama.py CONFIGS name (its sizes)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-vm", action="store_true", help="skip mkcompiler (eager and emulation only)")
    p.add_argument("--kernel-attention", action="store_true", help="VM attention with the kernel's roundings")
    p.add_argument("--probe", action="store_true", help="also compare the residual stream after every layer")
    return p.parse_args(argv)


class Probe(nn.Module):
    """Llama.forward for one decode step that also returns the residual stream after each layer."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, input_pos):
        m = self.model
        x = m.embed(tokens)
        freqs = input_pos[:, None].float() * m.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = input_pos[:, None] >= torch.arange(m.c.max_seq_len, device=tokens.device)[None, :]
        hidden = []
        for layer in m.layers:
            x = layer(x, cos, sin, mask, input_pos)
            hidden.append(x)
        return (m.lm_head(m.norm(x)), *hidden)


# ---- the emulated step: fp32 arithmetic, bf16 rounding only where asked ----


def _round(t: torch.Tensor, on: bool) -> torch.Tensor:
    return t.to(torch.bfloat16).float() if on else t


def _rms(x, w, eps, on):
    """nn.RMSNorm as torch computes it for bf16 (CPU and CUDA alike): in fp32, rounded once."""
    return _round(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w, on)


def _rope(t, cos, sin, on):
    half = t.shape[-1] // 2
    rot = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return _round(_round(t * cos, on) + _round(rot * sin, on), on)


def _attention(q, kc, vc, pos: int, on: bool):
    """Decode attention over cache slots 0..pos; `on` rounds P (as flash attention does before
    P @ V) and the output."""
    b, hq, _, d = q.shape
    g = hq // kc.shape[1]
    k = kc[:, :, : pos + 1].repeat_interleave(g, 1)
    v = vc[:, :, : pos + 1].repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return _round((_round(e, on) @ v) / e.sum(-1, keepdim=True), on)


def _layer(lay, w, x, cos, sin, pos, r):
    """One block; w: its fp32 weights; r: the set of ROUNDINGS on."""
    a, c = lay.attn, lay.attn.c
    b = x.shape[0]
    h = _rms(x, w["attn_norm"], c.norm_eps, "norm" in r)
    mm = "matmul" in r
    q = _round(h @ w["wq"], mm).view(b, 1, c.n_heads, c.head_dim).transpose(1, 2)
    k = _round(h @ w["wk"], mm).view(b, 1, c.n_kv_heads, c.head_dim).transpose(1, 2)
    v = _round(h @ w["wv"], mm).view(b, 1, c.n_kv_heads, c.head_dim).transpose(1, 2)
    q, k = _rope(q, cos, sin, "rope" in r), _rope(k, cos, sin, "rope" in r)
    kc, vc = a.k_cache[:b].float(), a.v_cache[:b].float()
    kc[:, :, pos], vc[:, :, pos] = k[:, :, 0], v[:, :, 0]
    o = _attention(q, kc, vc, pos, "attn" in r).transpose(1, 2).reshape(b, c.dim)
    x = _round(x + _round(o @ w["wo"], mm), "residual" in r)
    h = _rms(x, w["mlp_norm"], c.norm_eps, "norm" in r)
    act = _round(_round(F.silu(_round(h @ w["gate"], mm)), "act" in r) * _round(h @ w["up"], mm), "act" in r)
    return _round(x + _round(act @ w["down"], mm), "residual" in r)


def fp32_weights(model) -> list[dict]:
    """Each layer's weights in fp32, transposed for x @ W (cast once, shared by every emulation)."""
    out = []
    for lay in model.layers:
        a, m = lay.attn, lay.mlp
        mats = {"wq": a.wq, "wk": a.wk, "wv": a.wv, "wo": a.wo, "gate": m.gate, "up": m.up, "down": m.down}
        w = {k: lin.weight.float().t().contiguous() for k, lin in mats.items()}
        w["attn_norm"], w["mlp_norm"] = lay.attn_norm.weight.float(), lay.mlp_norm.weight.float()
        out.append(w)
    return out


@torch.no_grad()
def emulate(model, weights, tok, pos: int, rounds) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, residual stream after each layer), in fp32 with the ROUNDINGS in `rounds`."""
    r = frozenset(rounds)
    x = model.embed(tok).float().reshape(tok.shape[0], -1)
    freqs = torch.tensor([float(pos)])[:, None] * model.inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = _round(emb.cos(), "table" in r), _round(emb.sin(), "table" in r)
    hidden = []
    for lay, w in zip(model.layers, weights):
        x = _layer(lay, w, x, cos, sin, pos, r)
        hidden.append(x)
    h = _rms(x, model.norm.weight.float(), model.c.norm_eps, "norm" in r)
    logits = _round(h @ model.lm_head.weight.float().t(), "matmul" in r)
    return logits.view(*tok.shape, -1), [t.view(*tok.shape, -1) for t in hidden]  # as the model's


# ---- mkcompiler in the reference VM ----


def _kernel_attention_reference(self, node, coords, tensor_of):
    """Attention.reference with the kernel's roundings (ops/attention.py attention_tile): q * scale
    rounded to the dot dtype (bf16) before QK^T, and P rounded to it before P @ V; the row sum
    stays unrounded (fp32 in the kernel)."""
    q, _, _, mask = node.inputs
    b = coords[0]
    ks, kk, vv, ob = self.kv_block(node, coords, tensor_of)
    for h, q0, q1 in self.row_segments(node, coords):
        rs = slice(q0, q1)
        qs = (tensor_of(q)[b, h, rs].float() * node.attrs.scale).to(q.dtype).double()
        s = qs @ kk.T
        if mask is not None:  # decode: a bool mask over the keys (causal is not used here)
            s = s.masked_fill(~tensor_of(mask)[b, h, rs, ks], float("-inf"))
        e = torch.exp(s - s.amax(-1, keepdim=True))
        pv = e.to(q.dtype).double() @ vv
        if self.splits(node) == 1:
            tensor_of(node.outputs[0])[ob, h, rs] = (pv / e.sum(-1, keepdim=True)).to(node.outputs[0].dtype)
        else:
            tensor_of(node.outputs[0])[ob, h, rs] = pv.float()
            tensor_of(node.outputs[1])[ob, h, rs, 0] = s.amax(-1).float()
            tensor_of(node.outputs[1])[ob, h, rs, 1] = e.sum(-1).float()


@contextlib.contextmanager
def kernel_attention(on: bool):
    """Swaps in _kernel_attention_reference for this process while the block runs."""
    from mkcompiler.ops.attention import Attention

    old = Attention.reference
    if on:
        Attention.reference = _kernel_attention_reference
    try:
        yield
    finally:
        Attention.reference = old


def vm_run(module, tok, pos_t, kernel_attn: bool):
    """Compiles `module` for an H100's worker count and runs its queue in the reference VM."""
    import mkcompiler
    from mkcompiler.vm import run_megakernel

    t0 = time.perf_counter()
    mk = mkcompiler.compile(module, (tok, pos_t), num_workers=H100_WORKERS, cache=False)
    t1 = time.perf_counter()
    with kernel_attention(kernel_attn), torch.no_grad():
        out, _ = run_megakernel(mk, tok, pos_t)
    say(f"  compiled in {t1 - t0:.0f} s ({len(mk.queue)} instructions), VM ran in {time.perf_counter() - t1:.0f} s")
    return out


# ---- the report ----


def say(msg: str) -> None:
    print(msg, flush=True)


def row(name: str, out: torch.Tensor, ref32: torch.Tensor, eager: torch.Tensor) -> None:
    say(f"| {name} | {rel(out, ref32):.2e} | {rel(out, eager):.2e} |")


def emulation_rows(model, weights, tok, pos, ref32, eager) -> None:
    """Each rounding kind alone, every kind but one, and all of them (which should be eager)."""
    row("emulated: no rounding (= fp32?)", emulate(model, weights, tok, pos, ())[0], ref32, eager)
    row("emulated: all roundings (= eager?)", emulate(model, weights, tok, pos, ROUNDINGS)[0], ref32, eager)
    for kind in ROUNDINGS:
        row(f"emulated: only {kind}", emulate(model, weights, tok, pos, {kind})[0], ref32, eager)
    for kind in ROUNDINGS:
        rest = set(ROUNDINGS) - {kind}
        row(f"emulated: all but {kind}", emulate(model, weights, tok, pos, rest)[0], ref32, eager)


def probe_rows(model, model32, tok, pos_t, args) -> None:
    """The residual stream after each layer: eager bf16 and mkcompiler against fp32."""
    with torch.no_grad():
        h32 = Probe(model32)(tok, pos_t)[1:]
        h16 = Probe(model)(tok, pos_t)[1:]
    hmk = vm_run(Probe(model), tok, pos_t, args.kernel_attention)[1:]
    say("\n| layer | eager bf16 vs fp32 | mkcompiler vs fp32 | mkcompiler vs eager |\n|---|---|---|---|")
    for i, (a, b, c) in enumerate(zip(h32, h16, hmk)):
        say(f"| {i} | {rel(b, a):.2e} | {rel(c, a):.2e} | {rel(c, b):.2e} |")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))  # a shared 2-core machine
    t0 = time.perf_counter()
    model = build(args)
    say(f"built in {time.perf_counter() - t0:.0f} s")
    run(model, args)


def build(args):
    """As decode_latency.build_model (bf16 made in place, caches N(0, 0.5)), with fewer layers and
    a smaller vocabulary."""
    bf16 = torch.bfloat16
    with default_dtype_and_device(bf16, "cpu"):
        model = random_llama(
            args.model,
            dtype=bf16,
            seed=args.seed,
            n_layers=args.layers,
            vocab_size=args.vocab,
            max_seq_len=args.ctx + 2,
            max_batch=args.batch,
        )
    return fill_caches(model.eval())


def run(model, args) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    tok = torch.randint(0, model.c.vocab_size, (args.batch, 1), generator=gen)
    pos_t = torch.tensor([args.ctx])
    model32 = copy.deepcopy(model).float()
    with torch.no_grad():
        ref32 = model32(tok, pos_t).float()
        eager = model(tok, pos_t).float()
    say(f"\n{args.model} shapes, {args.layers} layers, vocab {args.vocab}, batch {args.batch}, ctx {args.ctx}")
    say("\n| logits | rel vs fp32 | rel vs eager bf16 |\n|---|---|---|")
    row("eager bf16", eager, ref32, eager)
    if not args.no_vm:
        row("mkcompiler (VM)", vm_run(model, tok, pos_t, args.kernel_attention).float(), ref32, eager)
    weights = fp32_weights(model)
    emulation_rows(model, weights, tok, args.ctx, ref32, eager)
    del weights
    if args.probe and not args.no_vm:
        probe_rows(model, model32, tok, pos_t, args)


if __name__ == "__main__":
    main()
