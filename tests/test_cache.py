"""The on-disk compile cache (mkcompiler/tools/cache.py): hits give the same queue and outputs, weights
are re-bound from the live model, anything that changes the graph misses, corrupt entries are
recompiled, cache=False bypasses it; and the progress line."""

import io
import os

import numpy as np
import pytest
import torch
from models import ResidualMLP

import mkcompiler
from mkcompiler.tools import cache
from mkcompiler.tools.progress import Progress


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty cache directory of its own, and fresh hit/miss counters."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MKCOMPILER_CACHE", str(root))
    cache.stats.clear()
    return root / "compile"


def entries(root) -> list[str]:
    return sorted(p.name.split("-")[0] for p in root.iterdir()) if root.exists() else []


def same_queue(a, b) -> None:
    for field in ("rows", "waits", "views", "worker_begin", "worker_order"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.opcode_keys == b.opcode_keys and a.opcode_names == b.opcode_names and a.descs == b.descs
    assert a.num_counters == b.num_counters


def same_dag(a, b) -> None:
    """Same tasks, counters, edges and adjacency order (what networkx iterates)."""
    assert a.tasks == b.tasks and a.counter_sizes == b.counter_sizes
    assert list(a.graph.nodes) == list(b.graph.nodes)
    for n in a.graph.nodes:
        assert list(a.graph.pred[n]) == list(b.graph.pred[n]) and list(a.graph.succ[n]) == list(b.graph.succ[n])


def mlp(seed: int = 0, **sizes) -> ResidualMLP:
    torch.manual_seed(seed)
    return ResidualMLP(**sizes)


X = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))


def test_second_compile_hits_with_the_same_queue_and_outputs(cache_dir):
    model = mlp()
    first = mkcompiler.compile(model, (X,))
    assert first.compilation.cache == "miss" and entries(cache_dir) == ["graph", "model"]
    second = mkcompiler.compile(model, (X,))
    assert second.compilation.cache == "hit" and cache.stats["hit"] == 1
    assert "cache_load" in second.timings and "build_dag" not in second.timings
    same_queue(first.queue, second.queue)
    same_dag(first.dag, second.dag)
    assert first.compilation.schedule == second.compilation.schedule
    assert first.source == second.source
    assert torch.equal(first(X), second(X))
    torch.testing.assert_close(second(X), model(X), rtol=1e-4, atol=1e-5)


