"""Paged attention (ops/attention.py PagedAttention): keys and values read through page tables in
the tile, no gathered copy. The compiled op (interpreter kernel and reference VM) against eager
paged attention written here (gather each sequence's pages, then SDPA) in float64: decode rows
(GQA packed, split-KV and its combine), prefill chunks (causal within the chunk plus the earlier
pages), ragged ends, pages out of order, a page size that divides no length, sliding windows and
soft-capping; the serving engine's megakernel steps through it; the GPU source compiled for sm_90."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from mkcompiler.ops.attention import paged_attention
from mkcompiler.ops.registry import FAMILIES

import mkcompiler
from mkcompiler.vm import run_megakernel

TOL = 1e-5  # fp32 against float64


class Paged(torch.nn.Module):
    def __init__(self, scale: float, window: int = 0, softcap: float = 0.0):
        super().__init__()
        self.scale, self.window, self.softcap = scale, window, softcap

    def forward(self, q, k_pool, v_pool, tables, ends):
        return paged_attention(q, k_pool, v_pool, tables, ends, self.scale, self.window, self.softcap)


def eager(q, k_pool, v_pool, tables, ends, scale, window=0, softcap=0.0):
    """Gather each sequence's pages (a table entry outside the pool clamped into it), then attend
    with a mask of the keys each row sees, in float64. Rows that see nothing give 0."""
    n, page, hk, d = k_pool.shape
    pages = tables.clamp(0, n - 1)
    k, v = (pool[pages].flatten(1, 2).transpose(1, 2).double() for pool in (k_pool, v_pool))  # [S, Hkv, L, D]
    j = torch.arange(k.shape[2])
    keep = j < ends[..., None]  # [S, M, L]
    if window:
        keep &= j >= ends[..., None] - window
    keep = keep[:, None]
    if softcap:
        g = q.shape[1] // hk
        s = (q.double() @ k.repeat_interleave(g, 1).transpose(-1, -2)) * scale
        s = (softcap * torch.tanh(s / softcap)).masked_fill(~keep, float("-inf"))
        out = s.softmax(-1) @ v.repeat_interleave(g, 1)
    else:
        out = F.scaled_dot_product_attention(q.double(), k, v, attn_mask=keep, scale=scale, enable_gqa=True)
    return torch.where(keep.any(-1)[..., None], out, 0.0)


def pools(n, page, hk, d, gen):
    return torch.randn(n, page, hk, d, generator=gen), torch.randn(n, page, hk, d, generator=gen)


def tables_out_of_order(s, p, n, gen):
    """s page tables of p distinct pages each, in random order (no page shared by two sequences)."""
    return torch.randperm(n, generator=gen)[: s * p].view(s, p)


def check(model, args, expect_kinds, **options):
    """Kernel and VM (each on poisoned intermediates) against eager, on fresh q and pools."""
    mk = mkcompiler.compile(model, args, **options)
    assert [op.kind for op in mk.graph.ops] == expect_kinds
    gen = torch.Generator().manual_seed(7)
    q, k_pool, v_pool, tables, ends = args
    fresh = (torch.randn(q.shape, generator=gen), *pools(*k_pool.shape, gen), tables, ends)
    want = eager(*fresh, model.scale, model.window, model.softcap)
    assert model(*fresh).shape == want.shape
    assert rel_err(model(*fresh), want) <= TOL  # the custom op's eager implementation
    mk.poison()
    got = mk(*fresh)
    assert rel_err(got, want) <= TOL
    mk.poison()
    vm, _ = run_megakernel(mk, *fresh, seed=1)
    assert rel_err(vm, want) <= TOL and rel_err(vm, got) <= TOL
    return mk


@pytest.mark.parametrize("split_kv", [None, 3])
def test_decode_rows_with_gqa_ragged_ends_and_split_kv(split_kv):
    """4 sequences, 8 query heads over 2 kv heads (one tile per kv head: the group packed),
    pages of 3 slots out of order, ends 1, 10, 16 and 21 (the whole table)."""
    gen = torch.Generator().manual_seed(0)
    k_pool, v_pool = pools(30, 3, 2, 16, gen)
    q = torch.randn(4, 8, 1, 16, generator=gen)
    tables = tables_out_of_order(4, 7, 30, gen)
    ends = torch.tensor([[1], [10], [16], [21]])
    kinds = ["paged_attention"] + (["attention_combine"] if split_kv else [])
    mk = check(Paged(0.3), (q, k_pool, v_pool, tables, ends), kinds, split_kv=split_kv)
    attn = mk.graph.ops[0]
    assert attn.attrs.split == (split_kv or 1)
    assert len(FAMILIES["paged_attention"].tiles(attn)) == 4 * 2 * (
        split_kv or 1
    )  # a kv head's 4 query heads: one tile


@pytest.mark.parametrize("case", ["causal", "sliding window", "soft-capped"])
def test_prefill_chunk_sees_itself_causally_and_the_earlier_pages(case):
    """A chunk of 7 rows at positions 9..15 of its sequence (keys 0..8 already in the pages,
    page size 4: the chunk starts mid-page), and a second sequence's chunk at 0..6; GQA 2."""
    gen = torch.Generator().manual_seed(1)
    k_pool, v_pool = pools(12, 4, 2, 16, gen)
    q = torch.randn(2, 4, 7, 16, generator=gen)
    tables = tables_out_of_order(2, 5, 12, gen)
    ends = torch.stack([torch.arange(10, 17), torch.arange(1, 8)])
    options = {"causal": {}, "sliding window": {"window": 5}, "soft-capped": {"softcap": 2.0}}[case]
    check(Paged(0.25, **options), (q, k_pool, v_pool, tables, ends), ["paged_attention"])


