"""Graphs that write tensors in place under torch.compile(backend="mkcompiler") (issue 20).

1. Which graph inputs a graph writes (mkcompiler/dynamo.py): a cache passed as an argument and
   written through a view (`cache[:, :, pos] = k`, `index_copy_`, a write into `cache[0]`), with
   and without mark_static_address, is bound and written in place, as eager writes it. An input
   the backend gives as a copy (another device, or strided) that an aliasing op (`.to`,
   `.contiguous`) then writes is not an input write: Hugging Face's StaticLayer copies its CPU
   `cumulative_length` to the GPU and adds to the copy in place, which the export saw as a
   write of the (moved) input and refused (USER_INPUT_MUTATION). Here the strided case is the
   CPU's stand-in for the device move (tests marked gpu run the move itself).
2. fallback="eager" (mkcompiler/runtime/fallback.py): views traced on strides that segments do
   not see (a megakernel segment's contiguous inputs; a kernel whose real output is laid out
   otherwise than its fake one) run as reshapes, unless something writes through them.
Every test compares outputs (and the written tensors) with eager on random inputs.
"""

import warnings

import pytest
import torch
import torch.fx as fx
from helpers import new_graphs, rel_err, runners
from torch import nn

import mkcompiler
from mkcompiler import dynamo
from mkcompiler.runtime.fallback import FallbackWarning, SegmentedModel, _relax_views
from mkcompiler.runtime.megakernel import Megakernel

HEADS, SLOTS, D = 2, 8, 16
aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _fresh():
    """Seeded; dynamo forgets earlier tests' graphs. No default device: tests choose theirs, so a
    tensor made without one lands on the CPU, as in transformers' StaticLayer."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- 1. a cache argument written through a view ----


def _setitem(cache, pos, k):
    cache[:, :, pos] = k  # index_put_ on the cache


def _index_copy(cache, pos, k):
    cache.index_copy_(2, pos, k)


def _through_a_view(cache, pos, k):
    cache[0].index_copy_(1, pos, k[0])  # written through a view of the cache, not the cache itself


class Attend(nn.Module):
    """Projects a key, writes it into the cache at `pos` (spelled `write`), reads the whole cache."""

    def __init__(self, write):
        super().__init__()
        self.proj = nn.Linear(D, HEADS * D)
        self.write = write

    def forward(self, x, cache, pos):
        k = torch.tanh(self.proj(x)).view(1, HEADS, 1, D)
        self.write(cache, pos, k)
        return (cache * k).sum(-1) * 0.5


@pytest.mark.parametrize("static", [False, True], ids=["plain", "static_address"])
@pytest.mark.parametrize("write", [_setitem, _index_copy, _through_a_view], ids=lambda f: f.__name__.strip("_"))
def test_cache_argument_written_through_a_view_matches_eager(write, static):
    model = Attend(write).eval()
    cache, ref = torch.zeros(1, HEADS, SLOTS, D), torch.zeros(1, HEADS, SLOTS, D)
    if static:
        torch._dynamo.mark_static_address(cache)
    address = cache.data_ptr()
    before = dynamo.compiled_graphs()
    compiled = torch.compile(model, backend="mkcompiler", options={"fallback": "error"})
    with torch.no_grad():
        for step in range(3):
            x, pos = torch.randn(1, D), torch.tensor([step])
            got, want = compiled(x, cache, pos), model(x, ref, pos)
            assert rel_err(got, want) <= 1e-5, rel_err(got, want)
            assert rel_err(cache, ref) <= 1e-6, "the cache differs from eager's"
    assert cache.data_ptr() == address and cache[:, :, :3].abs().sum() > 0
    (graph,) = new_graphs(before)
    placeholders = [n.name for n in graph.graph_module.graph.nodes if n.op == "placeholder"]
    roles = dict(zip(placeholders, graph.roles))
    assert roles["l_cache_"] is dynamo.Role.BOUND and roles["l_x_"] is dynamo.Role.INPUT
    (mk,) = graph.compiled.values()
    assert isinstance(mk, Megakernel) and address in {t.data_ptr() for t in mk.graph.params.values()}


def _writes_in_every_spelling(a, b, c, d, e, f, g, h, i):
    a.add_(1.0)
    b[1:].mul_(2.0)  # a slice
    c.view(-1)[0] = 3.0  # setitem on a view
    d += 1.0  # operator.iadd
    torch.relu_(e)
    f.t().copy_(g)  # g is read only
    h.clone().add_(1.0)  # a copy is written, not h
    torch.add(a, 1.0, out=i)
    return a + b + c + d + e + f + g + h


def _dynamo_graph(fn, *args) -> fx.GraphModule:
    seen = []

    def record(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    torch.compile(fn, backend=record)(*args)
    (gm,) = seen
    return gm


def test_written_placeholders_are_read_off_the_graph():
    gm = _dynamo_graph(_writes_in_every_spelling, *(torch.randn(3, 3) for _ in range(9)))
    written = {p.name for p in dynamo._written_placeholders(gm)}
    assert written == {f"l_{x}_" for x in "abcdefi"}, written
    # Where dynamo recorded no fake values, a written tensor's sources count as written (never fewer).
    for n in gm.graph.nodes:
        n.meta.pop("example_value", None)
    assert {p.name for p in dynamo._written_placeholders(gm)} >= written


class CopiedThenWritten(nn.Module):
    """Writes `counter.contiguous()`, a copy of a strided counter in dynamo's trace, and returns
    it; `counter` itself is never written (Hugging Face's StaticLayer spells this
    `cumulative_length.to(device).add_(n)` on a CPU counter of a GPU model)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x, counter):
        c = counter.contiguous()
        c.add_(float(x.shape[0]))
        return self.proj(x) + c, c


