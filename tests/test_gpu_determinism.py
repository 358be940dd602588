"""Deterministic by default: the same inputs and the same megakernel give bitwise the same
outputs on every launch, whatever order the workers fetch, wait and finish in.

Why nothing depends on arrival order (the audit of issue 22):
- split-K (passes/split_k.py): each K chunk writes its fp32 partial sums to a [S, M, N] buffer
  of its own; an elementwise op adds them in chunk order. No float atomics.
- split-KV (passes/split_kv.py): each key chunk writes its unnormalised output and (max, sum)
  to slots of its own; attention_combine_rows merges the chunks in chunk order.
- counters and the dynamic queue head are integer atomics: they order work, no value reads them.
  The error record and the profiler's clock are the only other atomics.
- every tile is a function of its inputs alone (not of the worker that runs it): row sweeps,
  K loops and folded-norm statistics (passes/fuse_norm.py) run in a fixed order inside a tile.
- tensor-parallel all_reduce tiles sum the ranks in rank order (ops/comm.py).
Order-dependent by nature, as in eager PyTorch: index_put / index_copy with repeated indices
(two tiles write one slot; which one lands last is unspecified, in eager too).

GPU (pytest -m gpu): the Llama-3.2-1B decode step (random bf16 weights, split-K matvecs and
split-KV attention on one worker per SM) launched 1,000 times per schedule, every output and the
KV-cache slot it writes compared with the first bitwise, static against dynamic too; the greedy
loop (examples/llama.GreedyLoop) run three times from the same state gives the same tokens and
the same caches. MKCOMPILER_DETERMINISM_LAUNCHES / _LAYERS change the count and the depth.
CPU: the reference VM in random tile orders, and the interpreted kernel with its workers as
concurrent threads (threaded_interp), give the same bits on a tiny Llama with forced splits.
"""

import os

import pytest
import torch
from helpers import rel_err
from mkcompiler.ops.registry import FAMILIES

import mkcompiler
from examples.llama import GreedyLoop, fill_caches, random_llama
from mkcompiler.backends.triton import threaded_interp
from mkcompiler.vm import run_megakernel

LAUNCHES = int(os.environ.get("MKCOMPILER_DETERMINISM_LAUNCHES", "1000"))
LAYERS = int(os.environ.get("MKCOMPILER_DETERMINISM_LAYERS", "16"))  # Llama-3.2-1B has 16
BF16_TOL = 5e-2  # bf16 logits against eager bf16 (benchmarks/decode_latency.py's TOL)
# Pass invariant checks off: they are other tests' subject, here they would only lengthen three 1B compiles.
OPTIONS = dict(debug=0)
INTERPRETS = os.environ.get("TRITON_INTERPRET") == "1"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (-0.0 and 0.0 differ; NaN equals its own bits)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def llama_1b(max_seq_len: int):
    """Llama-3.2-1B shapes, random bf16 weights, KV caches of random values (as decode_latency.py)."""
    model = random_llama("llama-3.2-1b", dtype=torch.bfloat16, device="cuda", n_layers=LAYERS, max_seq_len=max_seq_len)
    fill_caches(model.eval())
    return model


def splits_of(mk) -> tuple[int, int]:
    """(matmuls split over K, attention combines): what makes arrival order matter at all."""
    ops = mk.graph.ops
    return (
        sum(op.kind == "matmul" and FAMILIES["matmul"].splits(op) > 1 for op in ops),
        sum(op.kind == "attention_combine" for op in ops),
    )


def check_launches(model, args, slot: int, launches: int, want, tol: float, **options) -> torch.Tensor:
    """Compile and launch `launches` times on the same inputs: every output, and the KV-cache
    slot `slot` the step writes, bitwise equal to the first launch's; the first within `tol` of
    eager's `want`. Returns the first output."""
    mk = mkcompiler.compile(model, args, **options)
    split_k, combines = splits_of(mk)
    assert split_k > 0 and combines > 0, (split_k, combines)  # the paths this test is about
    first = mk(*args)
    written = [layer.attn.k_cache[:, :, slot].clone() for layer in model.layers]
    assert rel_err(first, want) <= tol
    differ = [i for i in range(1, launches) if not same_bits(mk(*args), first)]
    assert not differ, f"{len(differ)} of {launches} launches differ from the first: {differ[:10]}"
    assert all(same_bits(layer.attn.k_cache[:, :, slot], w) for layer, w in zip(model.layers, written))
    print(
        f"\n{mk.settings.schedule}: {launches} launches bitwise equal ({mk.num_workers} workers, {split_k} split-K "
        f"matmuls, {combines} split-KV combines, {len(mk.queue)} instructions)"
    )
    return first


