"""The serving engine (mkcompiler/serve) on tiny random Hugging Face models, fp32, CPU: greedy
tokens of every request equal that request generated alone by the eager model (a full forward
per token, no cache), with mixed prompt lengths, prompts longer than a chunk, preemption forced
by a small page pool, and requests joining a running batch; seeded sampling draws the same
tokens however the request is batched; bad requests raise a ValueError naming them while the
others finish."""

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

from mkcompiler.frontend.hf import random_model  # noqa: E402
from mkcompiler.serve import LLM, Engine, EngineConfig, RequestError, SamplingParams  # noqa: E402

FAMILIES = {"llama": {}, "qwen3": {}, "mistral": {"sliding_window": 6}}
# Big tiles for the interpreter (few instructions per step), as tests/test_hf_models.py.
MK_OPTIONS = dict(matmul_tile=(16, 128, 64), elementwise_block=1024, row_block=8)


def alone(model, prompt, n, stop=()):
    """Greedy tokens of `prompt` by the eager model alone: a full forward per token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(out[-1])
            if out[-1] in stop:
                break
    return out


def prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_each_request_alone_with_preemption(family):
    """7 requests of 1..21 tokens, 3 decoding at once, chunks of 8, a pool of 9 pages of 4
    slots (one sequence fits, three do not): preemptions happen, every output equals eager's."""
    model = random_model(family, seed=1, **FAMILIES[family])
    ps = prompts(0, [5, 21, 1, 12, 9, 17, 3])
    llm = LLM(model, max_batch_size=3, max_seq_len=32, page_size=4, num_pages=9, max_chunk=8)
    outs = llm.generate(ps, SamplingParams(max_new_tokens=10))
    assert llm.engine.scheduler.preemptions > 0
    assert llm.engine.pages.num_free == llm.engine.pages.capacity
    for i, (p, o) in enumerate(zip(ps, outs)):
        assert o == alone(model, p, 10), f"request {i}"


def test_requests_join_a_running_batch():
    model = random_model("llama", seed=2)
    engine = Engine(model, EngineConfig(max_batch_size=4, max_seq_len=40, page_size=4, max_chunk=6))
    ps = prompts(1, [7, 3, 11, 2, 14])
    params = [SamplingParams(max_new_tokens=n) for n in (12, 5, 9, 6, 8)]
    ids = [engine.add_request(ps[i], params[i]) for i in range(2)]
    got = {}
    for step in range(40):
        if step in (3, 6, 7):  # joining while others decode (and one while a prompt is mid-prefill)
            i = len(ids)
            ids.append(engine.add_request(ps[i], params[i]))
        for rid, token in engine.step():
            got.setdefault(rid, []).append(token)
        if not engine.has_unfinished() and len(ids) == len(ps):
            break
    assert not engine.has_unfinished()
    for rid, p, sp in zip(ids, ps, params):
        assert got[rid] == engine.output(rid) == alone(model, p, sp.max_new_tokens), f"request {rid}"


def test_stop_tokens_and_max_seq_len_end_a_request():
    model = random_model("llama", seed=3)
    p = prompts(2, [6])[0]
    free_run = alone(model, p, 10)
    stop = free_run[4]
    first = free_run.index(stop)
    llm = LLM(model, max_batch_size=2, max_seq_len=12, page_size=4)
    outs = llm.generate([p, p], [SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)), SamplingParams(10)])
    assert outs[0] == free_run[: first + 1]  # the stop token is the last one returned
    assert outs[1] == free_run[: 12 - 6]  # prompt + generated never exceed max_seq_len


def test_stream_yields_every_token_in_order():
    model = random_model("llama", seed=4)
    ps = prompts(3, [4, 9, 2])
    llm = LLM(model, max_batch_size=2, max_seq_len=24, page_size=4, max_chunk=4)
    streamed = {i: [] for i in range(3)}
    for index, token in llm.stream(ps, SamplingParams(max_new_tokens=5)):
        streamed[index].append(token)
    assert [streamed[i] for i in range(3)] == [alone(model, p, 5) for p in ps]


