"""Dumps: with dump_dir set, every pass writes its output there and the kernel is written as a
standalone file (the same source the Megakernel runs)."""

import torch
from mkcompiler.passes.pipeline import PIPELINE

import mkcompiler
from tests.models import ResidualMLP


def test_every_pass_and_the_kernel_are_dumped(tmp_path):
    torch.manual_seed(0)
    model = ResidualMLP(dim=32, hidden=64)
    x = torch.randn(4, 32)
    mk = mkcompiler.compile(model, (x,), dump_dir=str(tmp_path))
    names = sorted(p.name for p in tmp_path.iterdir())
    for index, (name, _, _) in enumerate(PIPELINE):
        dumped = tmp_path / f"{index:02d}_{name}.txt"
        assert dumped.exists(), (name, names)
    assert "instructions" in (tmp_path / f"{len(PIPELINE) - 1:02d}_encode.txt").read_text()
    assert (tmp_path / "megakernel.py").read_text() == mk.source
