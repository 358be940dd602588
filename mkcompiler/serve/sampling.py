"""Sampling on the device: one batched call per step picks every row's next token from its
logits with that row's temperature, top-k, top-p and seed; the host reads only the tokens.

Randomness is counter-based: the noise of a draw is a hash of (the request's seed, how many
tokens it has generated, the candidate's rank), so a request draws the same tokens whatever it
is batched with, however the batch is padded, and after a preemption and recompute."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

_MASK32 = 0xFFFFFFFF


class SamplingRows(NamedTuple):
    """Per-row parameters, tensors of length R on the logits' device."""

    temperature: torch.Tensor  # float32; 0: greedy
    top_k: torch.Tensor  # int64; the vocabulary size when there is no limit
    top_p: torch.Tensor  # float32 in (0, 1]
    seed: torch.Tensor  # int64 in [0, 2^32)
    step: torch.Tensor  # int64: tokens the request has generated so far


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) of int64 values in [0, 2^32): products wrap in int64,
    and only their low 32 bits are kept, so the result is the same on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """[R, n] float32 uniforms in (0, 1), a function of (seed[r], step[r], column) only."""
    row = _hash32((seed & _MASK32) ^ _hash32(step & _MASK32))
    cols = torch.arange(n, device=seed.device, dtype=torch.int64)
    bits = _hash32((row[:, None] + cols[None, :] * 0x9E3779B9) & _MASK32) >> 8  # 24 random bits
    return (bits.to(torch.float32) + 0.5) / float(1 << 24)


def candidate_mask(sorted_probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[R, V] bool over tokens sorted by falling probability: the top_k most likely, and of those
    the smallest prefix whose probability reaches top_p (the most likely token always stays)."""
    ranks = torch.arange(sorted_probs.shape[-1], device=sorted_probs.device)
    before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above
    return (ranks[None, :] < top_k[:, None]) & (before < top_p[:, None])


def sample(logits: torch.Tensor, rows: SamplingRows, drawn: Sequence[int] | None = None) -> torch.Tensor:
    """logits [R, V] -> next tokens [R] int64 (on the logits' device): the argmax where the
    temperature is 0, else a draw (`_draw`). `drawn`: the rows whose temperature is above 0, when
    the caller knows them on the host (the engine does): the other rows then cost one argmax, and
    a step of greedy requests no sort of its [R, V] logits. The draws are the same either way
    (a draw depends on its row's seed and step only)."""
    logits = logits.float()
    greedy = logits.argmax(-1)
    if drawn is None:
        return torch.where(rows.temperature == 0, greedy, _draw(logits, rows))
    if not drawn:
        return greedy
    index = torch.tensor(list(drawn), dtype=torch.int64, device=logits.device)
    greedy[index] = _draw(logits.index_select(0, index), SamplingRows(*(t.index_select(0, index) for t in rows)))
    return greedy


def _draw(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """Gumbel-max over each row's candidates: argmax(logit / T + Gumbel noise) draws from
    softmax(logit / T) restricted to the top-k / top-p set."""
    scaled = logits / rows.temperature.clamp_min(1e-6)[:, None]
    sorted_logits, order = scaled.sort(-1, descending=True)
    keep = candidate_mask(sorted_logits.softmax(-1), rows.top_k, rows.top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(rows.seed, rows.step, logits.shape[-1])))
    choice = torch.where(keep, sorted_logits + gumbel, float("-inf")).argmax(-1)
    return order.gather(1, choice[:, None])[:, 0]
