"""Attention: the flash-style tile, GQA, masks, causal, and split-KV (flash-decoding) with its
combine step, in the interpreter kernel and the VM, against float64 eager."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

import mkcompiler
from mkcompiler.vm import run_megakernel

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


class Decode(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def reference(model, *inputs):
    return model(*(x.double() if x.is_floating_point() else x for x in inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_kv", [None, 3])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_decode_attention_with_gqa_and_split_kv(dtype, split_kv, mask_kind):
    q = torch.randn(2, 4, 1, 16, dtype=dtype)
    k, v = torch.randn(2, 2, 300, 16, dtype=dtype), torch.randn(2, 2, 300, 16, dtype=dtype)
    keep = torch.arange(300)[None, :] <= 217
    mask = keep if mask_kind == "bool" else torch.where(keep, torch.randn(1, 300), float("-inf")).to(dtype)
    mk = mkcompiler.compile(Decode(), (q, k, v, mask), split_kv=split_kv)
    kinds = [op.kind for op in mk.graph.ops]
    assert kinds == (["attention"] if split_kv is None else ["attention", "attention_combine"])
    q = torch.randn_like(q)  # fresh inputs, not the example ones
    ref = reference(Decode(), q, k, v, mask)
    mk.poison()
    assert rel_err(mk(q, k, v, mask), ref) <= TOL[dtype]
    mk.poison()
    out, _ = run_megakernel(mk, q, k, v, mask, seed=1)
    assert rel_err(out, ref) <= TOL[dtype]


def test_split_kv_is_chosen_for_long_contexts_with_few_tiles():
    q = torch.randn(1, 4, 1, 16)
    k, v = torch.randn(1, 4, 1024, 16), torch.randn(1, 4, 1024, 16)
    mask = torch.ones(1, 1024, dtype=torch.bool)
    mk = mkcompiler.compile(Decode(), (q, k, v, mask), num_workers=16)
    attn = next(op for op in mk.graph.ops if op.kind == "attention")
    assert attn.attrs["split"] == 4  # 4 (b, h) tiles x 4 chunks = 16 workers busy; 256 keys each
    assert rel_err(mk(q, k, v, mask), reference(Decode(), q, k, v, mask)) <= 1e-4


@pytest.mark.parametrize("split_kv", [None, 2])
def test_causal_prefill_attention(split_kv):
    q, k, v = (torch.randn(1, 2, 37, 16) for _ in range(3))
    mk = mkcompiler.compile(Causal(), (q, k, v), split_kv=split_kv)
    mk.poison()
    ref = reference(Causal(), q, k, v)
    assert rel_err(mk(q, k, v), ref) <= 1e-4
    out, _ = run_megakernel(mk, q, k, v, seed=3)
    assert rel_err(out, ref) <= 1e-4
