"""A causal LM as one paged serving step, with no code per model family.

`PagedLM(model, num_pages, page_size)` holds a paged KV cache (per layer, a key pool and a value
pool of [num_pages, page_size, kv heads, head dim], module buffers) and runs the model's own
forward with its attention swapped for a paged one: every family computes its projections,
rotary embeddings and q/k norms as it always does and hands an attention function query, key
and value, which that function appends to the pools through the page table and attends with. So
torch.export (mkcompiler.compile) and torch.compile capture one graph for any model that takes
an attention function, of one of two kinds (PAGED_MODEL_KINDS):
- a Hugging Face causal LM: `paged_attention`, registered in transformers' AttentionInterface;
- a model whose forward takes one itself (examples/llama.Llama): forward(tokens [1, T],
  positions [T], attention=fn, logits_to_keep=rows) -> logits [1, rows, vocab], each layer
  calling fn(module, q, k, v) (q [1, Hq, T, D], k and v [1, Hkv, T, D], rotary applied) for
  its [1, Hq, T, D] output instead of attending over its own cache; module.layer_idx numbers
  the layers from 0, as in transformers. Its shapes are found by one forward at construction.
Only the sampled rows reach the LM head (logits_to_keep: a gather along the token dim first).
Attention is the custom op mkcompiler::paged_attention (ops/attention.py): eagerly it gathers
each sequence's pages, compiled it is a tile that reads keys and values through the page table;
the append is an index_put through the slot mapping (a scatter, ops/scatter.py).

A step is a prefill chunk of one sequence plus one decode token each of B others (chunked
prefill mixed with decode, as examples/llama.MixedStep batches them), all through the page
tables. Every Linear sees the C + B rows together; attention runs per part.
"""

from __future__ import annotations

import contextlib
import inspect
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


def attend(ctx: PagedContext, layer: int, query, key, value, scale, window=0, softcap=0.0) -> torch.Tensor:
    """query [Hq, T, D], key and value [Hkv, T, D] of one layer -> [T, Hq, D] in query's dtype.
    Appends key and value to the layer's pools, then attends through the page tables: the chunk's
    rows over its sequence's table, each decode row over its own."""
    k_pool, v_pool = ctx.pools[layer]
    x = ctx.inputs
    k_pool[x.slot_pages, x.slot_offsets] = key.transpose(0, 1).to(k_pool.dtype)
    v_pool[x.slot_pages, x.slot_offsets] = value.transpose(0, 1).to(v_pool.dtype)
    q = query.to(k_pool.dtype)  # [Hq, T, D]
    c = ctx.n_chunk
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    options = (scale, window or 0, softcap or 0.0)
    out_chunk = paged_attention_op(
        q[None, :, :c], k_pool, v_pool, x.chunk_pages[None], ctx.ends[None, :c], *options
    )  # [1, Hq, C, D]
    out_decode = paged_attention_op(
        q[:, c:].transpose(0, 1)[:, :, None], k_pool, v_pool, x.decode_pages, ctx.ends[c:, None], *options
    )  # [B, Hq, 1, D]
    return torch.cat((out_chunk[0].transpose(0, 1), out_decode[:, :, 0])).to(query.dtype)  # [T, Hq, D]


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [1, Hq, T, D], key/value [1, Hkv, T, D] (rotary
    applied) -> ([1, T, Hq, D], None). attention_mask is None (no mask function is registered:
    the masks come from positions and page tables)."""
    ctx: PagedContext = kwargs[CONTEXT_KWARG]
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    return attend(ctx, module.layer_idx, query[0], key[0], value[0], scaling, window, softcap)[None], None


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


@dataclass(frozen=True)
class CacheShape:
    """What the pools and the engine need to know of a model."""

    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int


class HuggingFaceLM:
    """A transformers causal LM: its attention goes through the AttentionInterface."""

    def __init__(self, model: nn.Module):
        register_attention()
        self.model = model
        config = model.config.get_text_config()
        kv_heads, head_dim = _head_shape(config)
        self.shape = CacheShape(config.num_hidden_layers, kv_heads, head_dim, config.vocab_size)

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        return hasattr(model, "config") and hasattr(model.config, "get_text_config")

    def logits(self, ctx: PagedContext, tokens, positions, sample_rows) -> torch.Tensor:
        with attention_implementation(self.model.config, ATTENTION):
            out = self.model(
                input_ids=tokens[None],
                position_ids=positions[None],
                use_cache=False,
                logits_to_keep=sample_rows,
                **{CONTEXT_KWARG: ctx},
            )
        return out.logits[0]


class AttentionFunctionLM:
    """A model whose forward takes the attention function itself (the module docstring's
    contract; examples/llama.Llama)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.shape = self._probe()

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        params = inspect.signature(model.forward).parameters
        return "attention" in params and "logits_to_keep" in params

    def logits(self, ctx: PagedContext, tokens, positions, sample_rows) -> torch.Tensor:
        def attention(module, q, k, v):
            return attend(ctx, module.layer_idx, q[0], k[0], v[0], None).transpose(0, 1)[None]

        return self.model(tokens[None], positions, attention=attention, logits_to_keep=sample_rows)[0]

    def _probe(self) -> CacheShape:
        """One token through the model, its attention calls recorded (and answered with zeros)."""
        seen: dict[int, tuple[int, int]] = {}

        def attention(module, q, k, v):
            seen[module.layer_idx] = (k.shape[1], k.shape[3])
            return torch.zeros_like(q)

        device = next(self.model.parameters()).device
        one = torch.zeros(1, dtype=torch.int64, device=device)
        with torch.no_grad():
            logits = self.model(one[None], one, attention=attention, logits_to_keep=one)
        if sorted(seen) != list(range(len(seen))) or len(set(seen.values())) != 1:
            raise ValueError(
                f"{type(self.model).__name__}: its attention calls must come from modules with layer_idx 0, 1, ... "
                f"and keys of one shape; got (layer_idx: (kv heads, head dim)) {seen}"
            )
        kv_heads, head_dim = seen[0]
        return CacheShape(len(seen), kv_heads, head_dim, logits.shape[-1])