def test_input_copied_for_the_megakernel_and_written_after_an_alias_is_not_written():
    model = CopiedThenWritten().eval()
    base = torch.randn(D, 3)
    counter = base.t()  # strided: the backend gives the megakernel a contiguous copy
    kept = base.clone()
    before = dynamo.compiled_graphs()
    compiled = torch.compile(model, backend="mkcompiler", options={"fallback": "error"})
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(3, D)
            got, want = compiled(x, counter), model(x, counter.clone())
            for g, w in zip(got, want):
                assert rel_err(g, w) <= 1e-5, rel_err(g, w)
            assert torch.equal(base, kept), "the graph wrote its input (eager does not)"
    (graph,) = new_graphs(before)
    (private,) = graph._private  # the counter, read through a clone
    assert graph.roles[private] is dynamo.Role.INPUT
    assert all(isinstance(r, Megakernel) for r in graph.compiled.values())


@pytest.mark.gpu
def test_cpu_counter_moved_to_the_gpu_and_written_there_is_not_written():
    """The device move itself (on CUDA): the graph's `.to("cuda")` copies the CPU counter."""

    class Moved(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(D, D)

        def forward(self, x, counter):
            c = counter.to(x.device)
            c.add_(float(x.shape[0]))
            return self.proj(x) + c, c

    model = Moved().eval().cuda()
    counter = torch.tensor(2.0)  # on the CPU
    compiled = torch.compile(model, backend="mkcompiler", options={"fallback": "error"})
    with torch.no_grad():
        x = torch.randn(3, D, device="cuda")
        got, want = compiled(x, counter), model(x, counter.clone())
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5
    assert counter.item() == 2.0


@pytest.mark.gpu
def test_hf_generate_with_a_lazily_made_static_cache_gives_eager_tokens_on_the_gpu():
    """transformers' StaticLayer makes its `cumulative_length` on the CPU and moves it to the GPU in
    the prefill graph (no default device here, unlike tests/test_dynamo_backend.py's GPU runs)."""
    pytest.importorskip("transformers")
    from mkcompiler.frontend.hf import random_model

    model = random_model("llama", seed=1, device="cuda")
    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = True  # README: not inductor on a GPU
    prompt = torch.randint(0, 128, (1, 5), device="cuda")
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=8, do_sample=False)
    before = dynamo.compiled_graphs()
    model.forward = torch.compile(model.forward, backend="mkcompiler")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        got = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want), f"{got.tolist()} != eager {want.tolist()}"
    assert all(isinstance(r, Megakernel) for r in runners(new_graphs(before)))
    # The prefill and the decode step both ran through our graphs (transformers' own compile of
    # the step, which disable_compile turns off, would have run inductor in their place).
    assert sum(g.last_call is not None for g in new_graphs(before)) >= 2


