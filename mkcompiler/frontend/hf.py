"""Hugging Face `transformers` causal LMs as decode steps mkcompiler can capture.

`StaticCacheLM(model, batch_size, max_cache_len)` wraps a `*ForCausalLM` with transformers' own
`StaticCache` whose key/value tensors (and per-layer fill counters) are registered as this
module's buffers: `forward(input_ids, cache_position) -> logits` writes the new keys/values
into them in place, so `torch.export` sees them as mutated buffers and mkcompiler as model
state. One wrapper serves prefill (S tokens) and decode (S = 1); compile it once per shape:

    lm = StaticCacheLM(model, max_cache_len=256)
    prefill = mkcompiler.compile(lm, (prompt, torch.arange(P)))
    decode = mkcompiler.compile(lm, (prompt[:, :1], torch.tensor([P])))
    # both megakernels read and write lm's cache buffers in place

Nothing here is specific to one model family: any decoder whose forward takes
(input_ids, position_ids, past_key_values, use_cache) and whose ops mkcompiler supports
works. `random_model` builds small random models of the families we test (nothing is
downloaded). Import mkcompiler before transformers on a machine without a GPU: transformers
imports Triton, and Triton must see TRITON_INTERPRET before it is first imported.
"""

from __future__ import annotations

import torch
from torch import nn

# family -> (config class, model class) names in `transformers`
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    # more families, tested as generic compositions (no code of their own here or in the passes)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),  # soft-capped logits, GELU-tanh, (1 + w) norms
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),  # fused QKV and gate/up projections
    "cohere": ("CohereConfig", "CohereForCausalLM"),  # parallel attention and MLP, LayerNorm, logit scale
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM"),  # LayerNorm with bias, GELU MLP, biases
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),  # q/k norms over all heads, norms after each block
}

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)


def random_model(family: str, dtype=torch.float32, seed: int = 0, device="cpu", **config) -> nn.Module:
    """A `*ForCausalLM` of `family` with random weights, built from a config (TINY unless
    overridden), using PyTorch's scaled_dot_product_attention ("sdpa")."""
    import transformers

    config_name, model_name = FAMILIES[family]
    cfg = getattr(transformers, config_name)(**{**TINY, **config})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, model_name)(cfg)
    return model.to(dtype).eval()


def _head_shape(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return getattr(config, "num_key_value_heads", None) or heads, head_dim


class StaticCacheLM(nn.Module):
    """A causal LM plus a static KV cache held as buffers: forward(input_ids [B, S] int64,
    cache_position [S] int64) -> logits [B, S, vocab] (and the greedy next token [B] when
    `next_token`). Tokens go to cache slots cache_position[0] .. cache_position[0] + S - 1
    and attend to every filled slot before them (transformers' own masks)."""

    def __init__(self, model: nn.Module, batch_size: int = 1, max_cache_len: int = 32, next_token: bool = False):
        super().__init__()
        from transformers.cache_utils import StaticCache, StaticLayer

        config = model.config.get_text_config()
        self.model = model
        self.next_token = next_token
        self.cache = StaticCache(config=config, max_cache_len=max_cache_len)
        # Sliding-window layers keep a ring buffer with Python-side control flow; a full-length
        # layer plus the model's own sliding-window mask gives the same attention.
        self.cache.layers = [StaticLayer(max_cache_len) if layer.is_sliding else layer for layer in self.cache.layers]
        kv_heads, head_dim = _head_shape(config)
        param = next(model.parameters())
        self.cache.early_initialization(batch_size, kv_heads, head_dim, param.dtype, param.device)
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            self.register_buffer(f"cache_length_{i}", layer.cumulative_length, persistent=False)

    def caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (getattr(self, f"key_cache_{i}"), getattr(self, f"value_cache_{i}")) for i in range(len(self.cache.layers))
        ]

    def reset(self) -> None:
        for name, buf in self.named_buffers():
            if name.startswith(("key_cache_", "value_cache_", "cache_length_")):
                buf.zero_()

    def _bind_cache(self) -> None:
        # Point the cache layers at this module's buffers as this call sees them: under
        # non-strict torch.export those are the traced buffers, so writes through the cache
        # become buffer mutations (tensors reached only through the cache object would be
        # lifted as constants and their updates lost).
        for i, layer in enumerate(self.cache.layers):
            layer.keys = getattr(self, f"key_cache_{i}")
            layer.values = getattr(self, f"value_cache_{i}")
            layer.cumulative_length = getattr(self, f"cache_length_{i}")

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor):
        self._bind_cache()
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(cache_position[0])  # where this call's tokens start
        position_ids = cache_position[None, :].expand(input_ids.shape[0], -1)
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache, use_cache=True)
        logits = out.logits
        if self.next_token:
            return logits, logits[:, -1].argmax(-1)
        return logits


def greedy(prefill, decode, prompt: torch.Tensor, new_tokens: int, on_logits=None) -> torch.Tensor:
    """Greedy generation with step functions `f(input_ids, cache_position) -> logits` (or
    (logits, next_token), as StaticCacheLM(next_token=True) returns): an eager StaticCacheLM or
    compiled megakernels. Prefills the prompt [B, P], then decodes one token at a time; returns
    the new tokens [B, new_tokens]. `on_logits(step, logits)` sees each step's logits."""
    p, device = prompt.shape[1], prompt.device

    def step(fn, i, ids, pos):
        out = fn(ids, pos)
        logits, nxt = out if isinstance(out, tuple) else (out, out[:, -1].argmax(-1))
        if on_logits is not None:
            on_logits(i, logits)
        return nxt

    tokens = [step(prefill, 0, prompt, torch.arange(p, device=device))]
    for i in range(1, new_tokens):
        tokens.append(step(decode, i, tokens[-1][:, None], torch.tensor([p + i - 1], device=device)))
    return torch.stack(tokens, dim=1)
