"""The host work of a torch.compile(backend="mkcompiler") call (issue 20, part 2). A decode step
of Hugging Face's generate() hands dynamo's graph ~200 bound tensors (weights, KV caches); the
step's time beside the megakernel's own is examples/hf_generate.py's acceptance figure. Here,
with the kernel stubbed (tests/test_call_overhead.py's RecordingKernel: only host work runs), the
work of a call is pinned by counting, never timing: one launch, no tensor op but the
megakernel's error read and output copy, no compile once bound, and a number of Python calls that
does not grow with the number of bound tensors. Safety stays: a bound tensor whose memory moved
is bound again, a wrong input is refused. Every result is compared with eager."""

import sys
from pathlib import Path

import pytest
import torch
from helpers import new_graphs, rel_err
from test_call_overhead import ERROR_READ, OUTPUT_COPY, RecordingKernel
from torch import nn
from torch.profiler import ProfilerActivity, profile

import mkcompiler
from mkcompiler import dynamo
from mkcompiler.runtime.megakernel import Megakernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is not an installed package

D, SLOTS = 16, 8
HF_OPTIONS = dict(matmul_tile=(16, 128, 64), elementwise_block=1024, row_block=8)  # few instructions per step


@pytest.fixture(autouse=True)
def _fresh(on_device):
    """Seeded, on the device kernels run on; dynamo forgets earlier tests' graphs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Stack(nn.Module):
    """`layers` linears (two bound tensors each) and a cache buffer written in place at `pos`."""

    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(layers))
        self.register_buffer("cache", torch.zeros(SLOTS, D))

    def forward(self, x, pos):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        self.cache.index_copy_(0, pos, x)
        return x + self.cache.sum(-1).sum(-1, keepdim=True)  # reads the slot just written


def graph_call(fn, *inputs) -> tuple[dynamo.CompiledGraph, tuple]:
    """fn(*inputs), which runs one dynamo graph: that CompiledGraph and the arguments dynamo gave it."""
    calls = []
    original = dynamo.CompiledGraph.__call__

    def spy(self, *args):
        calls.append((self, args))
        return original(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynamo.CompiledGraph, "__call__", spy)
        fn(*inputs)
    (call,) = calls
    return call


def stubbed(graph: dynamo.CompiledGraph) -> Megakernel:
    """The graph's one megakernel, its kernel replaced by a recorder (the launch computes nothing)."""
    (mk,) = graph.compiled.values()
    assert isinstance(mk, Megakernel)
    mk._kernel = RecordingKernel()
    return mk


def python_calls(fn, *args) -> int:
    """How many Python functions and builtins fn(*args) calls (sys.setprofile's events): work done per
    tensor in Python shows here; a C loop over the tensors (map, itemgetter) is one call."""
    count = 0

    def hook(frame, event, arg):
        nonlocal count
        count += event in ("call", "c_call")

    sys.setprofile(hook)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return count


def compiled_stack(layers: int):
    model, ref = Stack(layers).eval(), Stack(layers).eval()
    ref.load_state_dict(model.state_dict())
    return model, ref, torch.compile(model, backend="mkcompiler")


def check_step(compiled, model, ref, pos: int):
    x, p = torch.randn(1, D), torch.tensor([pos])
    with torch.no_grad():
        got, want = compiled(x, p), ref(x, p)
    assert rel_err(got, want) <= 1e-4 and rel_err(model.cache, ref.cache) <= 1e-5


def test_python_calls_of_a_call_do_not_grow_with_the_bound_tensors():
    """Stacks of 2 and 12 linears (6 and 26 bound tensors): a call of each graph, kernel stubbed,
    makes the same number of Python calls, and as many as the megakernel's own call plus a few.
    Before, the address check called data_ptr() from Python once per bound tensor."""
    counts = {}
    for layers in (2, 12):
        model, ref, compiled = compiled_stack(layers)
        check_step(compiled, model, ref, 0)
        graph, args = graph_call(compiled, torch.randn(1, D), torch.tensor([1]))
        assert len(graph._bound) == 2 * layers + 1  # weights, biases, the cache
        mk = stubbed(graph)
        _, inputs = graph.last_call
        graph(*args), mk(*inputs)  # the first launches upload addresses: not the steady state
        counts[layers] = (python_calls(graph, *args), python_calls(mk, *inputs))
    assert counts[2] == counts[12], counts
    whole, megakernel = counts[2]
    assert whole - megakernel <= 12, counts


