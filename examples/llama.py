"""A plain-PyTorch Llama (gpt-fast style) with a static KV cache, written the way people
write it: nothing in it knows about mkcompiler. `forward(tokens, input_pos)` runs prefill
(S tokens) or decode (S = 1); the KV cache is a module buffer updated in place.

    from examples.llama import Llama, LlamaConfig

`LlamaConfig.spelling` picks how the norms, RoPE and attention are written: "canonical"
(nn.RMSNorm, rotate-half by slicing, F.scaled_dot_product_attention) or "written" (the same layer
spelled out as much model code spells it: WrittenRMSNorm, rotate_half_chunked, Attention.written).
Both compile to the same structure (passes/canonicalize.py; tests/test_llama_spellings.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaConfig:
    vocab_size: int = 128256
    dim: int = 2048
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: int = 8
    hidden: int = 8192
    max_seq_len: int = 1024
    max_batch: int = 1
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    spelling: str = "canonical"  # one of SPELLINGS

    def __post_init__(self):
        if self.spelling not in SPELLINGS:
            raise ValueError(f"spelling {self.spelling!r}: expected one of {', '.join(SPELLINGS)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


SPELLINGS = ("canonical", "written")

CONFIGS = {
    "tiny": LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=128, max_seq_len=64),
    "llama-3.2-1b": LlamaConfig(),
    "llama-3.1-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden=14336),
    "llama-3.1-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden=28672),
}


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


# ---- the "written" spelling: the same layer spelled out the way much model code spells it ----


class WrittenRMSNorm(nn.Module):
    """nn.RMSNorm written out in fp32, cast back, then the weight (Llama's reference code); its
    parameter has nn.RMSNorm's name, so one state dict loads into either."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rms_norm(c: LlamaConfig) -> nn.Module:
    return WrittenRMSNorm(c.dim, c.norm_eps) if c.spelling == "written" else nn.RMSNorm(c.dim, eps=c.norm_eps)


def rotate_half_chunked(x, cos, sin):
    """RoPE as rotate-half written with chunk + cat, in fp32: x [B, S, H, D] (before the heads'
    transpose) rotates the pairs (x[i], x[i + D/2]) by cos, sin [S, D] fp32 (the angles twice).

    Interleaved pairs or a complex product (Llama-2/3's reference) compile to the same structure
    at batch 1 (passes/canon_rope.py); a batched prefill's K scatter would need 5 dims and keeps
    one more elementwise op, so the written spelling uses rotate-half."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]).type_as(x)


def repeat_kv(x, groups: int):
    """[B, Hkv, L, D] -> [B, Hkv * groups, L, D], each KV head repeated for its query heads."""
    b, hk, n, d = x.shape
    return x[:, :, None].expand(b, hk, groups, n, d).reshape(b, hk * groups, n, d)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        shape = (c.max_batch, c.n_kv_heads, c.max_seq_len, c.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, x, cos, sin, mask, input_pos, attention=None):
        """attention: None, or a function (self, q, k, v) -> o, q [B, heads, S, head dim] and k, v
        [B, kv heads, S, head dim] after RoPE, o as q, that attends in place of the KV cache and
        the mask (a paged KV cache: mkcompiler/serve/paged_lm.py); self.layer_idx names the layer."""
        if self.c.spelling == "written":
            return self.written(x, cos, sin, mask, input_pos, attention)
        b, s, _ = x.shape
        c = self.c
        q = self.wq(x).view(b, s, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if attention is not None:
            return self.wo(attention(self, q, k, v).transpose(1, 2).reshape(b, s, c.dim))
        self.k_cache[:b, :, input_pos] = k
        self.v_cache[:b, :, input_pos] = v
        o = F.scaled_dot_product_attention(q, self.k_cache[:b], self.v_cache[:b], attn_mask=mask, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(b, s, c.dim))

    def written(self, x, cos, sin, mask, input_pos, attention=None):
        """forward with RoPE in [B, S, H, D] (rotate_half_chunked; cos, sin [S, D] fp32) and attention
        written out: repeat_kv, scores scaled by 1 / sqrt(d), the keys past each position filled
        with -inf, softmax in fp32, then the values."""
        b, s, _ = x.shape
        c = self.c
        q = rotate_half_chunked(self.wq(x).view(b, s, c.n_heads, c.head_dim), cos, sin).transpose(1, 2)
        k = rotate_half_chunked(self.wk(x).view(b, s, c.n_kv_heads, c.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(b, s, c.n_kv_heads, c.head_dim).transpose(1, 2)
        if attention is not None:
            return self.wo(attention(self, q, k, v).transpose(1, 2).reshape(b, s, c.dim))
        self.k_cache[:b, :, input_pos] = k
        self.v_cache[:b, :, input_pos] = v
        groups = c.n_heads // c.n_kv_heads
        keys, values = repeat_kv(self.k_cache[:b], groups), repeat_kv(self.v_cache[:b], groups)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(c.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return self.wo((p @ values).transpose(1, 2).reshape(b, s, c.dim))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate = nn.Linear(c.dim, c.hidden, bias=False)
        self.up = nn.Linear(c.dim, c.hidden, bias=False)
        self.down = nn.Linear(c.hidden, c.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attn_norm = rms_norm(c)
        self.attn = Attention(c)
        self.mlp_norm = rms_norm(c)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, input_pos, attention=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos, attention)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = rms_norm(c)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        for i, layer in enumerate(self.layers):
            layer.attn.layer_idx = i  # what an attention function tells layers apart by (as transformers')

    def forward(self, tokens, input_pos, attention=None, logits_to_keep=None):
        """tokens [B, S] int64, input_pos [S] int64 (cache slots) -> logits [B, S, vocab].

        attention: None (the KV cache), or Attention.forward's function, for every layer; then
        input_pos is only each token's position (RoPE), so the S tokens may come from several
        sequences. logits_to_keep: None, or an int64 index of the rows of S whose logits to return
        (only they reach the norm and the LM head) -> logits [B, len(logits_to_keep), vocab]."""
        x = self.embed(tokens)
        freqs = input_pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.c.spelling == "written":  # fp32 tables (rotate_half_chunked)
            cos, sin = emb.cos(), emb.sin()
        else:
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = input_pos[:, None] >= torch.arange(self.c.max_seq_len, device=tokens.device)[None, :]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, attention)
        if logits_to_keep is not None:
            x = x[:, logits_to_keep]
        return self.lm_head(self.norm(x))

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.attn.k_cache.zero_()
            layer.attn.v_cache.zero_()


def random_llama(name_or_config, dtype=torch.float32, device="cpu", seed=0, **overrides) -> Llama:
    """A Llama of the given shape with random weights (nothing is downloaded)."""
    torch.manual_seed(seed)
    c = CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    if overrides:
        c = LlamaConfig(**{**c.__dict__, **overrides})
    # Built and initialised on the target device: an 8B model initialised on the host in fp32 took
    # minutes (32 GB of CPU random numbers) before any GPU work started.
    with torch.device(device):
        model = Llama(c)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    return model.to(device=device, dtype=dtype)


def fill_caches(model: Llama, std: float = 0.5) -> Llama:
    """Random values in every layer's KV cache (a decode step then attends over real-looking keys
    at any position, not zeros); returns the model."""
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.k_cache.normal_(0.0, std)
            layer.attn.v_cache.normal_(0.0, std)
    return model


class GreedyLoop(nn.Module):
    """One greedy decode step with its loop state on the device: the current token and position
    and the tokens generated so far are module buffers the step updates in place. A megakernel
    compiled from it needs no inputs, so generating N tokens is N launches with no host work in
    between (no sync, no copies): `for _ in range(n): mk.launch()`."""

    def __init__(self, model: Llama, batch: int, max_new: int):
        super().__init__()
        self.model = model
        device = next(model.parameters()).device
        self.register_buffer("token", torch.zeros(batch, 1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("pos", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("step", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer(
            "generated", torch.zeros(batch, max_new, dtype=torch.long, device=device), persistent=False
        )

    def start(self, token: torch.Tensor, pos: int) -> None:
        self.token.copy_(token)
        self.pos.fill_(pos)
        self.step.zero_()

    def forward(self):
        logits = self.model(self.token, self.pos)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        self.generated[:, self.step] = nxt
        self.token.copy_(nxt)
        self.pos.add_(1)
        self.step.add_(1)
        return nxt


class MixedStep(nn.Module):
    """A prefill chunk of one sequence and one decode token of B others in one step (chunked
    prefill, as serving engines batch them): every Linear sees the C + B rows together, so each
    weight is read once for both; attention runs per part. KV-cache row 0 holds the chunk's
    sequence, rows 1..B the decoding ones, each at its own position (max_batch >= B + 1).

    forward(chunk_tokens [1, C], chunk_pos [C], dec_tokens [B, 1], dec_pos [B]) -> logits [C + B, vocab]
    (the chunk's rows first)."""

    def __init__(self, model: Llama):
        super().__init__()
        self.model = model

    def forward(self, chunk_tokens, chunk_pos, dec_tokens, dec_pos):
        m = self.model
        if m.c.spelling != "canonical":  # _attention below is the canonical spelling's
            raise ValueError(f"MixedStep needs a model of the canonical spelling, not {m.c.spelling!r}")
        n_chunk, batch = chunk_tokens.shape[1], dec_tokens.shape[0]
        if batch + 1 > m.c.max_batch:
            raise ValueError(f"{batch} decoding sequences need a KV cache of {batch + 1} rows, not {m.c.max_batch}")
        pos = torch.cat((chunk_pos, dec_pos))
        x = m.embed(torch.cat((chunk_tokens.reshape(-1), dec_tokens.reshape(-1))))  # [T, dim]
        freqs = pos[:, None].float() * m.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]  # [T, 1, head dim]
        keys = torch.arange(m.c.max_seq_len, device=x.device)
        masks = (chunk_pos[:, None] >= keys[None, :], (dec_pos[:, None] >= keys[None, :])[:, None, None, :])
        for layer in m.layers:
            x = x + self._attention(layer.attn, layer.attn_norm(x), cos, sin, masks, chunk_pos, dec_pos, n_chunk)
            x = x + layer.mlp(layer.mlp_norm(x))
        return m.lm_head(m.norm(x))

    @staticmethod
    def _attention(a: Attention, x, cos, sin, masks, chunk_pos, dec_pos, n_chunk):
        c, t = a.c, x.shape[0]
        q = a.wq(x).view(t, c.n_heads, c.head_dim)
        k = a.wk(x).view(t, c.n_kv_heads, c.head_dim)
        v = a.wv(x).view(t, c.n_kv_heads, c.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # The chunk: cache row 0, causal over its own positions.
        a.k_cache[:1, :, chunk_pos] = k[:n_chunk].transpose(0, 1)[None]
        a.v_cache[:1, :, chunk_pos] = v[:n_chunk].transpose(0, 1)[None]
        qc = q[:n_chunk].transpose(0, 1)[None]
        oc = F.scaled_dot_product_attention(qc, a.k_cache[:1], a.v_cache[:1], attn_mask=masks[0], enable_gqa=True)
        # The decoding sequences: cache rows 1..B, sequence b at its own position dec_pos[b].
        batch = t - n_chunk
        rows = torch.arange(batch, device=x.device)
        k_rows, v_rows = a.k_cache[1 : batch + 1], a.v_cache[1 : batch + 1]
        k_rows[rows, :, dec_pos] = k[n_chunk:]
        v_rows[rows, :, dec_pos] = v[n_chunk:]
        qd = q[n_chunk:, :, None]  # [B, heads, 1, head dim]
        od = F.scaled_dot_product_attention(qd, k_rows, v_rows, attn_mask=masks[1], enable_gqa=True)
        o = torch.cat((oc[0].transpose(0, 1).reshape(n_chunk, -1), od.reshape(batch, -1)))
        return a.wo(o)
