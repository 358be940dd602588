"""Decode matmul tiling (passes/split_k.decode_tiling): matmuls reading the same activation are
one stage and are tiled together; checked on captured graphs (no kernel run: the tiles' results
are covered by the model tests)."""

import torch
from mkcompiler.ops.base import cdiv
from mkcompiler.passes.split_k import MAX_SPLITS, decode_tiling, split_k
from mkcompiler.passes.tile import choose_tiles

from mkcompiler.frontend.capture import capture
from mkcompiler.ir.settings import Settings


class Siblings(torch.nn.Module):
    """Q/K/V-like siblings (one input, N = 2048 / 512 / 512), then a wide gate/up pair."""

    def __init__(self, dim=256, wide=2048):
        super().__init__()
        self.q = torch.nn.Linear(dim, 2048, bias=False)
        self.k = torch.nn.Linear(dim, 512, bias=False)
        self.v = torch.nn.Linear(dim, 512, bias=False)
        self.gate = torch.nn.Linear(dim, wide, bias=False)
        self.up = torch.nn.Linear(dim, wide, bias=False)

    def forward(self, x, y):
        return self.q(x), self.k(x), self.v(x), self.gate(y) * self.up(y)


def tiled(model, inputs, workers, **options):
    settings = Settings().replace(**options).for_target()  # the passes' target: as Triton runs here
    graph = capture(model, inputs)
    plan = decode_tiling(graph, settings, workers)
    graph = choose_tiles(split_k(graph, settings, workers), settings, workers)
    return graph, plan


def test_siblings_share_one_split_count_and_fill_the_workers():
    model = Siblings(dim=2048).to(torch.bfloat16)
    x, y = torch.randn(1, 2048, dtype=torch.bfloat16), torch.randn(1, 2048, dtype=torch.bfloat16)
    graph, plan = tiled(model, (x, y), workers=132)
    mms = [op for op in graph.ops if op.kind == "matmul"]
    qkv, gate_up = mms[:3], mms[3:]
    assert len({plan[id(op)] for op in qkv}) == 1  # one decision for the group
    bn, s = plan[id(qkv[0])]
    tiles = sum(cdiv(op.outputs[0].shape[-1], op.attrs.tile[1]) * s for op in qkv)
    assert tiles <= 132 and tiles * 2 > 132, (bn, s, tiles)  # fills the workers, one wave
    assert 1 < s <= MAX_SPLITS
    assert len({plan[id(op)] for op in gate_up}) == 1


def test_wide_groups_take_bn_128_when_it_still_fills_the_workers():
    model = Siblings(dim=256, wide=8192).to(torch.bfloat16)
    x, y = torch.randn(1, 256, dtype=torch.bfloat16), torch.randn(1, 256, dtype=torch.bfloat16)
    graph, plan = tiled(model, (x, y), workers=120)
    gate, up = [op for op in graph.ops if op.kind == "matmul"][3:]
    assert plan[id(gate)] == (128, 1) and gate.attrs.tile[1] == 128  # 64 + 64 tiles >= 0.9 x 120
    graph, plan = tiled(model, (x, y), workers=200)
    gate = [op for op in graph.ops if op.kind == "matmul"][3]
    assert plan[id(gate)][0] is None and gate.attrs.tile[1] == 64  # 128 tiles would leave workers idle


def test_prefill_and_explicit_tiles_are_left_alone():
    model = Siblings(dim=256)
    x, y = torch.randn(64, 256), torch.randn(64, 256)
    graph, plan = tiled(model, (x, y), workers=132)
    assert all(bn is None for bn, _ in plan.values())
    graph, plan = tiled(model, (x[:1], y[:1]), workers=132, matmul_tile=(16, 32, 32))
    assert all(op.attrs.tile == (16, 32, 32) for op in graph.ops if op.kind == "matmul")