# ---- 2. fallback="eager": views traced on other strides ----

B, S = 1, 4


@torch.library.custom_op("mkcompiler_tests::heads_twice", mutates_args=())
def heads_twice(q: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> 2 q, contiguous: the real kernel's layout."""
    return (q * 2.0).contiguous()


@heads_twice.register_fake
def _(q):
    # The fake's layout is (B, S, H, D) in memory (as CUDA attention's meta function lays out its
    # output): transposed back, it is contiguous, and export turns the reshape after it into a view.
    b, h, s, d = q.shape
    return q.new_empty(b, s, h, d).transpose(1, 2)


@torch.library.custom_op("mkcompiler_tests::rows_twice", mutates_args=())
def rows_twice(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> 2 x, laid out as (B, H, S, D) in memory by the real kernel."""
    return (x * 2.0).transpose(1, 2).contiguous().transpose(1, 2)


@rows_twice.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # the fake: contiguous


class MergeAfterRefusedOp(nn.Module):
    """Attention's head merge, `reshape(B, S, -1)` of an op's (B, S, H, D) result, where the op is
    one mkcompiler cannot compile and whose real output strides differ from its fake's:
    - heads_twice (fake: transposed back, a view; real: not viewable), merged into a megakernel:
      the megakernel segment is exported (and run) on contiguous inputs, where the view is invalid;
    - rows_twice (fake: contiguous; real: transposed layout), merged into another refused op: the
      eager segment runs the view on the real kernel's output."""

    def __init__(self, op):
        super().__init__()
        self.qkv, self.out = nn.Linear(HEADS * D, HEADS * D), nn.Linear(HEADS * D, HEADS * D)
        self.op = op

    def forward(self, x):
        h = self.qkv(x).view(B, S, HEADS, D)
        if self.op is heads_twice:
            merged = heads_twice(h.transpose(1, 2)).transpose(1, 2).reshape(B, S, -1)
        else:
            merged = torch.cumsum(rows_twice(h).reshape(B, S, -1), dim=-1)
        return self.out(merged)


@pytest.mark.parametrize("op", [heads_twice, rows_twice], ids=["into_a_megakernel", "into_an_eager_op"])
def test_views_traced_on_other_strides_run_in_the_fallback(op):
    model = MergeAfterRefusedOp(op).eval()
    x = torch.randn(B, S, HEADS * D)
    with torch.no_grad(), pytest.warns(FallbackWarning, match=op._name):
        mk = mkcompiler.compile(model, (x,), fallback="eager")
    assert isinstance(mk, SegmentedModel) and mk.megakernels
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(B, S, HEADS * D)
            got, want = mk(x), model(x)
            assert rel_err(got, want) <= 1e-5, rel_err(got, want)


def test_a_view_written_through_stays_a_view():
    g = fx.Graph()
    x = g.placeholder("x")
    read = g.call_function(aten.view.default, (x, [16]))
    written = g.call_function(aten.view.default, (x, [4, 4]))
    row = g.call_function(aten.select.int, (written, 0, 1))  # a view of the view ...
    g.call_function(aten.add_.Tensor, (row, 1.0))  # ... written in place: x must see it
    g.output((g.call_function(aten.mul.Tensor, (read, 2.0)),))
    gm = fx.GraphModule(torch.nn.Module(), g)
    _relax_views(gm)
    gm.recompile()
    assert read.target is aten.reshape.default and written.target is aten.view.default
    base = torch.randn(16)
    want = base.clone()
    want.view(4, 4)[1] += 1.0
    (out,) = gm(base)
    assert torch.equal(base, want) and torch.equal(out, want * 2.0)


# ---- the GPU run on the CPU: a HF prefill whose written counter is taken for an input ----


@pytest.mark.slow
@pytest.mark.parametrize("moved", [False, True], ids=["fallback", "given_as_a_copy"])
def test_hf_prefill_with_its_counter_an_input_gives_eager_tokens(monkeypatch, moved):
    """The H100's prefill graph: dynamo traced `cumulative_length.to("cuda")` as a copy, so the
    counter is an input, not bound. Given as a copy (`moved`: the backend moves it to the GPU), the
    graph reads a clone of it: one megakernel per graph. Otherwise (the run before the fix) the
    export sees an input written and the graph runs as segments, where the head merge after
    attention met a megakernel segment's contiguous input (`aten.view(permute_7, [1, 8, -1])`
    raised)."""
    pytest.importorskip("transformers")
    from mkcompiler.frontend.hf import random_model

    role, private = dynamo._role, dynamo._private_inputs

    def counter_as_input(node, example, written):
        if "cumulative_length" in node.name and getattr(example, "_dynamo_static_input_type", None) is None:
            return dynamo.Role.INPUT
        return role(node, example, written)

    monkeypatch.setattr(dynamo, "_role", counter_as_input)
    if moved:  # every input is on "another device": the counter, which the graph writes after `.to`, is cloned
        monkeypatch.setattr(
            dynamo, "_private_inputs", lambda gm, roles, device: private(gm, roles, torch.device("meta"))
        )
    model = random_model("llama", seed=1)
    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = True  # README: not inductor on a GPU
    prompt = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=3, do_sample=False)
    before = dynamo.compiled_graphs()
    options = dict(matmul_tile=(16, 128, 64), elementwise_block=1024, row_block=8)
    model.forward = torch.compile(model.forward, backend="mkcompiler", options=options)
    with warnings.catch_warnings():
        warnings.simplefilter("error" if moved else "ignore", FallbackWarning)
        got = model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want), f"{got.tolist()} != eager {want.tolist()}"
    graphs = new_graphs(before)
    assert len(graphs) == 2
    if moved:
        assert all(isinstance(r, Megakernel) for r in runners(graphs)) and all(g._private for g in graphs)
    else:
        assert any(isinstance(r, SegmentedModel) for r in runners(graphs))