def test_new_weight_values_hit_and_are_used(cache_dir):
    mkcompiler.compile(mlp(seed=0), (X,))
    other = mlp(seed=1)  # same shapes, other values
    mk = mkcompiler.compile(other, (X,))
    assert mk.compilation.cache == "hit"
    torch.testing.assert_close(mk(X), other(X), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # parameters are still read in place
        other.fc3.weight.mul_(-2.0)
    torch.testing.assert_close(mk(X), other(X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "change",
    [
        lambda: (mlp(), (torch.randn(8, 32),), {}),  # input shape
        lambda: (mlp(), (X,), {"row_block": 2}),  # a setting
        lambda: (mlp(), (X,), {"num_workers": 3}),
        lambda: (mlp(hidden=40), (X,), {}),  # a weight's shape
        lambda: (mlp().bfloat16(), (X.bfloat16(),), {}),  # dtypes
    ],
    ids=["input shape", "setting", "workers", "weight shape", "dtypes"],
)
def test_changes_that_change_the_graph_miss(cache_dir, change):
    mkcompiler.compile(mlp(), (X,))
    model, inputs, options = change()
    mk = mkcompiler.compile(model, inputs, **options)
    assert mk.compilation.cache == "miss"
    tol = 3e-2 if inputs[0].dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(mk(*inputs), model(*inputs), rtol=tol, atol=tol)


class Scaled(torch.nn.Module):
    """forward reads a float attribute and a module global: both change the graph."""

    def __init__(self, scale: float):
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)
        self.scale = scale

    def forward(self, x):
        y = self.fc(x) * self.scale
        return torch.relu(y) if ACTIVATION == "relu" else torch.sigmoid(y)


ACTIVATION = "relu"


def test_attributes_and_globals_forward_reads_are_part_of_the_key(cache_dir, monkeypatch):
    torch.manual_seed(0)
    model = Scaled(2.0)
    mkcompiler.compile(model, (X,))
    model.scale = 3.0
    mk = mkcompiler.compile(model, (X,))
    assert mk.compilation.cache == "miss"
    torch.testing.assert_close(mk(X), model(X), rtol=1e-4, atol=1e-5)
    monkeypatch.setitem(globals(), "ACTIVATION", "sigmoid")
    mk = mkcompiler.compile(model, (X,))
    assert mk.compilation.cache == "miss"
    torch.testing.assert_close(mk(X), model(X), rtol=1e-4, atol=1e-5)


def test_corrupt_entries_are_recompiled(cache_dir):
    model = mlp()
    good = mkcompiler.compile(model, (X,))
    files = sorted(cache_dir.iterdir())
    graph_file = next(p for p in files if p.name.startswith("graph"))
    data = bytearray(graph_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the pickled queue
    graph_file.write_bytes(bytes(data))
    mk = mkcompiler.compile(model, (X,))
    assert mk.compilation.cache == "miss" and cache.stats["corrupt"] >= 1
    same_queue(good.queue, mk.queue)
    for p in cache_dir.iterdir():  # truncated and garbage files: the same
        p.write_bytes(b"garbage" if p.name.startswith("model") else p.read_bytes()[:100])
    mk = mkcompiler.compile(model, (X,))
    assert mk.compilation.cache == "miss"
    torch.testing.assert_close(mk(X), model(X), rtol=1e-4, atol=1e-5)
    assert mkcompiler.compile(model, (X,)).compilation.cache == "hit"  # rewritten


def test_graph_key_hit_when_the_model_key_is_gone(cache_dir):
    model = mlp()
    first = mkcompiler.compile(model, (X,))
    for p in cache_dir.glob("model-*"):
        p.unlink()
    mk = mkcompiler.compile(model, (X,))
    assert mk.compilation.cache == "graph hit" and "capture" in mk.timings and "build_dag" not in mk.timings
    same_queue(first.queue, mk.queue)
    torch.testing.assert_close(mk(X), model(X), rtol=1e-4, atol=1e-5)
    assert mkcompiler.compile(model, (X,)).compilation.cache == "hit"  # the model key was linked again


def test_cache_false_bypasses(cache_dir):
    model = mlp()
    mk = mkcompiler.compile(model, (X,), cache=False)
    assert mk.compilation.cache == "off" and entries(cache_dir) == []
    mkcompiler.compile(model, (X,))
    assert mkcompiler.compile(model, (X,), cache=False).compilation.cache == "off"
    assert sum(cache.stats[k] for k in ("hit", "graph hit")) == 0


def test_unchecked_entries_are_not_used_with_debug_checks(cache_dir):
    model = mlp()
    mkcompiler.compile(model, (X,), debug=0)
    assert mkcompiler.compile(model, (X,), debug=1).compilation.cache == "miss"  # runs the checked passes
    assert mkcompiler.compile(model, (X,), debug=0).compilation.cache == "hit"


def test_llama_decode_hits_and_updates_its_kv_cache(cache_dir):
    from examples.llama import random_llama

    model = random_llama("tiny")
    tok, pos = torch.tensor([[3]]), torch.tensor([5])
    first = mkcompiler.compile(model, (tok, pos), num_workers=8)
    ref_model = random_llama("tiny")  # same seed: same weights
    mk = mkcompiler.compile(model, (tok, pos), num_workers=8)
    assert mk.compilation.cache == "hit"
    same_queue(first.queue, mk.queue)
    out = mk(tok, pos)
    ref = ref_model(tok, pos)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    k = model.layers[0].attn.k_cache  # written in place by the cached megakernel
    torch.testing.assert_close(k, ref_model.layers[0].attn.k_cache, rtol=1e-3, atol=1e-4)
    assert k[0, :, 5].abs().sum() > 0


# ---- progress ----


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_on_a_terminal_only():
    tty = Terminal()
    p = Progress(True, stream=tty, delay=0.0, interval=0.01)
    p.step("build_dag")
    p.close("compiled")
    text = tty.getvalue()
    assert "mkcompiler: build_dag ... " in text and text.rstrip().split("\r\x1b[K")[-1].startswith(
        "mkcompiler: compiled in"
    )
    quiet = Terminal()
    p = Progress(True, stream=quiet)  # a compile shorter than the delay: nothing
    p.step("capture")
    p.close()
    assert quiet.getvalue() == ""
    pipe = io.StringIO()  # not a terminal
    p = Progress(True, stream=pipe, delay=0.0)
    p.step("capture")
    p.close()
    assert pipe.getvalue() == ""
    off = Terminal()
    p = Progress(False, stream=off, delay=0.0)
    p.step("capture")
    p.close()
    assert off.getvalue() == ""


def test_progress_setting_is_not_part_of_the_key(cache_dir):
    model = mlp()
    mkcompiler.compile(model, (X,), progress=False)
    assert mkcompiler.compile(model, (X,)).compilation.cache == "hit"
    assert os.environ["MKCOMPILER_CACHE"].endswith("cache")
