"""The plain-PyTorch Llama (examples/llama.py) end to end in the interpreter: a prefill and a
decode megakernel compiled from one model share its KV cache and match an eager copy of
the model run side by side.

The caches start with random values, not zeros: a slot that attention should mask out, or a
write that lands in the wrong slot, then changes results instead of hiding behind a zero.
Every decode step is checked to write nothing but its own slot. Intermediates are poisoned
(NaN) before every launch, so a tile a step fails to write shows up.
"""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import rel_err

import mkcompiler
from mkcompiler.ir.graph import BufferKind

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is not an installed package
from examples import generate  # noqa: E402
from examples.llama import random_llama  # noqa: E402

PROMPT = 8
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # relative error of logits vs eager (the bounds)
# bf16 caches: see test_kv_cache_matches_eager.
CACHE_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: 2e-2}


def caches(model):
    return [
        (f"layers.{i}.attn.{n}", getattr(layer.attn, n))
        for i, layer in enumerate(model.layers)
        for n in ("k_cache", "v_cache")
    ]


def randomize_caches(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _, c in caches(model):
        c.copy_(torch.randn(c.shape, generator=g))


def model_state(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def stray_writes(model, before, batch, pos):
    """Names of caches changed anywhere but slot `pos` of rows [0, batch)."""
    bad = []
    for (name, c), old in zip(caches(model), before):
        others = torch.ones(c.shape[2], dtype=torch.bool)
        others[pos] = False
        if not (torch.equal(c[:, :, others], old[:, :, others]) and torch.equal(c[batch:], old[batch:])):
            bad.append(name)
    return bad


class Run:
    """What one prefill + decode run through the megakernels recorded, beside eager."""

    def __init__(self):
        self.mk_logits, self.ref_logits, self.same_inputs = [], [], []
        self.mk_tokens, self.ref_tokens, self.stray = [], [], []


def run_decoder(model, prompt, steps, teacher_forced, **options) -> Run:
    """Compile prefill and decode from `model`, prefill `prompt` [B, S], then `steps` greedy
    decode steps. Greedy: each side feeds its own argmax; teacher-forced: both feed eager's."""
    run = Run()
    run.ref = ref = copy.deepcopy(model)
    b, s = prompt.shape
    before = {n: t.clone() for n, t in model_state(model).items()}
    pos = torch.arange(s)
    run.prefill = pre = mkcompiler.compile(model, (prompt, pos), **options)
    run.decode = dec = mkcompiler.compile(model, (prompt[:, :1], torch.tensor([s])), **options)
    run.changed_by_compile = [n for n, t in model_state(model).items() if not torch.equal(t, before[n])]

    pre.poison()
    mk_in = ref_in = prompt
    for step in range(steps + 1):
        if step:
            pos = torch.tensor([s + step - 1])
            old = [c.clone() for _, c in caches(model)]
            dec.poison()
        out = (pre if step == 0 else dec)(mk_in, pos)
        if step:
            run.stray.append(stray_writes(model, old, b, pos.item()))
        expected = ref(ref_in, pos)
        run.same_inputs.append(torch.equal(mk_in, ref_in))
        run.mk_logits.append(out)
        run.ref_logits.append(expected)
        run.mk_tokens.append(out[:, -1].argmax(-1, keepdim=True))
        run.ref_tokens.append(expected[:, -1].argmax(-1, keepdim=True))
        ref_in = run.ref_tokens[-1]
        mk_in = ref_in if teacher_forced else run.mk_tokens[-1]
    return run


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def llama_run(request):
    """fp32: greedy generation of 16 tokens (prefill + 15 decode steps), each side on its own
    tokens. bf16: teacher-forced prefill + 8 decode steps (a bf16 near-tie may flip an argmax)."""
    dtype = request.param
    model = random_llama("tiny", dtype=dtype)
    randomize_caches(model)
    prompt = torch.randint(0, model.c.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    fp32 = dtype == torch.float32
    run = run_decoder(model, prompt, steps=15 if fp32 else 8, teacher_forced=not fp32)
    run.model, run.dtype = model, dtype
    return run


def test_logits_match_eager(llama_run):
    run = llama_run
    for step, (out, ref) in enumerate(zip(run.mk_logits, run.ref_logits)):
        assert run.same_inputs[step], (
            f"step {step}: greedy tokens diverged earlier: {run.mk_tokens} vs {run.ref_tokens}"
        )
        assert out.shape == ref.shape
        err = rel_err(out, ref)
        assert err <= TOL[run.dtype], f"{'prefill' if step == 0 else f'decode step {step}'}: relative error {err:.3g}"


@pytest.mark.parametrize("llama_run", [torch.float32], indirect=True, ids=["fp32"])
def test_greedy_generation_matches_eager(llama_run):
    """fp32 only: bf16 logits differ from eager's within tolerance, so a near-tie may flip."""
    mk, ref = torch.cat(llama_run.mk_tokens, 1), torch.cat(llama_run.ref_tokens, 1)
    assert mk.shape == (1, 16)
    assert torch.equal(mk, ref), f"megakernels generated {mk.tolist()}, eager {ref.tolist()}"


def test_kv_cache_matches_eager(llama_run):
    """fp32: the caches are allclose to eager's. bf16: each cached K/V is a bf16 rounding of an
    fp32 accumulation whose order differs from eager's CPU GEMM (1-ulp flips), and later layers
    inherit the logit-level drift, so elementwise tolerances do not apply: every written
    region must be within 2e-2 relative (Frobenius) error of eager's. Either way, slots no step
    wrote (and that keep their random initial values) must be bit-identical."""
    run = llama_run
    written = PROMPT + len(run.mk_logits) - 1
    for (name, c), (_, r) in zip(caches(run.model), caches(run.ref)):
        assert torch.equal(c[:, :, written:], r[:, :, written:]), f"{name}: unwritten slots changed"
        if run.dtype == torch.float32:
            torch.testing.assert_close(c, r, **CACHE_TOL[run.dtype], msg=lambda m, name=name: f"{name}: {m}")
        else:
            err = rel_err(c[:, :, :written], r[:, :, :written])
            assert err <= CACHE_TOL[run.dtype], f"{name}: relative error {err:.3g}"


def test_decode_writes_only_its_slot(llama_run):
    for step, bad in enumerate(llama_run.stray, start=1):
        assert not bad, f"decode step {step} (position {PROMPT + step - 1}) wrote outside its slot in {bad}"


def test_compile_leaves_model_state_alone(llama_run):
    """export traces on fake tensors: compiling changes no weight or cache value, and the
    megakernels bind the module's own cache tensors (how prefill and decode share them)."""
    run = llama_run
    assert run.changed_by_compile == []
    cache_ptrs = {c.data_ptr() for _, c in caches(run.model)}
    for mk in (run.prefill, run.decode):
        state = [t for bid, t in mk.graph.params.items() if mk.graph.buffers[bid].kind == BufferKind.STATE]
        assert {t.data_ptr() for t in state} == cache_ptrs


def test_decode_step_below_max_batch():
    """batch 1 of a cache sized for 2: one decode step at an unaligned position writes slot p of
    row 0 only, reads the random history before p, masks the random slots after it."""
    model = random_llama("tiny", max_batch=2)
    randomize_caches(model)
    ref = copy.deepcopy(model)
    p = 21
    tok, pos = torch.tensor([[7]]), torch.tensor([p])
    dec = mkcompiler.compile(model, (tok, pos))
    old = [c.clone() for _, c in caches(model)]
    dec.poison()
    out = dec(tok, pos)
    expected = ref(tok, pos)
    assert stray_writes(model, old, 1, p) == []
    assert rel_err(out, expected) <= TOL[torch.float32]
    for (name, c), (_, r) in zip(caches(model), caches(ref)):
        torch.testing.assert_close(
            c[0, :, p], r[0, :, p], **CACHE_TOL[torch.float32], msg=lambda m, n=name: f"{n}: {m}"
        )


def test_batched_decode_matches_eager():
    """batch 4 (max_batch=4): two decode steps [4, 1], teacher-forced, on a random history."""
    model = random_llama("tiny", max_batch=4)
    randomize_caches(model)
    ref = copy.deepcopy(model)
    tok = torch.randint(0, model.c.vocab_size, (4, 1), generator=torch.Generator().manual_seed(3))
    dec = mkcompiler.compile(model, (tok, torch.tensor([0])))
    for p in (13, 14):
        old = [c.clone() for _, c in caches(model)]
        dec.poison()
        out = dec(tok, torch.tensor([p]))
        expected = ref(tok, torch.tensor([p]))
        assert stray_writes(model, old, 4, p) == []
        assert out.shape == (4, 1, model.c.vocab_size)
        assert rel_err(out, expected) <= TOL[torch.float32], f"position {p}"
        tok = expected[:, -1].argmax(-1, keepdim=True)
    for (name, c), (_, r) in zip(caches(model), caches(ref)):
        torch.testing.assert_close(c, r, **CACHE_TOL[torch.float32], msg=lambda m, n=name: f"{n}: {m}")


def test_state_slice_update():
    """`state[:2] += x` on a module buffer: slice_scatter of a fresh value into model state."""

    class Accumulate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("state", torch.randn(3, 4, 8))

        def forward(self, x):
            self.state[:2] += x
            return self.state.sum(-1)

    model = Accumulate()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 4, 8)
    mk = mkcompiler.compile(model, (x,))
    for _ in range(2):  # the second launch adds onto the first one's state
        mk.poison()
        assert rel_err(mk(x), ref(x)) <= TOL[torch.float32]
        torch.testing.assert_close(model.state, ref.state, rtol=1e-5, atol=1e-6)


def test_generate_script():
    lines = []
    result = generate.main(
        ["--model", "tiny", "--prompt-len", "4", "--new-tokens", "2", "--check"],
        log=lambda *a: lines.append(" ".join(map(str, a))),
    )
    assert result["ok"] and result["max_rel_err"] <= TOL[torch.float32]
    assert len(result["rel_errs"]) == 2 and result["tokens"].shape == (1, 2)
    assert result["argmax_mismatches"] == 0
    assert any("tokens/s" in line for line in lines)


# ---------------------------------------------------------------- Hugging Face checkpoints
def write_hf_checkpoint(model, directory, rope_scaling=None, tie=False):
    """`model`'s weights under Hugging Face LlamaForCausalLM names, config in transformers 4's format."""
    from safetensors.torch import save_file

    ours_to_hf = {v: k for k, v in generate.hf_names(model.c.n_layers).items()}
    tensors = {ours_to_hf[n]: p.detach().contiguous() for n, p in model.named_parameters()}
    if tie:
        del tensors["lm_head.weight"]
    c = model.c
    config = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        intermediate_size=c.hidden,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie,
        hidden_act="silu",
    )
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))


