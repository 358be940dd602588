"""examples/llama.py in its two spellings (LlamaConfig.spelling): "written" spells the RMSNorm,
RoPE and attention out as much model code does (issue 19). Both are the same model (same
weights, same logits in eager), and their decode step and prefill compile to the same structure:
the same op kinds, instruction count and dependent stages (passes/canonicalize.py,
passes/canon_attention.py). Tiny config, fp32, in the interpreter; caches start random."""

import copy
import functools
import sys
from pathlib import Path

import pytest
import torch

import mkcompiler
from tests.helpers import op_structure as structure
from tests.helpers import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is not an installed package
from examples.llama import GreedyLoop, random_llama  # noqa: E402

PROMPT = 8
SEED = 3  # the weights: the same for both spellings (the same parameters, in the same order)


def model(spelling: str):
    m = random_llama("tiny", dtype=torch.float32, seed=SEED, spelling=spelling)
    g = torch.Generator().manual_seed(1)
    for layer in m.layers:
        for cache in (layer.attn.k_cache, layer.attn.v_cache):
            cache.copy_(torch.randn(cache.shape, generator=g))
    return m


def step_inputs(step: str, seed: int):
    """(tokens, positions) of a prefill from position 0 or of one decode token at a later one."""
    g = torch.Generator().manual_seed(seed)
    if step == "prefill":
        return torch.randint(0, 256, (1, PROMPT), generator=g), torch.arange(PROMPT)
    return torch.randint(0, 256, (1, 1), generator=g), torch.tensor([PROMPT + seed % 20])


@functools.cache
def compiled(spelling: str, step: str):
    m = model(spelling)
    return m, mkcompiler.compile(m, step_inputs(step, 0), cache=False)


def test_the_spellings_are_one_model():
    """Written out, the layer computes what the canonical one does: eager logits agree (so the
    structure test below compares two spellings of one computation, not two models)."""
    tokens, pos = step_inputs("prefill", 5)
    written, canonical = model("written"), model("canonical")
    assert rel_err(written(tokens, pos), canonical(tokens, pos)) <= 1e-5
    with pytest.raises(ValueError, match="spelling"):
        random_llama("tiny", spelling="interleaved")


@pytest.mark.parametrize("step", ["decode", "prefill"])
def test_written_compiles_like_canonical_and_matches_eager(step):
    _, canonical = compiled("canonical", step)
    m, mk = compiled("written", step)
    kinds, rows, stages = structure(mk)
    assert kinds["attention"] == m.c.n_layers and kinds["softmax"] == 0 and kinds["norm"] == 0
    assert (kinds, rows, stages) == structure(canonical)
    ref = copy.deepcopy(m)
    for seed in (7, 11):  # fresh tokens and positions, the same megakernel
        tokens, pos = step_inputs(step, seed)
        mk.poison()
        assert rel_err(mk(tokens, pos), ref(tokens, pos)) <= 1e-4
        for a, b in zip(m.layers, ref.layers):  # the KV caches: the new slots and nothing else
            assert rel_err(a.attn.k_cache, b.attn.k_cache) <= 1e-5
            assert rel_err(a.attn.v_cache, b.attn.v_cache) <= 1e-5


def greedy_tokens(m, prompt, n: int) -> list[int]:
    tok, pos, out = m(prompt, torch.arange(PROMPT))[:, -1].argmax(-1, keepdim=True), PROMPT, []
    for i in range(n):
        tok = m(tok, torch.tensor([pos + i]))[:, -1].argmax(-1, keepdim=True)
        out.append(tok.item())
    return out


def test_greedy_loop_of_the_written_spelling_gives_eager_tokens():
    """GreedyLoop (decode steps as launches only) over the written spelling: eager's greedy
    tokens, which are the canonical spelling's too."""
    m = model("written")
    want = greedy_tokens(copy.deepcopy(m), step_inputs("prefill", 2)[0], 6)
    assert want == greedy_tokens(model("canonical"), step_inputs("prefill", 2)[0], 6)
    prompt, pos = step_inputs("prefill", 2)
    prefill = mkcompiler.compile(m, (prompt, pos), cache=False)
    loop = GreedyLoop(m, 1, 6)
    step = mkcompiler.compile(loop, (), cache=False)
    loop.start(prefill(prompt, pos)[:, -1].argmax(-1, keepdim=True), PROMPT)
    for _ in range(6):
        step.launch()
    step.check()
    assert loop.generated[0].tolist() == want
