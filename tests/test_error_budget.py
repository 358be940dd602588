"""benchmarks/error_budget.py's emulated decode step: with no rounding it is the fp32 model, with
every bf16 rounding it is as far from fp32 as eager bf16 is (what its per-op table rests on)."""

import copy

import torch

from benchmarks.decode_latency import rel
from benchmarks.error_budget import ROUNDINGS, build, emulate, fp32_weights, parse_args


def test_emulated_step_brackets_eager():
    args = parse_args(["--model", "tiny", "--layers", "2", "--vocab", "256", "--batch", "2", "--ctx", "16"])
    model = build(args)
    tok, pos = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(0)), torch.tensor([16])
    model32 = copy.deepcopy(model).float()
    with torch.no_grad():
        ref32, eager = model32(tok, pos), model(tok, pos).float()
    weights = fp32_weights(model)
    assert rel(emulate(model, weights, tok, 16, ())[0], ref32) < 1e-5
    # Independent roundings: the same size of error as eager's, not the same error.
    ours, theirs = rel(emulate(model, weights, tok, 16, ROUNDINGS)[0], ref32), rel(eager, ref32)
    assert theirs / 3 < ours < theirs * 3, (ours, theirs)