PAGED_MODEL_KINDS = (HuggingFaceLM, AttentionFunctionLM)


def paged_model(model: nn.Module) -> HuggingFaceLM | AttentionFunctionLM:
    for kind in PAGED_MODEL_KINDS:
        if kind.accepts(model):
            return kind(model)
    raise TypeError(
        "mkcompiler.serve takes a Hugging Face causal LM (its attention goes through transformers' "
        "AttentionInterface) or a model whose forward(tokens, positions, attention=fn, logits_to_keep=rows) "
        f"takes an attention function (mkcompiler/serve/paged_lm.py); got {type(model).__name__}"
    )


class PagedLM(nn.Module):
    """forward(*PagedInputs) -> logits [1 + B, vocab] of the sample rows, float32. Writes the
    step's keys and values into the pools (buffers k_pool_{i}, v_pool_{i}) in place."""

    def __init__(self, model: nn.Module, num_pages: int, page_size: int):
        super().__init__()
        self.family = paged_model(model)
        self.model = model
        self.page_size = page_size
        shape = self.family.shape
        self.vocab_size, self.num_layers = shape.vocab_size, shape.num_layers
        param = next(model.parameters())
        for i in range(self.num_layers):
            for name in ("k_pool", "v_pool"):
                pool = torch.zeros(
                    num_pages, page_size, shape.kv_heads, shape.head_dim, dtype=param.dtype, device=param.device
                )
                self.register_buffer(f"{name}_{i}", pool, persistent=False)

    def pools(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Read as attributes at every call: under torch.export these are the traced buffers, so
        # the attention's writes become buffer mutations.
        return [(getattr(self, f"k_pool_{i}"), getattr(self, f"v_pool_{i}")) for i in range(self.num_layers)]

    def forward(self, tokens, positions, slot_pages, slot_offsets, chunk_pages, decode_pages, sample_rows):
        inputs = PagedInputs(tokens, positions, slot_pages, slot_offsets, chunk_pages, decode_pages, sample_rows)
        n_chunk = tokens.shape[0] - decode_pages.shape[0]
        ctx = PagedContext(self.pools(), inputs, n_chunk, positions + 1)
        return self.family.logits(ctx, tokens, positions, sample_rows).float()
