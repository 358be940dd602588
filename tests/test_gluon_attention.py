"""Decode attention on the Gluon backend (backends/gluon/attention.py, issue 17): GQA, MHA, causal
rows, bool and additive masks, split-KV partials and their combine. On the CPU: small decode graphs
(matmul + attention) compile with backend="gluon" without falling back, and their kernels compile
offline for sm_90 without spills; a Llama decode step no longer names attention among what the
backend lacks; prefill attention is refused with its reason. On a GPU (marked gpu): outputs equal
eager, a wait that gives up around attention raises and the next call is correct."""

import time
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mkcompiler
from mkcompiler.backends.gluon import attention, codegen, tiles
from mkcompiler.ir.layout import Field, WaitField
from mkcompiler.ir.settings import default_max_spin
from mkcompiler.runtime.gluon import GluonFallbackWarning, GluonMegakernel
from tests.helpers import reference, rel_err

needs_gluon = pytest.mark.skipif(not tiles.HAVE_GLUON, reason="triton.experimental.gluon not importable")


@dataclass(frozen=True)
class Case:
    """A decode attention graph: hq query heads over hkv kv heads of dim d, sq query rows, `keys`
    cached keys (inputs), a mask (None, "bool" or "float": additive), attention in `dtype`."""

    hq: int
    hkv: int
    d: int
    sq: int
    keys: int
    causal: bool = False
    mask: str | None = None
    dtype: torch.dtype = torch.bfloat16
    split: bool = True  # does the compile split the keys (passes/split_kv.py, 132 workers)?
    rows: int = 4  # attention_tile's R: packed rows at once (the other warps split the keys)


CASES = {
    "gqa4_split_bool_mask": Case(8, 2, 64, 1, 1024, mask="bool"),
    "mha_split_float_mask": Case(4, 4, 64, 1, 512, mask="float", rows=1),
    "gqa2_causal_4_rows_d48": Case(4, 2, 48, 4, 64, causal=True, split=False),
    "gqa8_d128_two_row_groups": Case(8, 1, 128, 1, 256),
    "gqa2_fp32_short_last_chunk": Case(4, 2, 32, 1, 300, mask="bool", dtype=torch.float32, rows=2),
}


class DecodeAttention(nn.Module):
    """x [sq, dim] -> q (a Linear) over the given keys and values -> (attention rows, Linear of
    them). dim = hq x d: both weights share one ring box."""

    def __init__(self, c: Case):
        super().__init__()
        self.c = c
        self.wq = nn.Linear(c.hq * c.d, c.hq * c.d, bias=False)
        self.wo = nn.Linear(c.hq * c.d, c.hq * c.d, bias=False)

    def forward(self, x, k, v, mask=None):
        c = self.c
        q = self.wq(x).view(1, c.sq, c.hq, c.d).transpose(1, 2).to(k.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=c.causal, enable_gqa=c.hq != c.hkv)
        o = o.transpose(1, 2).reshape(c.sq, c.hq * c.d).to(x.dtype)
        return o, self.wo(o)


def make(c: Case, device="cpu", seed=0):
    torch.manual_seed(seed)
    model = DecodeAttention(c).to(device, torch.bfloat16)
    return model, inputs(c, device, seed)