def test_a_parameter_whose_memory_moved_is_bound_again():
    """`.data` replaced: the same Parameter object, its memory elsewhere (dynamo's guards pass).
    The address check sees it and binds the megakernel to the new memory: eager's result."""
    start = dynamo.compiled_graphs()  # other tests' graphs may still be alive
    model, ref, compiled = compiled_stack(2)
    check_step(compiled, model, ref, 0)
    (graph,) = new_graphs(start)
    before = dynamo.compiled_graphs()
    for m in (model, ref):
        m.layers[1].weight.data = torch.randn(D, D, generator=torch.Generator().manual_seed(1)).to(m.cache.device)
    check_step(compiled, model, ref, 1)
    assert not new_graphs(before), "dynamo did not recompile: the backend bound the new memory itself"
    (mk,) = graph.compiled.values()
    assert model.layers[1].weight.data_ptr() in {t.data_ptr() for t in mk.graph.params.values()}


def test_a_wrong_input_is_refused():
    """The graph called with an input of another dtype (dynamo's guards would recompile first):
    the megakernel's checks refuse it, naming the dtypes."""
    model, ref, compiled = compiled_stack(2)
    check_step(compiled, model, ref, 0)
    graph, args = graph_call(compiled, torch.randn(1, D), torch.tensor([1]))
    args = list(args)
    i = graph.roles.index(dynamo.Role.INPUT)
    args[i] = args[i].double() if args[i].is_floating_point() else args[i].int()
    with pytest.raises(mkcompiler.InputError, match="dtype"):
        graph(*args)


# ---- Hugging Face generate() ----


@pytest.fixture
def hf_llama(device):
    """A tiny random Llama whose compiled generate() gave eager's tokens, the decode graph's
    megakernel stubbed, and the last decode step's forward (call it to run that step again)."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    from examples.hf_generate import generate
    from mkcompiler.frontend.hf import random_model

    model = random_model("llama", seed=1, device=device)
    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = True  # README: not inductor on a GPU
    prompt = torch.randint(0, 128, (1, 5), device=device)
    with torch.no_grad():
        want, _, _ = generate(model, prompt, 6, device)
    model.forward = torch.compile(model.forward, backend="mkcompiler", options=HF_OPTIONS)
    got, _, forward = generate(model, prompt, 6, device)
    assert torch.equal(got, want), f"{got.tolist()} != eager {want.tolist()}"
    args, kwargs = forward.last

    def step():
        with torch.no_grad():
            return forward.forward(*args, **kwargs)

    for g in dynamo.compiled_graphs():
        g.last_call = None
    step()
    (graph,) = [g for g in dynamo.compiled_graphs() if g.last_call is not None]
    return model, graph, stubbed(graph), step


def test_an_hf_decode_step_is_one_launch_and_copies_no_bound_tensor(hf_llama, monkeypatch):
    """The whole compiled forward of a decode step (dynamo's code, the graph, the megakernel):
    one launch, and no tensor op but the megakernel's error read and output copy: no copy or
    move of a weight or the cache, no compile (the megakernel stays bound to them)."""
    model, graph, mk, step = hf_llama
    step()  # the first stubbed launch uploads the inputs' addresses: not the steady state
    monkeypatch.setattr(dynamo, "mk_compile", lambda *a, **k: pytest.fail("compiled again"))
    launches = len(mk._kernel.launches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    assert [e.name for e in prof.events() if e.name.startswith("aten::")] == ERROR_READ + OUTPUT_COPY
    assert len(mk._kernel.launches) == launches + 1
    assert len(graph._bound) > len(list(model.parameters()))  # the weights and the cache's tensors
    bound = {t.data_ptr() for t in mk.graph.params.values()}
    assert {p.data_ptr() for p in model.parameters()} <= bound
