"""Settings.matmul_tma: large-M matmul tiles load A and B through tensor descriptors they make
(ops/matmul.matmul_tile_tma; TMA bulk copies on a GPU). In the interpreter against float64
eager with poisoned intermediates: both weight layouts (a Linear's W^T, a [K, N] matrix), a
bias, ragged edges (M, N, K not multiples of the tile: the copies zero-fill past them), split
K; and which matmuls take the path. Settings.decode_weights_tma: decode tiles' weight blocks
the same way."""

import copy

import pytest
import torch
from mkcompiler.ops.registry import FAMILIES

import mkcompiler
from examples.llama import random_llama
from tests.helpers import FOLDED, TOL, compile_and_check, reference, rel_err


class Prefill(torch.nn.Module):
    """Linear (W^T, bias) -> gelu -> x @ P (a [K, N] parameter) -> Linear (no bias)."""

    def __init__(self, dim=72, hidden=80, out=40):
        super().__init__()
        self.up = torch.nn.Linear(dim, hidden)
        self.p = torch.nn.Parameter(torch.randn(hidden, hidden) / hidden**0.5)
        self.down = torch.nn.Linear(hidden, out, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)) @ self.p)


def tma_tiles(mk) -> list[str]:
    return [op.name for op in mk.graph.ops if op.kind == "matmul" and _is_tma(op)]


def _is_tma(op) -> bool:
    return bool(FAMILIES["matmul"].key(op)[8][-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("split", [1, 2])
def test_tma_tiles_match_eager(dtype, split):
    torch.manual_seed(split)
    model = Prefill().to(dtype)
    x = torch.randn(40, 72).to(dtype)  # 40 rows: large-M tiles (BM 32), two row blocks
    mk, _ = compile_and_check(
        model, [x], dtype, matmul_tma=True, matmul_tile=(32, 32, 16), split_k=split, num_workers=3, cache=False
    )
    assert "matmul_tile_tma(" in mk.source and mk._makes_descriptors
    assert len(tma_tiles(mk)) == 3
    for _ in range(2):  # fresh inputs: nothing stale
        x = torch.randn(40, 72).to(dtype)
        mk.poison()
        assert rel_err(mk(x), reference(model, (x,))) <= TOL[dtype]


def test_off_by_default_and_decode_tiles_keep_their_path():
    """Without the setting no tile makes descriptors; with it, decode-shaped tiles (BM 16: they
    wait themselves, ops/matmul.Matmul.early_wait) keep matmul_tile."""
    torch.manual_seed(0)
    model = Prefill()
    off = mkcompiler.compile(model, (torch.randn(40, 72),), matmul_tile=(32, 32, 16), cache=False)
    assert "matmul_tile_tma(" not in off.source and not off._makes_descriptors and not tma_tiles(off)
    decode = mkcompiler.compile(model, (torch.randn(1, 72),), matmul_tma=True, cache=False)
    assert not tma_tiles(decode) and "matmul_tile_tma(" not in decode.source


@pytest.mark.parametrize(
    "dtype,options",
    [(torch.float32, {}), (torch.bfloat16, {}), (torch.float32, FOLDED)],
    ids=["fp32", "bf16", "fp32-folded"],
)
def test_decode_weights_through_tma_match_eager(dtype, options):
    """Settings.decode_weights_tma: a small Llama's decode matvecs take their weight blocks
    through a descriptor (after the first block, asked for before the wait with pointer loads);
    also with split sums, A expressions and the in-attention combine. Two positions, random
    caches, poisoned intermediates, against float64 eager."""
    from tests.test_llama import caches, randomize_caches

    model = random_llama("tiny", dtype=dtype)
    randomize_caches(model)
    ref = copy.deepcopy(model).double()
    tok = torch.randint(0, model.c.vocab_size, (1, 1), generator=torch.Generator().manual_seed(4))
    # BK 16: every matvec takes several K steps (the first before the wait, the rest through TMA)
    opts = dict(options, matmul_tile=(16, 32, 16))
    mk = mkcompiler.compile(model, (tok, torch.tensor([3])), decode_weights_tma=True, cache=False, **opts)
    assert mk._makes_descriptors
    assert any(FAMILIES["matmul"].key(op)[8][-2] for op in mk.graph.ops if op.kind == "matmul")
    for p in (7, 8):
        mk.poison()
        out = mk(tok, torch.tensor([p]))
        want = ref(tok, torch.tensor([p]))
        assert rel_err(out, want) <= (1e-4 if dtype == torch.float32 else 3e-2), p
        tok = want[:, -1].argmax(-1, keepdim=True)
    for (_, c), (_, r) in zip(caches(model), caches(ref)):
        assert rel_err(c, r) <= (1e-5 if dtype == torch.float32 else 2e-2)
