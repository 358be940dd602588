"""The host work of a megakernel call (issue 19). On an H100 the written spelling of
examples/llama.py (norm, RoPE and attention spelled out) ran the same kernel as the canonical
one (1.470 vs 1.471 ms) but its call took 155 us more: the ops the passes fold away left their
buffers in the graph (1774 of 1969 intermediates, 77 MB at Llama-3.2-1B), the runtime allocated
them all, and every call checked each input against every one of them in Python.

Now only buffers that a view of the queue or an output names get memory, the overlap check is one
bisection per input, and the address table is compared on the host: a call runs no tensor op but
the output copy, and both spellings bind the same buffers. Tiny config in the interpreter with
the kernel itself stubbed (the host path is what is measured); the GPU test times the real call."""

import functools
import random
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import mkcompiler
from mkcompiler import InputError
from mkcompiler.ir.graph import BufferKind, View
from mkcompiler.ir.layout import NUM_VIEW_FIELDS, ViewField
from mkcompiler.runtime.megakernel import Megakernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is not an installed package
from examples.llama import fill_caches, random_llama  # noqa: E402

SPELLINGS = ("canonical", "written")
# What a call may run as tensor ops on the CPU with the kernel stubbed: the error record's read
# (Settings.errors="sync": err.cpu().tolist(), a device-to-host copy on a GPU), then the output's
# copy (Settings.copy_outputs: an as_strided view of the output buffer, cloned).
ERROR_READ = ["aten::to", "aten::resolve_conj", "aten::resolve_neg"]
OUTPUT_COPY = ["aten::as_strided", "aten::clone", "aten::empty_strided", "aten::copy_"]