def inputs(c: Case, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c.sq, c.hq * c.d, generator=g).to(device, torch.bfloat16)
    k = torch.randn(1, c.hkv, c.keys, c.d, generator=g).to(device, c.dtype)
    v = torch.randn(1, c.hkv, c.keys, c.d, generator=g).to(device, c.dtype)
    args = [x, k, v]
    if c.mask is not None:
        keep = torch.rand(1, 1, c.sq, c.keys, generator=g) < 0.7
        keep[..., 0] = True  # every row keeps a key (torch gives NaN otherwise)
        keep[..., 3 * c.keys // 4 :] = False  # a decode position: nothing past it
        if c.mask == "bool":
            args.append(keep.to(device))
        else:  # additive: -inf where dropped, a bias elsewhere
            bias = torch.randn(1, 1, c.sq, c.keys, generator=g).masked_fill(~keep, float("-inf"))
            args.append(bias.to(device, c.dtype))
    return args


def compile_gluon(model, args, **options):
    """Compiled on the Gluon backend; a fallback fails the test (it names what is missing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", GluonFallbackWarning)
        return mkcompiler.compile(model, tuple(args), backend="gluon", **options)


def opcodes(mk) -> list[str]:
    return [k[0] for k in mk.queue.opcode_keys]


@pytest.fixture(scope="module", params=list(CASES))
def compiled(request):
    c = CASES[request.param]
    model, args = make(c)
    return c, compile_gluon(model, args, interpret=False, num_workers=132, cache=False)


@needs_gluon
def test_decode_attention_compiles_for_sm90_without_spills(compiled):
    c, mk = compiled
    assert isinstance(mk, GluonMegakernel) and not mk.launchable
    kinds = opcodes(mk)
    assert "attention" in kinds and ("attention_combine" in kinds) == c.split, kinds
    # the packed rows held at once: R, BNW, VEC, PF_STEPS end the call
    call = next(line for line in mk.source.splitlines() if "attention_tile(" in line)
    assert int(call.rsplit(",", 5)[1]) == c.rows, call
    rep = codegen.compile_offline(mk.kernel, default_max_spin(interpret=False), keep_asm=True)
    print(f"\nsm_90 {c}: {rep['regs']} regs, {rep['spilled_bytes']} B spilled, {rep['shared']} B shared")
    assert rep["spilled_bytes"] == 0, rep["ptxas_log"]
    assert rep["regs"] > 0 and len(rep["setmaxnreg"]) >= 2, rep
    # keys and values in 16-byte loads (the aligned views' hints reached the loads)
    assert "ld.global.v4.b32" in rep["ptx"]


@needs_gluon
def test_prefill_attention_falls_back_with_its_reason():
    c = Case(4, 2, 32, 64, 64, causal=True)
    model, args = make(c)
    with pytest.warns(GluonFallbackWarning, match=r"attention \(64-row tiles"):
        mk = mkcompiler.compile(model, tuple(args), backend="gluon", interpret=False, num_workers=8, cache=False)
    assert not isinstance(mk, GluonMegakernel)


def test_kv_shape_holds_at_most_four_rows_within_the_register_budgets():
    shape = attention.kv_shape
    bf16 = dict(k=torch.bfloat16, v=torch.bfloat16, bn=128)
    for rows, want in ((1, 1), (2, 2), (3, 4), (4, 4), (16, 4)):
        assert shape(_Key(bd=64, **bf16), rows)[0] == want
    # (R, keys per warp step, elements per thread along the head dim)
    assert shape(_Key(bd=64, **bf16), 1) == (1, attention.WARP_KV_ELEMS // 64, 8)
    assert shape(_Key(bd=64, **bf16), 4) == (4, attention.WARP_PRODUCT_ELEMS // (4 * 64), 8)
    assert shape(_Key(bd=16, **bf16), 4) == (4, 32, 8)
    assert shape(_Key(bd=512, **bf16), 4) == (4, 1, 8)  # at least one key per lane row
    # fp32 keys hold twice the registers per product: half the keys per step (8 compute warps spilled)
    assert shape(_Key(bd=32, k=torch.float32, v=torch.float32, bn=128), 2) == (2, 16, 4)
    assert shape(_Key(bd=32, k=torch.float32, v=torch.float32, bn=16), 1) == (1, 16, 4)  # at most BN


@dataclass
class _Key:
    bd: int
    k: torch.dtype
    v: torch.dtype
    bn: int


# ---- the tiles' arithmetic on the CPU (tests/gluon_shim.py: torch as `gl`) ----


@dataclass
class _Layout:
    """What the shim needs of a layout: its rank (attention.along shapes its aranges by it)."""

    rank: int


def attention_shim(mk):
    """A GluonShim that also runs attention.py's routines: their bodies re-bound to the shim's
    namespace, with layouts that know their rank and the gl calls they make beyond the shim's
    (expand_dims, convert_layout, multiple_of, the L2 prefetch's inline asm: a no-op)."""
    import types

    from tests.gluon_shim import GluonShim, Ptr

    shim = GluonShim(mk)
    ns = shim.ns
    for name, value in vars(attention).items():
        fn = getattr(value, "fn", None)
        if isinstance(fn, types.FunctionType) and fn.__module__ == attention.__name__:  # not tiles' (arg...)
            ns[name] = types.FunctionType(fn.__code__, ns, name, fn.__defaults__, fn.__closure__)
        elif type(value).__name__ == "constexpr":
            ns[name] = value.value
    views = shim.views

    class Addr:
        def __init__(self, v):
            self.v = v

        def to(self, pointer, bitcast=False):
            return Ptr(self.v, pointer)

    def along(n, axis, layout):
        shape = [1] * layout.rank
        shape[axis] = n
        return torch.arange(n, dtype=torch.int32).reshape(shape)

    gl = ns["gl"]
    gl.BlockedLayout = lambda size, threads, warps, order: _Layout(len(warps))
    gl.SliceLayout = lambda dim, parent: _Layout(parent.rank - 1)
    gl.pointer_type = lambda dtype: dtype
    gl.expand_dims = lambda x, axis: x.unsqueeze(axis)
    gl.convert_layout = lambda x, layout: x
    gl.multiple_of = lambda x, v: x
    gl.inline_asm_elementwise = lambda *a: None
    ns.update(along=along, view_field=lambda views_ptr, v, f: Addr(views[int(v), f].clone()))
    return shim


def run_attention_on_the_cpu(mk, args, ok: int = 1):
    """The queue in list order (vm.run_queue, static lists): attention and its combine through their
    Gluon routines (attention_shim), the rest through their ops' torch references."""
    from mkcompiler.ops.registry import FAMILIES

    from mkcompiler.backends.gluon.family import GLUON_FAMILIES
    from mkcompiler.vm import run_queue

    mk._bind(tuple(args), {})
    shim = attention_shim(mk)
    q, ran = mk.queue, set()

    def execute(i):
        o = int(q.rows[i, Field.OPCODE])
        key = q.opcode_keys[o]
        if key[0] in ("attention", "attention_combine"):
            shim.run(i, GLUON_FAMILIES[key[0]].emit(key, o, q), ok=ok)
            ran.add(key[0])
        else:
            task = mk.dag.tasks[int(q.rows[i, Field.TASK])]
            op = mk.graph.ops[task.op]
            FAMILIES[op.kind].reference(op, task.coords, mk.tensor_of)

    run_queue(q, execute, dynamic=False, seed=0)
    return mk.outputs(), ran


@needs_gluon
@pytest.mark.parametrize("name", list(CASES))
def test_attention_tiles_run_on_the_cpu_give_eager_outputs(name):
    """attention_tile and attention_combine_tile's bodies with torch as `gl` on a compiled kernel's
    own buffers, views and instruction rows (matmuls by their references), intermediates poisoned."""
    c = CASES[name]
    model, args = make(c)
    mk = mkcompiler.compile(model, tuple(args), interpret=False, num_workers=132, cache=False)
    mk.poison()
    got, ran = run_attention_on_the_cpu(mk, args)
    assert ran == ({"attention", "attention_combine"} if c.split else {"attention"})
    for g, w in zip(got, reference(model, args)):
        assert rel_err(g, w) <= 2e-2, name  # bf16 outputs


@needs_gluon
def test_llama_decode_step_runs_its_attention_on_gluon():
    """A split-KV Llama decode step: attention and its combine are not among what the backend lacks
    (other families may still be: not this module's), and through their routines on the CPU (the
    rest by references) the step gives eager's logits."""
    import copy

    from examples.llama import fill_caches, random_llama

    model = fill_caches(random_llama("tiny", dtype=torch.bfloat16, max_seq_len=1024))
    args = (torch.tensor([[3]]), torch.tensor([700]))
    eager = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GluonFallbackWarning)
        mk = mkcompiler.compile(model, args, backend="gluon", interpret=False, num_workers=132, cache=False)
    splits = [op.attrs.split for op in mk.graph.ops if op.kind == "attention"]
    assert len(splits) == 2 and min(splits) > 1, splits
    problems = codegen.unsupported(mk.graph, mk.queue)
    assert not [p for p in problems if "attention" in p], problems
    mk.poison()
    got, ran = run_attention_on_the_cpu(mk, args)
    assert ran == {"attention", "attention_combine"}
    assert rel_err(got, eager(*args)) <= 2e-2


@needs_gluon
def test_attention_tiles_after_a_failed_wait_touch_nothing():
    """ok == 0: neither tile reads or writes (poisoned buffers keep their NaN; every output too)."""
    c = CASES["gqa4_split_bool_mask"]
    model, args = make(c)
    mk = mkcompiler.compile(model, tuple(args), interpret=False, num_workers=132, cache=False)
    mk._bind(tuple(args), {})
    for b in mk.buffers.values():
        b.fill_(7)
    before = [b.clone() for b in mk.buffers.values()]
    shim = attention_shim(mk)
    from mkcompiler.backends.gluon.family import GLUON_FAMILIES

    for i in range(len(mk.queue)):
        o = int(mk.queue.rows[i, Field.OPCODE])
        key = mk.queue.opcode_keys[o]
        if key[0] in ("attention", "attention_combine"):
            shim.run(i, GLUON_FAMILIES[key[0]].emit(key, o, mk.queue), ok=0)
    assert all(torch.equal(a, b) for a, b in zip(before, mk.buffers.values()))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_decode_attention_matches_eager(name):
    c = CASES[name]
    model, args = make(c, "cuda")
    mk = compile_gluon(model, args, max_spin=1 << 16)
    assert isinstance(mk, GluonMegakernel)
    for seed in range(3):  # fresh inputs, repeated launches
        args = inputs(c, "cuda", seed=10 + seed)
        mk.poison()
        got = mk(*args)
        want = reference(model, args)
        for g, w in zip(got, want):
            assert rel_err(g, w) <= 3e-2, (name, seed)


@pytest.mark.gpu
def test_gpu_attention_wait_that_gives_up_raises_and_the_next_call_is_correct():
    c = CASES["gqa4_split_bool_mask"]
    model, args = make(c, "cuda")
    mk = compile_gluon(model, args, max_spin=1 << 16)
    ops = mk.queue.rows[:, Field.OPCODE]
    combine = [o for o, k in enumerate(mk.queue.opcode_keys) if k[0] == "attention_combine"]
    i = next(i for i in range(len(mk.queue)) if ops[i] in combine)
    row = mk.queue.rows[i, Field.WAIT_BEGIN]
    assert row < mk.queue.rows[i, Field.WAIT_END]
    good = mk.queue.waits.copy()
    mk.queue.waits[row, WaitField.COUNT] += 1
    mk.upload_queue(check=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with pytest.raises(mkcompiler.MegakernelError, match="instruction|counter"):
        mk(*args)
    assert time.perf_counter() - t0 < 5.0
    mk.queue.waits[:] = good
    mk.upload_queue()
    mk.poison()
    for g, w in zip(mk(*args), reference(model, args)):
        assert rel_err(g, w) <= 3e-2


@pytest.mark.gpu
def test_gpu_llama_decode_step_matches_eager():
    """A whole split-KV Llama decode step, where the Gluon backend runs every op of it (shapes whose
    matmuls share one ring box); skipped while other families still fall back."""
    from examples.llama import fill_caches, random_llama

    model = fill_caches(
        random_llama("tiny", dtype=torch.bfloat16, device="cuda", max_seq_len=1024, dim=256, hidden=256)
    )
    args = (torch.tensor([[3]], device="cuda"), torch.tensor([700], device="cuda"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GluonFallbackWarning)
        mk = mkcompiler.compile(model, args, backend="gluon", max_spin=1 << 16)
    if not isinstance(mk, GluonMegakernel):
        pytest.skip(f"not on the Gluon backend: {[str(w.message) for w in caught]}")
    want = reference(model, list(args))
    mk.poison()
    assert rel_err(mk(*args), want) <= 3e-2
