"""The Gluon backend's embedding, scatter (KV append), reduce / argmax / softmax tiles and its
elementwise tiles over strided views and cat windows (backends/gluon/small_ops.py, elementwise.py;
issue 17). On the CPU: graphs of these families and decode matmuls compile with backend="gluon"
(no fallback warning names them) and offline for sm_90 without spills; the generated routines
are the Triton routines' lines translated; run on the CPU with torch standing in for `gl`
(tests/gluon_shim.py), they give eager's outputs, KV caches and greedy tokens. On a GPU (marked
gpu): the Gluon megakernel against eager."""

import ast
import copy
import inspect
import re
import textwrap
import warnings

import pytest
import torch
from mkcompiler.ops import common
from mkcompiler.ops.elementwise import has_positional
from mkcompiler.ops.registry import FAMILIES
from torch import nn

import mkcompiler
from examples.llama import GreedyLoop, LlamaConfig, fill_caches, random_llama, rotate_half
from mkcompiler.backends.gluon import codegen, tiles, views
from mkcompiler.backends.gluon.elementwise import gluon_line
from mkcompiler.backends.gluon.family import GLUON_FAMILIES
from mkcompiler.ir.layout import Field
from mkcompiler.ir.settings import default_max_spin
from mkcompiler.runtime.gluon import GluonFallbackWarning, GluonMegakernel
from tests.gluon_shim import GluonShim, run_with_gluon_tiles
from tests.helpers import rel_err

needs_gluon = pytest.mark.skipif(not tiles.HAVE_GLUON, reason="triton.experimental.gluon not importable")
KINDS = ("embedding", "scatter", "reduce", "argmax", "softmax", "norm", "elementwise")
# A Llama whose decode matmuls share one weight box (the Gluon ring holds one box shape)
SMALL_LLAMA = LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden=512, max_seq_len=64)


class EmbedHead(nn.Module):
    """Embedding -> LM head -> the row ops a decode step ends with."""

    def __init__(self, vocab=512, dim=256):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        logits = self.head(self.embed(tokens))
        return logits, logits.argmax(-1), logits.amax(-1), torch.softmax(logits.float(), -1), logits.mean(-1)


class RopeKV(nn.Module):
    """Q/K/V projections, RoPE by rotate-half (cat), the KV-cache append at a runtime position,
    a `ge` mask over the cache: a decode step's attention inputs without the attention."""

    def __init__(self, dim=256, heads=4, kv_heads=2, max_seq=64):
        super().__init__()
        self.h, self.hk, self.d, self.max_seq = heads, kv_heads, dim // heads, max_seq
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.register_buffer("k_cache", torch.randn(1, kv_heads, max_seq, self.d), persistent=False)
        self.register_buffer("v_cache", torch.randn(1, kv_heads, max_seq, self.d), persistent=False)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, self.d, 2).float() / self.d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, input_pos):
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.h, self.d).transpose(1, 2)
        k = self.wk(x).view(b, n, self.hk, self.d).transpose(1, 2)
        v = self.wv(x).view(b, n, self.hk, self.d).transpose(1, 2)
        freqs = input_pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        self.k_cache[:b, :, input_pos] = k
        self.v_cache[:b, :, input_pos] = v
        mask = input_pos[:, None] >= torch.arange(self.max_seq, device=x.device)[None, :]
        return self.wo(q.transpose(1, 2).reshape(b, n, -1)), mask


class Norms(nn.Module):
    """Standalone norms (no decode matmul folds them: what precedes large-M matmuls in a prefill
    or a large-batch decode step): RMSNorm and LayerNorm, with and without weight and bias, over
    rows whose length is not a multiple of the tile's columns; one feeds a large-M matmul (the
    Gluon backend streams weights, so its graphs have a matmul)."""

    def __init__(self, dim=320):
        super().__init__()
        self.head = nn.Linear(dim, 64, bias=False)
        self.rms = nn.RMSNorm(dim, eps=1e-5)
        self.ln = nn.LayerNorm(dim)
        self.ln_no_bias = nn.LayerNorm(dim, bias=False)
        with torch.no_grad():  # not the 1 / 0 initialisation: the weight and bias must show
            for p in (self.rms.weight, self.ln.weight, self.ln.bias, self.ln_no_bias.weight):
                p.normal_(1.0, 0.5)

    def forward(self, x):
        bare = torch.nn.functional.layer_norm(x, x.shape[-1:])
        h = self.rms(x)
        return h, self.head(h), self.ln(x) + 0.5, self.ln_no_bias(x), bare, torch.rms_norm(x, x.shape[-1:])


def norms(dtype=torch.bfloat16, device="cpu", seed=0):
    torch.manual_seed(seed)
    return Norms().to(device, dtype), (3.0 * torch.randn(37, 320, device=device).to(dtype) + 1.0,)