class RecordingKernel:
    """Stands in for the Triton kernel: `kernel[grid](*args, **kwargs)` records the launch and
    computes nothing (the host path around it is under test, not the kernel)."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def decode_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 1), generator=g), torch.tensor([9 + seed])


@functools.cache
def compiled(spelling: str) -> Megakernel:
    """A tiny Llama decode step (the same weights for both spellings), its kernel stubbed."""
    m = fill_caches(random_llama("tiny", dtype=torch.float32, seed=2, spelling=spelling))
    mk = mkcompiler.compile(m, decode_inputs(), cache=False)
    mk._kernel = RecordingKernel()
    return mk


def aten_ops_of_a_call(mk: Megakernel, inputs) -> list[str]:
    mk(*inputs)  # the first launch uploads every view's address: not the steady state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        mk(*inputs)
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


def live_buffers(mk: Megakernel) -> set[int]:
    """The intermediate and output buffers a view of the queue or an output names."""
    named = {int(b) for b in mk.queue.views[:, ViewField.BUFFER]}
    named |= {v.buffer for v in mk.graph.outputs if isinstance(v, View)}
    return {b for b in named if mk.graph.buffers[b].kind in (BufferKind.ACT, BufferKind.OUTPUT)}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_a_call_runs_no_tensor_op_but_the_error_read_and_output_copy(spelling):
    """Binding the inputs, checking them and the launch are host work (no aten op each: an op is
    microseconds of dispatch); fresh input tensors at new addresses are bound the same way."""
    mk = compiled(spelling)
    launches = len(mk._kernel.launches)
    assert aten_ops_of_a_call(mk, decode_inputs(1)) == ERROR_READ + OUTPUT_COPY
    assert len(mk._kernel.launches) == launches + 2
    tokens, pos = decode_inputs(2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        mk(tokens, pos)  # new tensors: their addresses go to the table and the views (small uploads)
    ops = [e.name for e in prof.events() if e.name.startswith("aten::")]
    assert ops[-len(ERROR_READ + OUTPUT_COPY) :] == ERROR_READ + OUTPUT_COPY
    assert mk._addrs_host[mk.graph.inputs[1][0]] == pos.data_ptr()


def test_the_spellings_bind_the_same_buffers_and_launch_alike():
    """The two spellings fold to the same ops, so their calls do the same work: the same
    intermediates allocated (count and bytes), the same ranges for the overlap check, the same
    launch arguments. Before, the written one allocated 4x the buffers of the canonical one."""
    mks = [compiled(s) for s in SPELLINGS]
    for mk in mks:
        mk(*decode_inputs(3))
    facts = [
        (
            len(mk.buffers),
            sum(t.numel() * t.element_size() for t in mk.buffers.values()),
            len(mk._written),
            len(mk._kernel.launches[-1][1]),
            sorted(mk._kernel.launches[-1][2].items()),
        )
        for mk in mks
    ]
    assert facts[0] == facts[1]
    # The folded ops' buffers are still in the written spelling's graph: it is the case above.
    assert len(mks[1].graph.buffers) > len(mks[0].graph.buffers)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_only_buffers_that_views_name_get_memory(spelling):
    mk = compiled(spelling)
    assert set(mk.buffers) == live_buffers(mk)
    unnamed = [
        b.id for b in mk.graph.buffers if b.kind == BufferKind.ACT and b.id not in mk.buffers
    ]  # what the passes folded away
    assert unnamed and all(mk._addrs_host[b] == 0 for b in unnamed)
    for bid, t in mk.buffers.items():
        assert mk._addrs_host[bid] == t.data_ptr() == mk.addrs[bid]


def test_an_edited_queue_naming_another_buffer_gets_its_memory():
    """upload_queue with a view of a buffer that had none: allocated, in the address table and
    in the overlap check's ranges (their cache is dropped)."""
    m = fill_caches(random_llama("tiny", dtype=torch.float32, seed=2, spelling="written"))
    mk = mkcompiler.compile(m, decode_inputs(), cache=False)
    before = len(mk._written_spans[0]) + len(mk._written)
    dead = next(b for b in mk.graph.buffers if b.kind == BufferKind.ACT and b.id not in mk.buffers)
    views = mk.queue.views
    old = views[0, ViewField.BUFFER]
    views[0, ViewField.BUFFER] = dead.id
    try:
        mk.upload_queue(check=False)
        assert dead.id in mk.buffers and mk.buffers[dead.id].numel() == dead.numel
        assert mk._addrs_host[dead.id] == mk.buffers[dead.id].data_ptr() == mk.addrs[dead.id]
        assert any(what == dead.name for _, _, what in mk._written)
        assert len(mk._written_spans[0]) + len(mk._written) > before
        t = mk.buffers[dead.id]
        assert mk._meets_written(t.data_ptr(), t.data_ptr() + 1)
        assert mk.views.view(-1, NUM_VIEW_FIELDS).shape[0] == len(views)
    finally:
        views[0, ViewField.BUFFER] = old


def scan(ranges, lo: int, hi: int) -> bool:
    return any(start < hi and lo < end for start, end, _ in ranges)


def bisecting(ranges) -> types.SimpleNamespace:
    """Megakernel's overlap test over the given (start, end, name) ranges, without a kernel."""
    fake = types.SimpleNamespace(_written=ranges)
    fake._written_spans = Megakernel._written_spans.func(fake)
    return fake


def test_the_overlap_bisection_answers_as_the_scan():
    """Nested, overlapping, touching, empty and disjoint ranges; spans at every boundary +-1 and
    random ones: the bisection over merged ranges says what the scan over every range says."""
    rng = random.Random(0)
    ranges = [(100, 200, "a"), (150, 160, "nested"), (190, 260, "overlap"), (260, 300, "touch")]
    ranges += [(400, 400, "empty"), (500, 510, "b"), (1000, 1100, "c"), (1100, 1100, "empty at end")]
    ranges += [(s, s + rng.randrange(0, 40), f"r{s}") for s in rng.sample(range(2000, 4000), 30)]
    fake = bisecting(ranges)
    starts, ends = fake._written_spans
    assert starts == sorted(starts) and all(e <= s for e, s in zip(ends, starts[1:]))  # disjoint, in order
    edges = sorted({x + d for s, e, _ in ranges for x in (s, e) for d in (-1, 0, 1)})
    spans = [(lo, hi) for lo in edges for hi in edges if lo < hi and hi - lo < 300]
    spans += [(lo, lo + rng.randrange(1, 200)) for lo in (rng.randrange(0, 4200) for _ in range(2000))]
    for lo, hi in spans:
        assert Megakernel._meets_written(fake, lo, hi) == scan(ranges, lo, hi), (lo, hi)


