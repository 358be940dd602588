"""A Hugging Face causal LM as one paged serving step, with no code per model family.

`PagedLM(model, num_pages, page_size)` holds a paged KV cache (per layer, a key pool and a value
pool of [num_pages, page_size, kv heads, head dim], module buffers) and runs the model's own
forward with its attention swapped for `paged_attention`, registered in transformers'
AttentionInterface: every family computes its projections, rotary embeddings and q/k norms as
it always does and hands the attention function query, key and value, which this one appends to
the pools through the page table and attends with. So torch.export (mkcompiler.compile) and
torch.compile capture one graph for any family whose attention goes through the interface.
Attention is the custom op mkcompiler::paged_attention (ops/attention.py): eagerly it gathers
each sequence's pages, compiled it is a tile that reads keys and values through the page table;
the append is an index_put through the slot mapping (a scatter, ops/scatter.py).

A step is a prefill chunk of one sequence plus one decode token each of B others (chunked
prefill mixed with decode, as examples/llama.MixedStep batches them), all through the page
tables. Every Linear sees the C + B rows together; attention runs per part.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from mkcompiler.frontend.hf import _head_shape
from mkcompiler.ops.attention import paged_attention as paged_attention_op

ATTENTION = "mkcompiler_paged"  # the name registered in transformers' AttentionInterface
CONTEXT_KWARG = "mkcompiler_paged"  # the forward kwarg that carries a step's PagedContext to the attention calls


class PagedInputs(NamedTuple):
    """One step's inputs (int64). T = C + B tokens: the chunk's C first, then one per decoding
    sequence. Padding rows (a bucket larger than the work) write to the scratch page."""

    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] position of each token in its sequence
    slot_pages: torch.Tensor  # [T] the page its key and value go to
    slot_offsets: torch.Tensor  # [T] the slot in that page
    chunk_pages: torch.Tensor  # [P] the chunk's sequence's page table (padded with the scratch page)
    decode_pages: torch.Tensor  # [B, P] the decoding sequences' page tables
    sample_rows: torch.Tensor  # [1 + B] rows of T whose logits the step returns: the chunk's last, then the decodes

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """(chunk rows C, decode rows B, pages per table P): what a compiled step is specialised to."""
        b, p = self.decode_pages.shape
        return self.tokens.shape[0] - b, b, p


@dataclass
class PagedContext:
    """What one step's attention calls share (built once per step, read by every layer)."""

    pools: list[tuple[torch.Tensor, torch.Tensor]]
    inputs: PagedInputs
    n_chunk: int
    ends: torch.Tensor  # [T] keys each token sees: its position + 1 (causal; earlier pages included)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [1, Hq, T, D], key/value [1, Hkv, T, D] (rotary
    applied) -> ([1, T, Hq, D], None). Appends key and value to this layer's pools, then attends
    through the page tables. attention_mask is None (no mask function is registered: the masks
    come from positions and page tables)."""
    ctx: PagedContext = kwargs[CONTEXT_KWARG]
    k_pool, v_pool = ctx.pools[module.layer_idx]
    x = ctx.inputs
    k_pool[x.slot_pages, x.slot_offsets] = key[0].transpose(0, 1).to(k_pool.dtype)
    v_pool[x.slot_pages, x.slot_offsets] = value[0].transpose(0, 1).to(v_pool.dtype)
    q = query[0].to(k_pool.dtype)  # [Hq, T, D]
    c = ctx.n_chunk
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    options = (scale, kwargs.get("sliding_window") or 0, kwargs.get("softcap") or 0.0)
    out_chunk = paged_attention_op(
        q[None, :, :c], k_pool, v_pool, x.chunk_pages[None], ctx.ends[None, :c], *options
    )  # [1, Hq, C, D]
    out_decode = paged_attention_op(
        q[:, c:].transpose(0, 1)[:, :, None], k_pool, v_pool, x.decode_pages, ctx.ends[c:, None], *options
    )  # [B, Hq, 1, D]
    out = torch.cat((out_chunk[0].transpose(0, 1), out_decode[:, :, 0]))  # [T, Hq, D]
    return out[None].to(query.dtype), None


def register_attention() -> None:
    import transformers

    transformers.AttentionInterface.register(ATTENTION, paged_attention)


@contextlib.contextmanager
def attention_implementation(config, name: str):
    """The model's attention implementation is `name` inside (restored after)."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


class PagedLM(nn.Module):
    """forward(*PagedInputs) -> logits [1 + B, vocab] of the sample rows, float32. Writes the
    step's keys and values into the pools (buffers k_pool_{i}, v_pool_{i}) in place."""

    def __init__(self, model: nn.Module, num_pages: int, page_size: int):
        super().__init__()
        register_attention()
        self.model = model
        self.page_size = page_size
        config = model.config.get_text_config()
        self.vocab_size = config.vocab_size
        self.num_layers = config.num_hidden_layers
        kv_heads, head_dim = _head_shape(config)
        param = next(model.parameters())
        for i in range(self.num_layers):
            for name in ("k_pool", "v_pool"):
                pool = torch.zeros(num_pages, page_size, kv_heads, head_dim, dtype=param.dtype, device=param.device)
                self.register_buffer(f"{name}_{i}", pool, persistent=False)

    def pools(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Read as attributes at every call: under torch.export these are the traced buffers, so
        # the attention's writes become buffer mutations.
        return [(getattr(self, f"k_pool_{i}"), getattr(self, f"v_pool_{i}")) for i in range(self.num_layers)]

    def forward(self, tokens, positions, slot_pages, slot_offsets, chunk_pages, decode_pages, sample_rows):
        inputs = PagedInputs(tokens, positions, slot_pages, slot_offsets, chunk_pages, decode_pages, sample_rows)
        n_chunk = tokens.shape[0] - decode_pages.shape[0]
        ctx = PagedContext(self.pools(), inputs, n_chunk, positions + 1)
        with attention_implementation(self.model.config, ATTENTION):
            out = self.model(
                input_ids=tokens[None], position_ids=positions[None], use_cache=False, **{CONTEXT_KWARG: ctx}
            )
        return out.logits[0][sample_rows].float()
