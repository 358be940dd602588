"""What one serving step compiles to (mkcompiler/serve), fp32 on the CPU:
- only the sampled rows reach the LM head: the step gathers them (logits_to_keep, an index
  along the token dim, ops/embedding.py) before it, so its matmul has M = 1 + B rows;
- coarse buckets for megakernels: a run over mixed lengths compiles few distinct steps, every
  one with the longest page table, and its tokens still equal eager's;
- our own Llama (examples/llama.py, an attention function in place of its cache) is served like
  a Hugging Face model: greedy tokens equal each request generated alone by eager.
Compiled kernels run in Triton's interpreter, and the reference VM beside them."""

import os
import sys

import pytest
import torch
from helpers import rel_err

import mkcompiler
from mkcompiler.serve import LLM, Engine, EngineConfig, SamplingParams
from mkcompiler.serve.batch import Buckets, build_step, padding_step
from mkcompiler.vm import run_megakernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.llama import random_llama  # noqa: E402

MK_OPTIONS = dict(matmul_tile=(16, 128, 64), elementwise_block=1024, row_block=8)  # as tests/test_serve.py


# ---- indexing along any dim: one gather (an embedding op) ----


class Index(torch.nn.Module):
    def __init__(self, dim: int, select: bool = False):
        super().__init__()
        self.dim, self.select = dim, select

    def forward(self, x, index):
        if self.select:
            return x.index_select(self.dim, index) * 2.0
        return x[(slice(None),) * self.dim + (index,)] * 2.0


INDEXING = {  # name: (dim, index_select, x shape, index shape, a copy of x or of the result needed)
    "rows of a batch of one (hidden[:, rows])": (1, False, (1, 9, 16), (4,), False),
    "rows of a batch of two": (1, False, (2, 9, 16), (4,), True),
    "a 2-D index on dim 1": (1, False, (1, 9, 8), (2, 3), False),
    "the last dim": (2, False, (2, 3, 9), (5,), False),
    "index_select on dim 1": (1, True, (3, 9, 8), (4,), True),
    "dim 0 of a 3-D tensor": (0, False, (9, 3, 8), (6,), False),
}


@pytest.mark.parametrize("case", list(INDEXING))
def test_indexing_along_any_dim_is_one_gather(case):
    """Kernel and VM against eager on fresh inputs (negative ids count from the end), tiles of 2
    rows; a copy only where the dims around the indexed one cannot be merged."""
    dim, select, x_shape, index_shape, copies = INDEXING[case]
    model = Index(dim, select)
    n = x_shape[dim]
    mk = mkcompiler.compile(model, (torch.randn(x_shape), torch.zeros(index_shape, dtype=torch.long)), row_block=2)
    kinds = [op.kind for op in mk.graph.ops]
    assert kinds.count("embedding") == 1 and (len(kinds) > 2) == copies, kinds
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(x_shape, generator=gen)
    index = torch.randint(0 if select else -n, n, index_shape, generator=gen)
    want = model(x, index)
    mk.poison()
    assert rel_err(mk(x, index), want) == 0
    mk.poison()
    assert rel_err(run_megakernel(mk, x, index, seed=1)[0], want) == 0


# ---- the LM head sees the sampled rows only ----


def tiny_hf():
    pytest.importorskip("transformers", reason="transformers is not installed")
    from mkcompiler.frontend.hf import random_model

    return random_model("llama", seed=1)


MODELS = {"hf llama": tiny_hf, "our llama": lambda: random_llama("tiny", seed=3).eval()}


def alone(model, prompt, n):
    """Greedy tokens of `prompt` by the eager model alone: a full forward per token, no cache
    (our Llama writes its static cache, but each forward rewrites every slot it reads)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids])
            logits = model(x, torch.arange(len(ids))) if hasattr(model, "c") else model(input_ids=x).logits
            out.append(int(logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


def prompts(seed, lengths, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def lm_head_rows(mk, vocab_size: int) -> int:
    """M of the compiled step's LM head: its last matmul (it writes the logits, vocab_size columns)."""
    head = [op for op in mk.graph.ops if op.kind == "matmul"][-1]
    assert head.outputs[0].shape[-1] == vocab_size
    return head.outputs[0].shape[0]