def greedy_runs(model, start: torch.Tensor, pos: int, new_tokens: int, runs: int, **options) -> torch.Tensor:
    """examples/llama.GreedyLoop compiled once and run `runs` times from the same caches and
    token: the same tokens and the same caches every time. Returns the tokens."""
    caches = [(layer.attn.k_cache.clone(), layer.attn.v_cache.clone()) for layer in model.layers]
    loop = GreedyLoop(model, batch=start.shape[0], max_new=new_tokens)
    mk = mkcompiler.compile(loop, (), **options)
    results = []
    for _ in range(runs):
        for layer, (k, v) in zip(model.layers, caches):
            layer.attn.k_cache.copy_(k)
            layer.attn.v_cache.copy_(v)
        loop.generated.zero_()
        loop.start(start, pos)
        for _ in range(new_tokens):
            mk.launch()
        mk.check()
        assert int(loop.step.item()) == new_tokens
        results.append((loop.generated.clone(), [layer.attn.k_cache.clone() for layer in model.layers]))
    tokens, kv = results[0]
    for i, (t, k) in enumerate(results[1:], 1):
        assert torch.equal(t, tokens), f"run {i}: {t.tolist()} != {tokens.tolist()}"
        assert all(same_bits(a, b) for a, b in zip(k, kv)), f"run {i}: KV caches differ"
    print(f"\n{runs} runs of {new_tokens} greedy tokens, the same tokens and caches: {tokens[0].tolist()}")
    return tokens


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_decode_step_gives_the_same_bits_on_every_launch():
    model = llama_1b(max_seq_len=1024)
    tok, pos = torch.tensor([[1234]], device="cuda"), torch.tensor([700], device="cuda")
    with torch.no_grad():
        want = model(tok, pos)
    static = check_launches(model, (tok, pos), 700, LAUNCHES, want, BF16_TOL, schedule="static", **OPTIONS)
    dynamic = check_launches(model, (tok, pos), 700, LAUNCHES, want, BF16_TOL, schedule="dynamic", **OPTIONS)
    assert same_bits(static, dynamic)  # the same tiles in another order: the same bits


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_greedy_loop_generates_the_same_tokens_on_every_run():
    model = llama_1b(max_seq_len=256)
    greedy_runs(model, torch.tensor([[42]], device="cuda"), 100, new_tokens=32, runs=3, **OPTIONS)


# ---- the same properties on the CPU ----


def tiny_decode():
    """A tiny fp32 Llama decode step with split-K and split-KV forced, on four workers."""
    model = random_llama("tiny", dtype=torch.float32, seed=1)
    fill_caches(model)
    return model, (torch.tensor([[17]]), torch.tensor([40]))


SPLIT = dict(split_k=2, split_kv=4, num_workers=4)


def test_reference_vm_gives_the_same_bits_in_any_tile_order():
    model, args = tiny_decode()
    mk = mkcompiler.compile(model, args, **SPLIT)
    assert all(splits_of(mk))
    first, _ = run_megakernel(mk, *args, seed=0)
    for seed in range(1, 6):  # random ready-tile orders
        out, _ = run_megakernel(mk, *args, seed=seed)
        assert same_bits(out, first), seed
    with torch.no_grad():
        assert rel_err(first, model(*args)) <= 1e-4


interpreter_only = pytest.mark.skipif(not INTERPRETS, reason="runs the kernel in the Triton interpreter")


@interpreter_only
def test_interpreted_kernel_gives_the_same_bits_in_any_worker_order():
    """Dynamic (programs one after another) and static with each worker a thread (threaded_interp:
    the workers really interleave) give the same bits, launch after launch."""
    model, args = tiny_decode()
    with torch.no_grad():
        want = model(*args)
    first = check_launches(model, args, 40, 2, want, 1e-4, schedule="dynamic", **SPLIT)
    with threaded_interp.threaded():
        assert same_bits(check_launches(model, args, 40, 2, want, 1e-4, schedule="static", **SPLIT), first)


@interpreter_only
def test_interpreted_greedy_loop_generates_the_same_tokens_on_every_run():
    model, _ = tiny_decode()
    tokens = greedy_runs(model, torch.tensor([[17]]), 40, new_tokens=2, runs=2, split_kv=4, num_workers=4)
    assert tokens.shape == (1, 2)