@pytest.mark.parametrize("where", ["intermediate", "kv cache"])
def test_an_input_in_memory_the_kernel_writes_is_refused_by_name(where):
    """The bisection finds it; the message names the buffer (the scan, on the refusal path only)."""
    mk = compiled("written")
    m_cache = next(t for bid, t in mk.graph.params.items() if mk.graph.buffers[bid].kind == BufferKind.STATE)
    bid, base = max(mk.buffers.items(), key=lambda kv: kv[1].numel()) if where == "intermediate" else (None, m_cache)
    name = mk.graph.buffers[bid].name if bid is not None else None
    flat = base.view(-1)
    if base.dtype != torch.int64:  # a position tensor living inside that memory
        flat = flat[: flat.numel() // 2 * 2].view(torch.int64)
    pos = flat[4:5]
    pos.fill_(9)
    launches = len(mk._kernel.launches)
    with pytest.raises(InputError, match="overlaps the megakernel's buffer") as e:
        mk(decode_inputs()[0], pos)
    assert name is None or repr(name) in str(e.value)
    assert where != "kv cache" or "(model state)" in str(e.value)
    assert len(mk._kernel.launches) == launches  # refused: no launch


@pytest.mark.gpu
def test_the_spellings_decode_calls_run_within_3_percent_on_a_gpu():
    """Issue 19's acceptance: Llama-3.2-1B shapes, batch 1, ctx 512, bf16, one process; the
    whole call mk(tok, pos) of the two spellings (medians of do_bench, best of six rounds each,
    in alternating order) within 3% of each other, and their logits agree (same weights and caches)."""
    import triton

    from tests.helpers import rel_err

    ctx, runs = 512, {}
    for spelling in SPELLINGS:
        m = random_llama("llama-3.2-1b", dtype=torch.bfloat16, device="cuda", max_seq_len=ctx + 3, spelling=spelling)
        fill_caches(m.eval())
        tok = torch.randint(0, m.c.vocab_size, (1, 1), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        pos = torch.tensor([ctx], device="cuda")
        mk = mkcompiler.compile(m, (tok, pos), cache=False)
        runs[spelling] = (m, mk, tok, pos, mk(tok, pos).float())
    assert rel_err(runs["written"][4], runs["canonical"][4]) <= 5e-2  # bf16, as decode_latency.py's tolerance
    # Host time per call varies up to 2x between rounds of one model on the H100 machines
    # (session 12, benchmarks/call_trace.py), more than the spellings differ: rounds in
    # alternating order, the best of each spelling compared.
    call, kernel = {s: [] for s in SPELLINGS}, {s: [] for s in SPELLINGS}
    for r in range(6):
        for s in SPELLINGS if r % 2 == 0 else SPELLINGS[::-1]:
            _, mk, tok, pos, _ = runs[s]
            call[s].append(triton.testing.do_bench(lambda mk=mk, t=tok, p=pos: mk(t, p), return_mode="median"))
            kernel[s].append(triton.testing.do_bench(mk.launch, return_mode="median"))
            mk.check()
    best = {s: min(v) for s, v in call.items()}
    print({s: (round(best[s], 4), round(min(kernel[s]), 4)) for s in SPELLINGS})
    assert best["written"] <= 1.03 * best["canonical"] and best["canonical"] <= 1.03 * best["written"], (call, kernel)