def check_lm_heads(engine: Engine) -> None:
    """Every compiled step's LM head matmul has M = 1 + B (the sampled rows) of its C + B rows."""
    assert engine.runner._steps
    for (c, b, _), mk in engine.runner._steps.items():
        assert lm_head_rows(mk, engine.vocab_size) == 1 + b, (c, b)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_compiled_step_sends_only_the_sampled_rows_to_the_lm_head(name):
    """A step of a 7-token chunk and 2 decode rows (T = 10 rows in every other matmul): its LM
    head matmul has 3 rows; the kernel's logits equal the eager step's."""
    model = MODELS[name]()
    engine = Engine(model, EngineConfig(max_batch_size=3, max_seq_len=16, page_size=4, max_chunk=8))
    for p in prompts(0, [3, 2, 7], engine.vocab_size):
        engine.add_request(p, SamplingParams(4))
    engine.step(), engine.step()  # two sequences decoding, the third prompt waiting
    step = build_step(engine.scheduler.schedule(), engine.pages, engine.buckets, engine.vocab_size, engine.device)
    c, b, _ = step.inputs.shape_key
    assert (c, b) == (8, 2)
    pools = [t.clone() for t in engine.lm.buffers()]
    want = engine.lm(*step.inputs)
    for t, saved in zip(engine.lm.buffers(), pools):
        t.copy_(saved)  # the eager step appended its keys and values: the kernel's step appends them again
    mk = mkcompiler.compile(engine.lm, tuple(step.inputs), **MK_OPTIONS)
    assert lm_head_rows(mk, engine.vocab_size) == 1 + b
    assert max(op.outputs[0].shape[0] for op in mk.graph.ops if op.kind == "matmul") == c + b
    assert rel_err(mk(*step.inputs), want) <= 1e-5


# ---- bucket policies ----


def test_coarse_buckets():
    assert Buckets.coarse(256, 64, 128) == Buckets((1, 4, 16, 64, 256), (1, 4, 16, 64), (128,))
    assert Buckets.coarse(256, 64, 128).shapes == 20 < Buckets.powers_of_two(256, 64, 128).shapes == 504
    assert Buckets.coarse(8, 3, 5).fit(0, 2, 1) == (1, 3, 5)  # a decode-only step: one padding chunk row
    assert EngineConfig(backend="mkcompiler").bucket_policy == "coarse"
    assert EngineConfig(backend="torch.compile").bucket_policy == "powers_of_two"
    with pytest.raises(ValueError, match="buckets must be one of"):
        Buckets.of("exact", 8, 3, 5)


MIXED = dict(max_batch_size=4, max_seq_len=24, page_size=4, max_chunk=8)
MIXED_LENGTHS = [5, 13, 1, 9, 3, 16, 7, 2]


def shapes_of_a_mixed_run(model, buckets, backend="eager", options=None):
    """8 requests of 1..16 tokens, 4 decoding at once, chunks of 8, 1..6 new tokens each: the
    engine, its outputs and the prompts."""
    engine = Engine(model, EngineConfig(**MIXED, backend=backend, buckets=buckets), options)
    ps = prompts(7, MIXED_LENGTHS, engine.vocab_size)
    params = [SamplingParams(max_new_tokens=1 + i % 6) for i in range(len(ps))]
    ids = [engine.add_request(p, sp) for p, sp in zip(ps, params)]
    while engine.has_unfinished():
        engine.step()
    return engine, [engine.output(i) for i in ids], ps, params


def test_coarse_buckets_make_few_step_shapes_and_the_same_tokens():
    """The same run under both policies (eager steps; each distinct shape would be one compile):
    coarse has at most len(chunk sizes) x len(batch sizes) shapes, all with the longest page
    table, fewer than powers of two; the tokens equal each request alone."""
    model = random_llama("tiny", seed=4).eval()
    coarse, outs, ps, params = shapes_of_a_mixed_run(model, "coarse")
    fine, fine_outs, _, _ = shapes_of_a_mixed_run(model, "powers_of_two")
    shapes = set(coarse.runner._steps)
    assert len(shapes) <= coarse.buckets.shapes == 3 * 2
    assert {p for _, _, p in shapes} == {coarse.config.pages_per_sequence}
    print(f"step shapes: coarse {sorted(shapes)}, powers of two {sorted(fine.runner._steps)}")
    assert len(shapes) < len(fine.runner._steps)
    assert outs == fine_outs == [alone(model, p, sp.max_new_tokens) for p, sp in zip(ps, params)]


