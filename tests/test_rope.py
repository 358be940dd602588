"""Rotary embeddings in both conventions, as plain PyTorch writes them (issue 3): half-split
(rotate_half, as in Llama/HF) and interleaved (pairs (x[2i], x[2i+1]), as in GPT-J and Meta's
original Llama, written with strided slices and stack + flatten instead of complex numbers).
The rotary table is built from the runtime positions inside the graph."""

import pytest
import torch

import mkcompiler
from tests.helpers import rel_err


def rope_tables(pos, dim, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = pos.float()[:, None] * inv[None, :]  # [S, dim/2]
    return ang.cos(), ang.sin()


def rope_half(x, cos, sin):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def rope_interleaved(x, cos, sin):
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2)


class RotaryProjection(torch.nn.Module):
    """q = rope(W x) per head, then an output projection: rope between two matmuls."""

    def __init__(self, rope, dim=64, heads=4):
        super().__init__()
        self.rope, self.heads = rope, heads
        self.wq = torch.nn.Linear(dim, dim, bias=False)
        self.wo = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x, pos):
        b, s, d = x.shape
        q = self.wq(x).view(b, s, self.heads, d // self.heads).transpose(1, 2)  # [B, H, S, Dh]
        cos, sin = rope_tables(pos, d // self.heads)
        q = self.rope(q, cos, sin)
        return self.wo(q.transpose(1, 2).reshape(b, s, d))


@pytest.mark.parametrize("rope", [rope_half, rope_interleaved], ids=["half-split", "interleaved"])
@pytest.mark.parametrize("seq", [1, 5], ids=["decode", "prefill"])
def test_rotary_conventions_match_eager(rope, seq):
    torch.manual_seed(0)
    model = RotaryProjection(rope)
    x = torch.randn(2, seq, 64)
    pos = torch.arange(7, 7 + seq)
    mk = mkcompiler.compile(model, (x, pos))
    for start in (7, 30):  # the position is a runtime input: new positions, same megakernel
        x = torch.randn(2, seq, 64)
        pos = torch.arange(start, start + seq)
        mk.poison()
        assert rel_err(mk(x, pos), model(x, pos)) <= 1e-5


def test_the_conventions_differ():
    """The two conventions rotate different pairs, so the test above can tell them apart."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 1, 16)
    cos, sin = rope_tables(torch.tensor([3]), 16)
    assert rel_err(rope_half(x, cos, sin), rope_interleaved(x, cos, sin)) > 0.1