def test_split_prefill_rows_straddling_heads_and_pages_outside_the_pool():
    """Rows of one block straddling query heads (7 rows x 3 heads sharing one kv head), split in
    two key chunks of 64; table entries past the pool or negative read its last or first page
    (clamped: never outside it)."""
    gen = torch.Generator().manual_seed(2)
    k_pool, v_pool = pools(20, 5, 1, 16, gen)
    q = torch.randn(1, 3, 7, 16, generator=gen)
    tables = torch.tensor([[4, 20, 0, -1, 7, 2, 11, 13, 19, 3, 5, 8, 17, 1]])  # 20: page 19, -1: page 0
    ends = torch.arange(60, 67)[None]
    check(Paged(0.25), (q, k_pool, v_pool, tables, ends), ["paged_attention", "attention_combine"], split_kv=2)


def test_the_custom_op_passes_torch_opcheck():
    """Schema, fake tensor and dispatch checks of mkcompiler::paged_attention (SDPA and
    soft-capped paths), and the output strides its fake gives (torch.compile'd steps check them)."""
    gen = torch.Generator().manual_seed(3)
    k_pool, v_pool = pools(8, 4, 2, 16, gen)
    q = torch.randn(2, 3, 4, 16, generator=gen).transpose(1, 2)  # a strided q, as the serving step passes
    args = (q, k_pool, v_pool, tables_out_of_order(2, 3, 8, gen))
    ends = torch.tensor([[5, 6, 7], [1, 2, 3]])
    for options in ((0.25, 0, 0.0), (0.25, 2, 1.5)):
        results = torch.library.opcheck(torch.ops.mkcompiler.paged_attention.default, (*args, ends, *options))
        assert set(results.values()) == {"SUCCESS"}, results
        assert paged_attention(*args, ends, *options).is_contiguous()  # the strides the fake gives


# ---- the serving engine ----

SERVE_TESTS = os.path.dirname(os.path.abspath(__file__))


def test_engine_megakernels_attend_through_the_page_tables():
    """backend='mkcompiler' (Mistral: a sliding window shorter than the sequences): every step's
    megakernel has a paged_attention op and no embedding that gathers from a page pool; the
    greedy tokens equal each request generated alone by eager."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    sys.path.insert(0, SERVE_TESTS)
    from test_serve import MK_OPTIONS, alone, prompts

    from mkcompiler.frontend.hf import random_model
    from mkcompiler.serve import LLM, SamplingParams

    model = random_model("mistral", seed=1, sliding_window=6)
    ps = prompts(6, [5, 9, 3])
    llm = LLM(model, max_batch_size=2, max_seq_len=16, page_size=4, max_chunk=8, backend="mkcompiler",
              compile_options=MK_OPTIONS)  # fmt: skip
    outs = llm.generate(ps, SamplingParams(max_new_tokens=5))
    assert outs == [alone(model, p, 5) for p in ps]
    steps = list(llm.engine.runner._steps.values())
    assert steps
    for mk in steps:
        assert any(name.startswith("paged_attention") for name in mk.queue.opcode_names), mk.queue.opcode_names
        pool_ids = {b.id for b in mk.graph.buffers if b.name.startswith(("k_pool", "v_pool"))}
        assert len(pool_ids) == 2 * model.config.num_hidden_layers
        gathers = [op.name for op in mk.graph.ops if op.kind == "embedding" and op.inputs[0].buffer in pool_ids]
        assert not gathers


# ---- the GPU kernel, compiled offline ----


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU-only check (built in the interpreter)")
def test_paged_kernel_compiles_for_sm90_without_spills():
    """Llama-3.2-1B's attention in bf16 (32 query heads over 8 kv heads of 64), pages of 16: a
    decode batch (16-row blocks, split-KV) and a 64-row prefill chunk (64 x 64 blocks, pipelined)
    in one kernel, as a serving step has them."""
    from mkcompiler.tools.offline import compile_sm90, format_report

    class Step(torch.nn.Module):
        def forward(self, qd, qc, k_pool, v_pool, decode_tables, chunk_table, decode_ends, chunk_ends):
            d = paged_attention(qd, k_pool, v_pool, decode_tables, decode_ends, 0.125)
            c = paged_attention(qc, k_pool, v_pool, chunk_table, chunk_ends, 0.125)
            return d, c

    bf16 = torch.bfloat16
    k_pool, v_pool = torch.randn(512, 16, 8, 64, dtype=bf16), torch.randn(512, 16, 8, 64, dtype=bf16)
    args = (
        torch.randn(4, 32, 1, 64, dtype=bf16),
        torch.randn(1, 32, 64, 64, dtype=bf16),
        k_pool,
        v_pool,
        torch.randint(0, 512, (4, 64)),
        torch.randint(0, 512, (1, 64)),
        torch.randint(1, 1024, (4, 1)),
        torch.arange(500, 564)[None],
    )
    mk = mkcompiler.compile(Step(), args, num_workers=132, interpret=False)
    attention = [op for op in mk.graph.ops if op.kind == "paged_attention"]
    assert [op.attrs.tile for op in attention] == [(16, 128), (64, 64)] and attention[1].attrs.stages > 1
    assert attention[0].attrs.split > 1
    report = compile_sm90(mk.source)
    print("\n" + format_report(report))
    assert report["regs"] > 0 and report["spilled_bytes"] == 0 and report["local"] == 0, format_report(report)