def test_load_hf_checkpoint(tmp_path):
    src = random_llama("tiny", seed=5)
    with torch.no_grad():
        src.lm_head.weight.copy_(src.embed.weight)  # as a tied checkpoint means
    scaling = dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    )
    write_hf_checkpoint(src, tmp_path, scaling, tie=True)
    c, rope = generate.read_hf_config(str(tmp_path))
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden) == (64, 2, 4, 2, 128)
    model = generate.build_model(c, torch.float32, "cpu", seed=9, inv_freq=generate.rope_inv_freq(c, rope))
    generate.load_checkpoint(model, str(tmp_path), rope["tie_word_embeddings"])
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(src.named_parameters())[name]), name
    # llama3 scaling: wavelengths under 64/4 keep their frequency, over 64/1 are divided by 8.
    plain = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
    wavelen = 2 * math.pi / plain
    assert torch.equal(model.inv_freq[wavelen < 16], plain[wavelen < 16])
    assert torch.allclose(model.inv_freq[wavelen > 64], plain[wavelen > 64] / 8)
    assert model.inv_freq.dtype == torch.float32


def test_hf_llama_matches_example_llama(tmp_path):
    """transformers' LlamaForCausalLM and our Llama loaded from its checkpoint agree (eager): the
    weight names map, and HF's q/k projections need no rotary permutation."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    scaling = dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    )
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        rope_theta=500000.0,
        rope_scaling=scaling,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.05) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    hf.save_pretrained(tmp_path)
    c, rope = generate.read_hf_config(str(tmp_path))
    c.max_seq_len = 64
    model = generate.build_model(c, torch.float32, "cpu", inv_freq=generate.rope_inv_freq(c, rope))
    generate.load_checkpoint(model, str(tmp_path), rope["tie_word_embeddings"])
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        expected = hf(tokens).logits
        steps = [model(tokens[:, :30], torch.arange(30))]  # prefill, then decode token by token
        steps += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(30, 40)]
    assert rel_err(torch.cat(steps, 1), expected) <= 1e-5


def test_greedy_loop_generates_eager_tokens_with_launches_only():
    """GreedyLoop keeps token, position and output on the device: N tokens are N launches with
    nothing else in between, and (fp32) they are eager's greedy tokens."""

    from examples.llama import GreedyLoop, random_llama

    model = random_llama("tiny", dtype=torch.float32, seed=3)
    ref = copy.deepcopy(model)
    prompt = torch.randint(0, model.c.vocab_size, (1, 6))
    pos = torch.arange(6)
    prefill = mkcompiler.compile(model, (prompt, pos))
    loop = GreedyLoop(model, 1, 10)
    step = mkcompiler.compile(loop, ())
    loop.start(prefill(prompt, pos)[:, -1].argmax(-1, keepdim=True), 6)
    for _ in range(10):
        step.launch()
    step.check()
    tok, want = ref(prompt, pos)[:, -1].argmax(-1, keepdim=True), []
    for i in range(10):
        tok = ref(tok, torch.tensor([6 + i]))[:, -1].argmax(-1, keepdim=True)
        want.append(tok.item())
    assert loop.generated[0].tolist() == want
    assert loop.pos.item() == 16 and loop.step.item() == 10