def embed_head(dtype=torch.bfloat16, device="cpu", seed=0):
    torch.manual_seed(seed)
    return EmbedHead().to(device, dtype), (torch.tensor([[5], [7], [511]], device=device),)


def rope_kv(dtype=torch.bfloat16, device="cpu", seed=0):
    torch.manual_seed(seed)
    model = RopeKV().to(device, dtype)
    return model, (torch.randn(1, 1, 256, dtype=dtype, device=device), torch.tensor([7], device=device))


MODELS = {"embed_head": embed_head, "rope_kv": rope_kv, "norms": norms}


def compile_gluon(model, inputs, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("error", GluonFallbackWarning)  # it must run on the Gluon backend
        return mkcompiler.compile(
            model, inputs, backend="gluon", interpret=False, num_workers=132, cache=False, **options
        )


@pytest.fixture(scope="module", params=sorted(MODELS))
def gluon_mk(request):
    model, inputs = MODELS[request.param]()
    return request.param, compile_gluon(model, inputs)


def keys_of(mk, kind):
    return [(o, k) for o, k in enumerate(mk.queue.opcode_keys) if k[0] == kind]


# ---- CPU ----


@needs_gluon
def test_a_llama_decode_step_names_none_of_these_families():
    """The issue's decode step, greedy: whatever else may keep it off the backend, no longer its
    embedding, KV appends, strided / cat elementwise ops or argmax."""
    loop = GreedyLoop(fill_caches(random_llama(SMALL_LLAMA, dtype=torch.bfloat16)), batch=1, max_new=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mk = mkcompiler.compile(loop, (), backend="gluon", interpret=False, num_workers=132, cache=False)
    assert {"embedding", "scatter", "argmax", "elementwise"} <= {k[0] for k in mk.queue.opcode_keys}
    assert not [line for line in codegen.unsupported(mk.graph, mk.queue) if line.startswith(KINDS)]
    named = re.compile(r"\b(embedding|scatter|elementwise|argmax|reduce|softmax) \(")
    assert not [w for w in caught if issubclass(w.category, GluonFallbackWarning) and named.search(str(w.message))]


@needs_gluon
def test_a_large_batch_decode_step_runs_on_gluon():
    """Batch 32: the matmuls are large-M tiles, which fold no norm, so the step has standalone
    norms; they run on the Gluon backend now (they sent 8B batch-64 decode to Triton)."""
    model = fill_caches(random_llama(SMALL_LLAMA, dtype=torch.bfloat16, max_batch=32))
    tokens = torch.randint(0, SMALL_LLAMA.vocab_size, (32, 1))
    mk = compile_gluon(model, (tokens, torch.tensor([9])))
    assert isinstance(mk, GluonMegakernel) and "norm" in {k[0] for k in mk.queue.opcode_keys}


@needs_gluon
def test_graphs_of_these_families_compile_for_sm90_without_spills(gluon_mk):
    name, mk = gluon_mk
    assert isinstance(mk, GluonMegakernel)
    expected = {
        "embed_head": {"embedding", "argmax", "reduce", "softmax"},
        "rope_kv": {"scatter", "elementwise"},
        "norms": {"norm"},
    }
    assert expected[name] <= {k[0] for k in mk.queue.opcode_keys}
    if name == "rope_kv":  # strided views and a cat read through windows, in elementwise and scatter
        ew = [k for _, k in keys_of(mk, "elementwise")]
        assert any(k.shape is not None for k in ew) and any(has_positional(k.expr) for k in ew)
        assert any(has_positional(k.expr) for _, k in keys_of(mk, "scatter"))
    r = codegen.compile_offline(mk.kernel, default_max_spin(interpret=False))
    print(f"\n{name} sm_90: {r['regs']} regs, {r['spilled_bytes']} B spilled, {r['shared']} B shared")
    assert r["spilled_bytes"] == 0, r["ptxas_log"]
    assert r["regs"] > 0


def _triton_body(src: str) -> list[str]:
    """A Triton routine's lines in the Gluon routine's terms: its args read through the
    instruction index, its arange in the routine's layout, gl names, no address table."""
    out = []
    for line in src.splitlines():
        s = line.strip()
        if not s or s.startswith(("@triton.jit", "def ")):
            continue
        s = s.replace("arg(row_ptr, ", "arg(row, ins, ").replace(
            "tl.arange(0, BLOCK)", "gl.arange(0, BLOCK, layout=LAYOUT)"
        )
        out.append(gluon_line(s))
    return out


def _gluon_body(src: str) -> list[str]:
    skip = ("@gluon.jit", "def ", "BLOCK: gl.constexpr", "LAYOUT: gl.constexpr")
    return [s for s in (line.strip() for line in src.splitlines()) if s and not s.startswith(skip)]


@needs_gluon
@pytest.mark.parametrize("kind", ["elementwise", "scatter"])
def test_generated_routines_are_the_triton_routines_translated(gluon_mk, kind):
    """Every line of the Gluon routine (index splits, windows, shared loads, the scatter's slots,
    the stores) is the Triton routine's for the same key, translated: same args, same arithmetic."""
    _, mk = gluon_mk
    found = keys_of(mk, kind)
    for opcode, key in found:
        emitted = GLUON_FAMILIES[kind].emit(key, opcode, mk.queue)
        triton_src, _ = FAMILIES[kind].emit(key, "routine")
        assert _gluon_body(emitted.routines) == _triton_body(triton_src), key
        assert emitted.call.startswith("if ok != 0:")  # a wait that gave up: the tile does nothing


def _normalized(fn) -> str:
    """A helper's body without its docstring, in Gluon's names."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    body = tree.body[0].body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    src = "\n".join(ast.unparse(s) for s in body)
    return gluon_line(src).replace(", cache_modifier='.cg'", "")


@needs_gluon
@pytest.mark.parametrize(
    "name", ["split_index", "strided_offsets", "view_offsets", "offsets_of", "load_strided", "store_strided"]
)
def test_view_helpers_are_the_triton_helpers(name):
    """views.py's index arithmetic is ops/common.py's (the shim test then runs it)."""
    triton_fn, gluon_fn = getattr(common, name), getattr(views, name)
    assert _normalized(gluon_fn.fn) == _normalized(triton_fn.fn)


@needs_gluon
@pytest.mark.parametrize("num_warps", [4, 8])
def test_layouts_cover_their_tiles_without_column_replication(num_warps):
    for bc in (16, 32, 64, 128, 256, 512, 1024):
        lay = views.rows_layout(bc, num_warps)
        (_, vec), (tr, tc), (wr, wc) = lay.size_per_thread, lay.threads_per_warp, lay.warps_per_cta
        assert tr * tc == 32 and wr * wc == num_warps and vec * tc * wc <= bc, (bc, lay)
    for block in (16, 64, 256, 1024, 4096):
        lay = views.flat_layout(block, num_warps)
        assert lay.size_per_thread[0] * 32 * num_warps <= max(block, 32 * num_warps), (block, lay)


@needs_gluon
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gluon_tiles_run_on_the_cpu_give_eager_outputs(name, dtype):
    """The generated routines and the helpers' bodies, run with torch as `gl` (GluonShim) on a
    compiled megakernel's buffers and views, the matmuls by their references."""
    model, inputs = MODELS[name](dtype)
    eager = copy.deepcopy(model)
    mk = mkcompiler.compile(model, inputs, interpret=False, num_workers=8, cache=False)
    out, ran = run_with_gluon_tiles(mk, inputs, KINDS)
    ref = eager(*inputs)
    ran_kinds = {"rope_kv": {"scatter"}, "embed_head": {"embedding", "argmax"}, "norms": {"norm"}}[name]
    assert {mk.queue.opcode_keys[o][0] for o in ran} >= ran_kinds
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip(out, ref):
        if want.dtype in (torch.int64, torch.bool):
            assert torch.equal(got, want)
        else:
            assert rel_err(got, want) <= tol
    if name == "embed_head":  # the argmax of the kernel's own logits, exactly
        assert torch.equal(out[1], out[0].float().argmax(-1))
    elif name == "rope_kv":
        for cache in ("k_cache", "v_cache"):
            got, want = getattr(model, cache), getattr(eager, cache)
            assert rel_err(got, want) <= tol
            rest = torch.ones(want.shape[2], dtype=torch.bool)
            rest[7] = False
            assert torch.equal(got[:, :, rest], want[:, :, rest])  # only the appended slot changed


@needs_gluon
def test_a_failed_wait_runs_nothing():
    """ok == 0 (a wait gave up): every branch of these families leaves memory alone."""
    model, inputs = embed_head(torch.float32)
    mk = mkcompiler.compile(model, inputs, interpret=False, num_workers=8, cache=False)
    mk._bind(inputs, {})
    for b in mk.buffers.values():
        b.fill_(7)
    before = [b.clone() for b in mk.buffers.values()]
    shim = GluonShim(mk)
    for i in range(len(mk.queue)):
        opcode = int(mk.queue.rows[i, Field.OPCODE])
        key = mk.queue.opcode_keys[opcode]
        if key[0] in KINDS:
            shim.run(i, GLUON_FAMILIES[key[0]].emit(key, opcode, mk.queue), ok=0)
    assert all(torch.equal(a, b) for a, b in zip(before, mk.buffers.values()))


@needs_gluon
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_steps_of_a_tiny_llama_give_eager_tokens(dtype):
    """Greedy decode steps (embedding, RoPE cat, `ge` mask, KV appends, argmax, the generated-token
    scatter, the loop's state updates) through the Gluon routines on the CPU, attention and matmuls
    by their references: eager's tokens, eager's caches."""
    loop = GreedyLoop(fill_caches(random_llama("tiny", dtype=dtype)), batch=1, max_new=4)
    loop.start(torch.tensor([[3]]), 9)
    eager = copy.deepcopy(loop)
    mk = mkcompiler.compile(loop, (), interpret=False, num_workers=8, cache=False)
    for _ in range(3):
        out, ran = run_with_gluon_tiles(mk, (), KINDS)
        assert torch.equal(out, eager())
    assert {"embedding", "argmax", "scatter"} <= {mk.queue.opcode_keys[o][0] for o in ran}
    assert torch.equal(loop.generated, eager.generated) and torch.equal(loop.pos, eager.pos)
    for got, want in zip(loop.model.layers, eager.model.layers):
        assert rel_err(got.attn.k_cache, want.attn.k_cache) <= (1e-5 if dtype == torch.float32 else 3e-2)


# ---- GPU ----


@pytest.mark.gpu
def test_gpu_embedding_and_row_ops_match_eager():
    model, inputs = embed_head(device="cuda")
    mk = compile_gluon(model, inputs)
    assert isinstance(mk, GluonMegakernel)
    for seed in range(2):  # repeated calls, other tokens
        torch.manual_seed(seed)
        tokens = torch.randint(0, 512, (3, 1), device="cuda")
        out, ref = mk(tokens), model(tokens)
        for got, want in zip(out[:1] + out[2:], ref[:1] + ref[2:]):
            assert rel_err(got, want) <= 3e-2
        assert torch.equal(out[1], out[0].float().argmax(-1))  # the first max of the kernel's own logits


@pytest.mark.gpu
def test_gpu_norms_match_eager():
    model, (x,) = norms(device="cuda")
    mk = compile_gluon(model, (x,))
    assert isinstance(mk, GluonMegakernel) and "norm" in {k[0] for k in mk.queue.opcode_keys}
    for seed in range(2):  # repeated calls, other inputs
        torch.manual_seed(seed)
        x = 3.0 * torch.randn_like(x) + 1.0
        for got, want in zip(mk(x), model(x)):
            assert rel_err(got, want) <= 3e-2


@pytest.mark.gpu
def test_gpu_kv_append_and_rope_match_eager():
    model, (x, pos) = rope_kv(device="cuda")
    eager = copy.deepcopy(model)
    mk = compile_gluon(model, (x, pos))
    for p in (7, 0, 63):  # runtime positions, the cache's last slot included
        torch.manual_seed(p)
        x, pos = torch.randn_like(x), torch.tensor([p], device="cuda")
        (out, mask), (want, want_mask) = mk(x, pos), eager(x, pos)
        assert rel_err(out, want) <= 3e-2 and torch.equal(mask, want_mask)
        for cache in ("k_cache", "v_cache"):
            got, ref = getattr(model, cache), getattr(eager, cache)
            assert rel_err(got[:, :, p], ref[:, :, p]) <= 3e-2
            getattr(model, cache).copy_(ref)  # the next step from the same state
    rest = torch.ones(64, dtype=torch.bool, device="cuda")
    rest[[7, 0, 63]] = False
    assert torch.equal(model.k_cache[:, :, rest], eager.k_cache[:, :, rest])


@pytest.mark.gpu
def test_gpu_greedy_steps_of_a_small_llama_give_eager_tokens():
    """Greedy steps on the Gluon backend (attention included): each token is eager's argmax, or
    ties it within bf16 noise; the caches match eager's."""
    loop = GreedyLoop(fill_caches(random_llama(SMALL_LLAMA, dtype=torch.bfloat16, device="cuda")), batch=1, max_new=4)
    loop.start(torch.tensor([[3]], device="cuda"), 9)
    eager = copy.deepcopy(loop)
    mk = compile_gluon(loop, ())
    for _ in range(4):
        logits = eager.model(eager.token, eager.pos)[:, -1].float()
        token = mk()
        pick = logits.gather(-1, token.view(-1, 1))
        assert torch.equal(token.view(-1), logits.argmax(-1)) or bool(
            (logits.amax(-1) - pick.view(-1) <= 3e-2 * logits.abs().amax()).all()
        )
        eager.token.copy_(token)  # both go on from the kernel's token
        eager.pos.add_(1)
    for got, want in zip(loop.model.layers, eager.model.layers):
        assert rel_err(got.attn.k_cache, want.attn.k_cache) <= 3e-2