def test_seeded_sampling_does_not_depend_on_the_batch():
    """A sampled request (temperature, top-k, top-p, a seed) draws the same tokens alone and in a
    batch with preemptions; another seed draws others."""
    model = random_model("llama", seed=5)
    ps = prompts(4, [9, 5, 13, 7])
    sp = SamplingParams(max_new_tokens=12, temperature=1.3, top_k=40, top_p=0.9, seed=1234)
    solo = LLM(model, max_batch_size=1, max_seq_len=32, page_size=4).generate([ps[0]], sp)[0]
    batched = LLM(model, max_batch_size=4, max_seq_len=32, page_size=4, num_pages=10, max_chunk=4)
    outs = batched.generate(ps, [sp] + [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s) for s in (1, 2, 3)])
    assert batched.engine.scheduler.preemptions > 0
    assert outs[0] == solo
    assert solo != alone(model, ps[0], 12)  # it did sample
    other = LLM(model, max_batch_size=1, max_seq_len=32, page_size=4).generate(
        [ps[0]], [sp.__class__(12, 1.3, 40, 0.9, 99)]
    )
    assert other[0] != solo


BAD = {
    "empty prompt": ([], SamplingParams(4), "prompt is empty"),
    "too long": (list(range(20)), SamplingParams(4), "max_seq_len 16"),
    "outside the vocabulary": ([3, 128, 5], SamplingParams(4), r"outside the vocabulary \[0, 128\): \[128\]"),
    "negative id": ([3, -1], SamplingParams(4), r"outside the vocabulary"),
    "no new tokens": ([3, 4], SamplingParams(0), "max_new_tokens must be positive"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_is_named_and_the_others_finish(case):
    model = random_model("llama", seed=6)
    prompt, params, message = BAD[case]
    good = prompts(5, [5, 3])
    llm = LLM(model, max_batch_size=2, max_seq_len=16, page_size=4)
    with pytest.raises(RequestError, match=f"^request 1: .*{message}") as err:
        llm.generate([good[0], prompt, good[1]], [SamplingParams(4), params, SamplingParams(4)])
    assert isinstance(err.value, ValueError) and list(err.value.problems) == [1]
    assert err.value.outputs == [alone(model, good[0], 4), None, alone(model, good[1], 4)]
    with pytest.raises(ValueError, match=f"^request {llm.engine._next_id}: .*{message}"):
        llm.engine.add_request(prompt, params)


def test_configurations_that_cannot_serve_are_refused():
    model = random_model("llama", seed=0)
    with pytest.raises(ValueError, match="cannot hold one max_seq_len=32 sequence"):
        LLM(model, max_batch_size=2, max_seq_len=32, page_size=4, num_pages=8)
    with pytest.raises(TypeError, match="a Hugging Face causal LM .* or a model whose forward"):
        LLM(torch.nn.Linear(2, 2))


def test_megakernel_steps_equal_eager():
    """backend='mkcompiler': every step one megakernel (interpreter), one compile per shape bucket
    (coarse buckets: the longest page table always), the LM head over the sampled rows only."""
    from test_serve_steps import check_lm_heads

    model = random_model("llama", seed=1)
    ps = prompts(6, [5, 9, 3])
    llm = LLM(model, max_batch_size=2, max_seq_len=16, page_size=4, max_chunk=8, backend="mkcompiler",
              compile_options=MK_OPTIONS)  # fmt: skip
    outs = llm.generate(ps, SamplingParams(max_new_tokens=4))
    assert outs == [alone(model, p, 4) for p in ps]
    assert 1 < llm.engine.runner.compiles < llm.engine.steps
    assert {p for _, _, p in llm.engine.runner._steps} == {llm.engine.config.pages_per_sequence}
    check_lm_heads(llm.engine)
