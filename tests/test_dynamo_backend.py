"""torch.compile(model, backend="mkcompiler") (mkcompiler/dynamo.py): each graph dynamo captures
runs as megakernels. Every test compares with eager on fresh random inputs: a graph break, an
unsupported op (eager inside the graph), a KV-cache buffer written in place (the module's own
tensor, same address), new shapes (recompiles, and the cap on them), options, the compile cache,
registration (entry point and `import mkcompiler`), and Hugging Face generate() with a static
cache (eager's greedy tokens).
"""

import importlib.metadata
import os
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import new_graphs, rel_err, runners
from torch import nn

import mkcompiler
from mkcompiler import dynamo
from mkcompiler.runtime.fallback import FallbackWarning, SegmentedModel
from mkcompiler.runtime.megakernel import Megakernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, H, SLOTS = 16, 32, 8


@pytest.fixture(autouse=True)
def _fresh(on_device):
    """Seeded, on the device kernels run on; dynamo forgets earlier tests' graphs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Cached(nn.Module):
    """Linear, a KV-cache-like buffer written in place at `pos`, and a read of the whole buffer."""

    def __init__(self, break_graph=False, unsupported=False):
        super().__init__()
        self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)
        self.register_buffer("cache", torch.zeros(SLOTS, H))
        self.break_graph, self.unsupported = break_graph, unsupported

    def forward(self, x, pos):
        h = torch.relu(self.up(x))
        self.cache.index_copy_(0, pos, h[:1])
        if self.break_graph:
            print(end="")  # dynamo splits the graph here
        if self.unsupported:
            h = torch.cumsum(h, dim=-1)  # mkcompiler has no cumsum: eager between megakernel segments
        return self.down(h) + self.cache.sum(-1).sum(-1, keepdim=True)  # reads the slot just written


def _pair(**kw):
    model = Cached(**kw).eval()
    ref = Cached(**kw).eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


def _check_step(compiled, model, ref, rows, pos):
    x = torch.randn(rows, D)
    pos = torch.tensor([pos])
    with torch.no_grad():
        got, want = compiled(x, pos), ref(x, pos)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-4, rel_err(got, want)
    assert rel_err(model.cache, ref.cache) <= 1e-5, "the module's cache buffer differs from eager's"


def test_kv_cache_buffer_is_written_in_place():
    model, ref = _pair()
    cache, weight = model.cache.data_ptr(), model.up.weight.data_ptr()
    before = dynamo.compiled_graphs()
    compiled = torch.compile(model, backend="mkcompiler")
    for step in range(3):
        _check_step(compiled, model, ref, 4, step)
    assert model.cache.data_ptr() == cache and model.up.weight.data_ptr() == weight
    assert model.cache[:3].abs().sum() > 0  # written by the megakernel (eager's equal, above)
    (mk,) = runners(new_graphs(before))
    assert isinstance(mk, Megakernel), "the cache write runs inside the megakernel"
    # The megakernel reads and writes the module's own tensors (bound in place, never copied).
    addresses = {t.data_ptr() for t in mk.graph.params.values()}
    assert cache in addresses and weight in addresses


def _append(x, cache, pos):
    """A cache given as an argument and written in place (as Hugging Face's StaticCache is)."""
    cache.index_copy_(0, pos, torch.tanh(x))
    return cache.sum(-1, keepdim=True) * 2.0


def test_cache_argument_written_in_place_and_bound_again_when_it_moves():
    compiled = torch.compile(_append, backend="mkcompiler")
    before = dynamo.compiled_graphs()
    for _ in range(2):  # the second cache is a new tensor: the megakernel is bound to it
        cache, ref = torch.zeros(SLOTS, D), torch.zeros(SLOTS, D)
        address = cache.data_ptr()
        for step in range(3):
            x, pos = torch.randn(1, D), torch.tensor([step])
            got, want = compiled(x, cache, pos), _append(x, ref, pos)
            assert rel_err(got, want) <= 1e-5 and rel_err(cache, ref) <= 1e-5
        assert cache.data_ptr() == address and cache[:3].abs().sum() > 0
        (mk,) = runners(new_graphs(before))
        assert isinstance(mk, Megakernel) and address in {t.data_ptr() for t in mk.graph.params.values()}


def test_graph_break_gives_two_megakernels():
    model, ref = _pair(break_graph=True)
    before = dynamo.compiled_graphs()
    compiled = torch.compile(model, backend="mkcompiler")
    for step in range(2):
        _check_step(compiled, model, ref, 4, step)
    graphs = new_graphs(before)
    assert len(graphs) == 2 and all(isinstance(r, Megakernel) for r in runners(graphs))


def test_unsupported_op_runs_eagerly_inside_the_graph():
    model, ref = _pair(unsupported=True)
    before = dynamo.compiled_graphs()
    compiled = torch.compile(model, backend="mkcompiler")
    with pytest.warns(FallbackWarning, match="cumsum"):
        _check_step(compiled, model, ref, 4, 0)
    _check_step(compiled, model, ref, 4, 1)
    (seg,) = runners(new_graphs(before))
    assert isinstance(seg, SegmentedModel) and seg.megakernels
    assert [op for op, _, _ in seg.fallen_back] == ["aten.cumsum.default"]
    with pytest.raises(mkcompiler.UnsupportedOpError, match="cumsum"):  # the default of mkcompiler.compile
        torch._dynamo.reset()
        torch.compile(model, backend="mkcompiler", options={"fallback": "error"})(torch.randn(4, D), torch.tensor([0]))


def test_new_shapes_recompile():
    model, ref = _pair()
    before = dynamo.compiled_graphs()
    compiled = torch.compile(model, backend="mkcompiler")
    for step, rows in enumerate((4, 4, 6, 2, 6)):
        _check_step(compiled, model, ref, rows, step)
    graphs = new_graphs(before)
    # Dynamo: a static graph for 4 rows, then one with a symbolic row count, compiled for 6 and 2 rows.
    assert sorted(len(g.compiled) for g in graphs) == [1, 2]
    assert all(isinstance(r, Megakernel) for r in runners(graphs))


def test_recompile_limit_warns_and_runs_eagerly():
    model, ref = _pair()
    before = dynamo.compiled_graphs()
    compiled = torch.compile(model, backend="mkcompiler", dynamic=True)
    with torch._dynamo.config.patch(recompile_limit=2):
        for step, rows in enumerate((2, 3)):
            _check_step(compiled, model, ref, rows, step)
        with pytest.warns(dynamo.RecompileLimitWarning, match="recompile_limit"):
            _check_step(compiled, model, ref, 5, 2)  # eager: still eager's result
        _check_step(compiled, model, ref, 6, 3)
    (graph,) = new_graphs(before)
    assert len(graph.compiled) == 2


def test_options_pass_through_and_are_checked():
    model, ref = _pair()
    before = dynamo.compiled_graphs()
    compiled = torch.compile(model, backend="mkcompiler", options={"num_workers": 3, "row_block": 2})
    _check_step(compiled, model, ref, 4, 0)
    (mk,) = runners(new_graphs(before))
    assert mk.num_workers == 3 and mk.settings.row_block == 2
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown mkcompiler options"):
        torch.compile(model, backend="mkcompiler", options={"num_wrokers": 3})(torch.randn(4, D), torch.tensor([0]))


def test_compile_cache_serves_a_second_compile():
    """A fresh dynamo (as in a new process) compiles the same graph: the compile cache skips
    capture and the passes, and the megakernel is bound to this model's tensors."""
    model, ref = _pair()
    torch.compile(model, backend="mkcompiler")(torch.randn(4, D), torch.tensor([0]))
    torch._dynamo.reset()
    model, ref = _pair()  # other weights: the cache holds none
    before = dynamo.compiled_graphs()
    _check_step(torch.compile(model, backend="mkcompiler"), model, ref, 4, 1)
    (mk,) = runners(new_graphs(before))
    assert mk.compilation.cache in ("hit", "graph hit")


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_mkcompiler_registers_the_backend_lazily():
    out = _run(
        "import sys, mkcompiler\n"
        "print('torch._dynamo' in sys.modules)\n"
        "from torch._dynamo.backends import registry\n"  # the entry point is not loaded by this
        "print(registry._COMPILER_FNS.get('mkcompiler') is mkcompiler.dynamo.backend)\n"
    )
    assert out.split() == ["False", "True"], out


def test_entry_point_names_the_backend_without_importing_mkcompiler():
    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")]
    if "mkcompiler" not in names:
        pytest.skip("the package metadata has no entry point yet: run `pip install -e .`")
    out = _run(
        "import sys, torch\n"
        "print('mkcompiler' in torch._dynamo.list_backends(), 'mkcompiler' in sys.modules)\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "import mkcompiler.dynamo\n"
        "print(lookup_backend('mkcompiler') is mkcompiler.dynamo.backend)\n"
    )
    assert out.split() == ["True", "False", "True"], out


# ---- Hugging Face generate() ----

HF_OPTIONS = dict(matmul_tile=(16, 128, 64), elementwise_block=1024, row_block=8)  # few instructions per step


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hf_generate_static_cache_gives_eager_tokens(family, device):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    from mkcompiler.frontend.hf import random_model

    model = random_model(family, seed=1, device=device)
    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = True  # README: not inductor on a GPU
    prompts = [torch.randint(0, 128, (1, 5), device=device) for _ in range(2)]
    with torch.no_grad():
        want = [model.generate(p, max_new_tokens=8, do_sample=False) for p in prompts]
    before = dynamo.compiled_graphs()
    model.forward = torch.compile(model.forward, backend="mkcompiler", options=HF_OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # every op of prefill and decode in megakernels
        # The second generate() makes a new cache: the megakernels are bound to it (a compile cache hit).
        got = [model.generate(p, max_new_tokens=8, do_sample=False) for p in prompts]
    for g, w in zip(got, want):
        assert torch.equal(g, w), f"{g.tolist()} != eager {w.tolist()}"
    graphs = new_graphs(before)
    assert len(graphs) == 2  # prefill and decode
    assert all(isinstance(r, Megakernel) for r in runners(graphs))
