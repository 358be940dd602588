"""Model factories for the command line: each returns (model, example_inputs) or
(model, example_inputs, compile_options).

    python -m mkcompiler inspect examples.factories:transformer_block
    python -m mkcompiler profile examples.factories:llama_1b_decode --out prof   # on a GPU

Models live where kernels run: on the GPU when there is one (and the interpreter is off),
else on the CPU for Triton's interpreter. Weights are random (nothing is downloaded); KV
caches are filled with random keys and values so attention has something to read.
"""

from __future__ import annotations

import os

import torch

import mkcompiler  # noqa: F401  (chooses the interpreter on CPU-only machines before any kernel is defined)
from examples.llama import random_llama
from mkcompiler.tools.demo import TinyTransformerMLP


def device() -> str:
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    return "cuda" if on_gpu else "cpu"


def _fill_caches(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            for cache in (layer.attn.k_cache, layer.attn.v_cache):
                cache.copy_((torch.randn(cache.shape, generator=gen) * 0.5).to(cache.dtype))


def _decode_inputs(model, batch: int, pos: int, dev: str, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.c.vocab_size, (batch, 1), generator=gen).to(dev)
    return tokens, torch.tensor([pos], device=dev)


def transformer_block(pos: int = 8):
    """One decode step of a one-layer tiny Llama (examples/llama.py CONFIGS['tiny']): embedding,
    a decoder layer (RMSNorm, q/k/v projections, RoPE, in-place KV-cache update, grouped-query
    attention, output projection, RMSNorm, SwiGLU MLP), final norm and LM head. fp32."""
    dev = device()
    model = random_llama("tiny", n_layers=1, device=dev)
    _fill_caches(model)
    return model, _decode_inputs(model, 1, pos, dev)


def mlp():
    """Two pre-norm SwiGLU MLP blocks (mkcompiler/tools/demo.py), 4 rows of 64, fp32."""
    dev = device()
    torch.manual_seed(0)
    model = TinyTransformerMLP(dim=64, hidden=128, layers=2).to(dev)
    return model, (torch.randn(4, 64, device=dev),)


def llama_1b_decode(pos: int = 512, batch: int = 1):
    """One decode step of Llama-3.2-1B shapes (16 layers, dim 2048, 32/8 heads, vocab 128256),
    bf16 random weights, at cache position `pos` (the caches hold random keys and values).
    Meant for a GPU: about 2.5 GB of weights (on a CPU, expect minutes and several GB)."""
    dev = device()
    with torch.device(dev):  # build the weights where they will live
        model = random_llama(
            "llama-3.2-1b", dtype=torch.bfloat16, device=dev, max_seq_len=max(1024, pos + 1), max_batch=batch
        )
    _fill_caches(model)
    return model, _decode_inputs(model, batch, pos, dev)