def test_precompile_runs_every_shape_and_touches_no_live_page():
    """precompile() mid-run (eager steps: the runner still records each shape it ran) runs every
    shape of the grid; the pools outside the scratch page are unchanged, and every request still
    equals itself alone."""
    model = random_llama("tiny", seed=5).eval()
    engine = Engine(model, EngineConfig(max_batch_size=3, max_seq_len=16, page_size=4, max_chunk=8, buckets="coarse"))
    ps = prompts(8, [6, 3, 10], engine.vocab_size)
    ids = [engine.add_request(p, SamplingParams(5)) for p in ps]
    engine.step(), engine.step()
    live = [t[1:].clone() for t in engine.lm.buffers()]  # page 0 is the scratch page
    reported = []
    assert engine.precompile(lambda shape, seconds: reported.append((shape, seconds))) == 0  # eager: no compile
    assert [shape for shape, _ in reported] == engine.buckets.grid() and all(s >= 0 for _, s in reported)
    step = padding_step((2, 3, 4), engine.device)
    assert len({t.data_ptr() for t in step}) == len(step)  # megakernels refuse inputs sharing memory
    assert set(engine.runner._steps) == set(engine.buckets.grid()) and len(engine.buckets.grid()) == 3 * 2
    assert all(torch.equal(t[1:], saved) for t, saved in zip(engine.lm.buffers(), live))
    while engine.has_unfinished():
        engine.step()
    assert [engine.output(i) for i in ids] == [alone(model, p, 5) for p in ps]


# ---- our Llama ----


@pytest.mark.parametrize("spelling", ["canonical", "written"])
def test_our_llama_greedy_equals_each_request_alone_with_preemption(spelling):
    """examples/llama.Llama through its attention function: 5 requests of 1..21 tokens, 3
    decoding at once, a pool of 9 pages of 4 slots (preemptions happen)."""
    model = random_llama("tiny", seed=3, spelling=spelling).eval()
    ps = prompts(0, [5, 21, 1, 12, 9], 256)
    llm = LLM(model, max_batch_size=3, max_seq_len=32, page_size=4, num_pages=9, max_chunk=8)
    assert llm.engine.vocab_size == 256 and llm.engine.lm.num_layers == 2
    outs = llm.generate(ps, SamplingParams(max_new_tokens=6))
    assert llm.engine.scheduler.preemptions > 0
    assert llm.engine.pages.num_free == llm.engine.pages.capacity
    assert outs == [alone(model, p, 6) for p in ps]


def test_models_without_an_attention_function_are_refused():
    class NoAttentionArgument(torch.nn.Module):
        def forward(self, tokens, positions, logits_to_keep=None):
            return tokens

    for model in (torch.nn.Linear(2, 2), NoAttentionArgument()):
        with pytest.raises(TypeError, match="attention=fn, logits_to_keep=rows"):
            LLM(model)


def test_our_llama_megakernel_steps_are_few_and_equal_eager():
    """backend='mkcompiler' (coarse buckets by default) over the mixed run: at most
    3 x 2 compiles, each LM head of 1 + B rows, the tokens of each request alone."""
    model = random_llama("tiny", seed=4).eval()
    engine, outs, ps, params = shapes_of_a_mixed_run(model, None, "mkcompiler", MK_OPTIONS)
    assert engine.buckets == Buckets((1, 2, 8), (1, 4), (6,))
    assert 1 < engine.runner.compiles <= engine.buckets.shapes
    print(f"{engine.runner.compiles} compiles for {engine.steps} steps: {sorted(engine.runner._steps)}")
    check_lm_heads(engine)
    assert outs == [alone(model, p, sp.max_new_tokens) for p, sp in zip(ps, params)]