class AttendThenMask(nn.Module):
    """Attention (tagged nondeterministic for its dropout_p, 0 here) and a random mask (random)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(HEADS * D, 3 * HEADS * D), nn.Linear(HEADS * D, HEADS * D)

    def forward(self, x):
        q, k, v = self.qkv(x).view(B, S, 3, HEADS, D).permute(2, 0, 3, 1, 4)
        h = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, -1)
        return self.out(h * (torch.rand_like(h) < 0.5))


def test_attention_without_dropout_is_not_a_random_op():
    """fallback.py runs random ops eagerly (eager draws new numbers at each call); attention with
    dropout_p=0 draws none and compiles (it fell back on the GPU: issue 20)."""
    model = AttendThenMask().eval()
    x = torch.randn(B, S, HEADS * D)
    with torch.no_grad(), pytest.warns(FallbackWarning, match="random op"):
        mk = mkcompiler.compile(model, (x,), fallback="eager")
    assert [op for op, _, _ in mk.fallen_back] == ["aten.rand_like.default"], mk.fallen_back
    with torch.no_grad():
        for seed in range(2):
            x = torch.randn(B, S, HEADS * D)
            torch.manual_seed(seed)
            got = mk(x)
            torch.manual_seed(seed)
            assert rel_err(got, model(x)) <= 1e-5
