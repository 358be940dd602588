"""Q/K/V projections that do their own RoPE and KV-cache append (passes/split_sum.py): a split-K
matmul's last-arriving tile of a block reads the partials moved inside a head (rotate-half)
and stores the rotated values, or writes them into the cache at the runtime position (a
scatter). The decode layer loses the stage between Q/K/V and attention.

Against float64 eager on random caches, with poisoned intermediates, two positions in a row,
batch 1 and 3; no step writes outside its slot; the last arriver of a block may be any of its
split tiles (kernel: the queue reordered; VM: each split held back in turn)."""

import copy
import os

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from mkcompiler.ops.elementwise import slot_windows
from mkcompiler.passes.split_sum import _partial_read

import mkcompiler
from examples.llama import random_llama
from mkcompiler.ir import View
from mkcompiler.vm import run_megakernel
from tests.helpers import FOLDED, rel_err
from tests.test_llama import CACHE_TOL, caches, randomize_caches, stray_writes
from tests.test_split_sum import TILE, reorder_splits, run_vm_with_last, summed

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def keep_rms_norm(monkeypatch):
    from tests.helpers import keep_rms_norm_whole

    keep_rms_norm_whole(monkeypatch)


def decode(batch=1, dtype=torch.float32, tile=TILE, **options):
    model = random_llama("tiny", dtype=dtype, max_batch=batch)
    randomize_caches(model)
    ref = copy.deepcopy(model).double()
    tok = torch.randint(0, model.c.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(batch))
    mk = mkcompiler.compile(
        model, (tok, torch.tensor([0])), split_k=2, matmul_tile=tile, split_sum_in_matmul=True, cache=False, **options
    )
    return model, ref, mk, tok


def rope_matmuls(mk) -> tuple[list[int], list[int]]:
    """(ops summing with a RoPE: moved reads of their partials, ops doing a scatter)."""
    moved = [i for i, op in enumerate(mk.graph.ops) if any(r and r[1] for r in op.attrs.get("epilogue_parts", ()))]
    scatter = [i for i, op in enumerate(mk.graph.ops) if "epilogue_scatter" in op.attrs]
    return moved, scatter


def step(model, ref, mk, tok, p, batch):
    """One decode step at position p, the slot poisoned first (NaN: an append that did not
    happen shows)."""
    for _, c in caches(model):
        c[:batch, :, p] = float("nan")
    old = [c.clone() for _, c in caches(model)]
    mk.poison()
    out = mk(tok, torch.tensor([p]))
    want = ref(tok, torch.tensor([p]))
    assert stray_writes(model, old, batch, p) == []
    assert rel_err(out, want) <= TOL[out.dtype], f"position {p}"
    return want


def check_caches(model, ref, dtype):
    for (name, c), (_, r) in zip(caches(model), caches(ref)):
        tol = CACHE_TOL[torch.float32] if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(c, r.to(c.dtype), **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "batch,dtype", [(1, torch.float32), (3, torch.float32), (1, torch.bfloat16)], ids=["b1", "b3", "b1-bf16"]
)
def test_qkv_do_rope_and_cache_append_and_match_eager(batch, dtype):
    model, ref, mk, tok = decode(batch, dtype)
    moved, scatter = rope_matmuls(mk)
    layers = model.c.n_layers
    assert len(moved) == 2 * layers and len(scatter) == 2 * layers  # Q and K rotate; K and V append
    assert not [op for op in mk.graph.ops if op.kind == "scatter"]
    assert all(mk.graph.ops[i].attrs["tile"][1] % model.c.head_dim == 0 for i in moved)
    for p in (13, 14):
        want = step(model, ref, mk, tok, p, batch)
        tok = want[:, -1].argmax(-1, keepdim=True)
    check_caches(model, ref, dtype)


def test_vm_matches_with_any_split_tile_last():
    """The VM (its split tiles each recompute the block's sum, the last one leaving it) with
    K's split tiles held back in turn, then random interleavings; the slot poisoned each run."""
    model, ref, mk, tok = decode()
    _, scatter = rope_matmuls(mk)
    pos = torch.tensor([9])
    start = [c.clone() for _, c in caches(model)]
    want = ref(tok, pos)

    def fresh():
        for (_, c), old in zip(caches(model), start):
            c.copy_(old)
            c[:, :, 9] = float("nan")

    for last in range(2):
        fresh()
        run_vm_with_last(mk, (tok, pos), scatter[0], last)
        assert rel_err(mk.outputs(), want) <= TOL[torch.float32]
        check_caches(model, ref, torch.float32)
    for seed in range(3):
        fresh()
        mk.poison()
        vm, _ = run_megakernel(mk, tok, pos, seed=seed)
        assert rel_err(vm, want) <= TOL[torch.float32]
        check_caches(model, ref, torch.float32)


def test_kernel_last_arriver_of_a_head_may_be_any_split():
    """Q's and K's split tiles reversed in the queue (the interpreter runs it in order): the
    tile with the first K chunk sums and rotates, reading the other's partials."""
    model, ref, mk, tok = decode(schedule="dynamic")
    moved, _ = rope_matmuls(mk)
    for i in moved:
        assert all(order == [1, 0] for order in reorder_splits(mk, i))
    for p in (20, 21):
        want = step(model, ref, mk, tok, p, 1)
        tok = want[:, -1].argmax(-1, keepdim=True)
    check_caches(model, ref, torch.float32)


def test_a_tile_narrower_than_a_head_keeps_the_rope_apart():
    """BN = 8 < head_dim 16: a block would not hold a rotated element's partner, so Q's and K's
    sums stay ops of their own; V's append (no moved read) still goes into its matmul."""
    model, ref, mk, tok = decode(tile=(16, 8, 16))
    moved, scatter = rope_matmuls(mk)
    assert not moved and len(scatter) == model.c.n_layers  # V only
    assert len([op for op in mk.graph.ops if op.kind == "scatter"]) == model.c.n_layers  # K's
    pos = torch.tensor([30])
    for _, c in caches(model):
        c[:, :, 30] = float("nan")
    mk.poison()
    vm, _ = run_megakernel(mk, tok, pos, seed=1)  # the VM: the kernel's paths are the ones above
    assert rel_err(vm, ref(tok, pos)) <= TOL[torch.float32]
    check_caches(model, ref, torch.float32)


def test_partial_reads():
    """_partial_read: a piece in row-major order; a read moved inside its window's chunk; moved
    across a chunk, or without a window: refused."""
    m, n = 2, 64
    piece = View(0, torch.float32, (m, n), (n, 1), m * n)  # piece 1
    assert _partial_read(piece, None, m, n) == (1, 0, 1)
    lower = (1, 32, 0, 16)  # (inner, size, lo, hi): the first half of each 32-element head
    up = View(0, torch.float32, (m, n), (n, 1), 16)  # x[lin + 16]: the head's other half
    assert _partial_read(up, lower, m, n) == (0, 16, 32)
    assert _partial_read(up, None, m, n) is None  # moved everywhere: crosses heads and rows
    assert _partial_read(up, (1, 32, 8, 24), m, n) is None  # lin 16..23 + 16 leaves the head
    down = View(0, torch.float32, (m, n), (n, 1), m * n - 16)  # piece 1's x[lin - 16]
    assert _partial_read(down, (1, 32, 16, 32), m, n) == (1, -16, 32)
    assert _partial_read(down, (1, 32, 0, 32), m, n) is None  # lin 0 - 16 is in piece 0
    expr = ("op", "add", torch.float32, ("win", 0, *lower), ("in", 1))
    assert slot_windows(expr) == {0: lower}


def test_the_switch_keeps_rope_and_append_apart():
    """split_sum_rope_append=False (the A/B): Q's RoPE and the appends stay ops; O and down still
    sum themselves."""
    model, ref, mk, tok = decode(split_sum_rope_append=False)
    assert rope_matmuls(mk) == ([], [])
    assert len([op for op in mk.graph.ops if op.kind == "scatter"]) == 2 * model.c.n_layers
    assert len(summed(mk)) == 2 * model.c.n_layers + 1  # O, down; the LM head
    step(model, ref, mk, tok, 3, 1)
    check_caches(model, ref, torch.float32)


def test_hugging_face_llama_folds_too():
    """transformers' Llama (cos and sin its own inputs, RoPE through its own rotate_half): Q and
    K rotate and K and V append in the projections; two steps, logits and caches against eager."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from mkcompiler.hf import StaticCacheLM, random_model

    model = random_model("llama", torch.float32, seed=1)
    lm = StaticCacheLM(model, batch_size=1, max_cache_len=32)
    ref = StaticCacheLM(copy.deepcopy(model).double(), batch_size=1, max_cache_len=32)
    g = torch.Generator().manual_seed(5)
    for kv, rkv in zip(lm.caches(), ref.caches()):
        for t, r in zip(kv, rkv):
            t.copy_(torch.randn(t.shape, generator=g))
            r.copy_(t)
    tok = torch.randint(0, 128, (1, 1), generator=g)
    mk = mkcompiler.compile(lm, (tok, torch.tensor([4])), matmul_tile=TILE, cache=False, **FOLDED)
    moved, scatter = rope_matmuls(mk)
    layers = model.config.num_hidden_layers
    assert len(moved) == 2 * layers and len(scatter) == 2 * layers
    for p in (5, 6):
        mk.poison()
        out = mk(tok, torch.tensor([p]))
        with torch.no_grad():
            want = ref(tok, torch.tensor([p]))
        assert rel_err(out, want) <= TOL[torch.float32], f"position {p}"
    for kv, rkv in zip(lm.caches(), ref.caches()):
        for t, r in zip(kv, rkv):
            assert rel_err(t, r) <= 1e-6


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 3),
    heads=st.integers(1, 3),
    head=st.sampled_from([4, 8, 16]),
    piece=st.integers(0, 2),
    move=st.integers(-20, 20),
    lo_hi=st.tuples(st.integers(0, 16), st.integers(0, 16)),
    windowed=st.booleans(),
)
def test_partial_read_agrees_with_the_offsets(m, heads, head, piece, move, lo_hi, windowed):
    """Whatever _partial_read accepts reads, at every windowed index, the element its (s, d)
    names, inside lin's head; whatever it refuses has an index outside the piece, the head,
    or reads that are not a fixed move."""
    from mkcompiler.ops.elementwise import in_window, linear_offsets

    n = heads * head
    mn = m * n
    lo, hi = sorted(v % (head + 1) for v in lo_hi)
    win = (1, head, lo, hi) if windowed else None
    v = View(0, torch.float32, (m, n), (n, 1), piece * mn + move)
    lin = torch.arange(mn)
    if win is not None:
        lin = lin[in_window(lin, win)]
    read = _partial_read(v, win, m, n)
    if lin.numel() == 0:
        assert read is None
        return
    at = linear_offsets(v, lin)
    s, d = int(at[0]) // mn, int(at[0] - lin[0]) - (int(at[0]) // mn) * mn
    same_piece = bool((at // mn == s).all())
    in_head = bool(((lin + d) // head == lin // head).all())
    assert (read is not None) == (same_piece and (d == 0 or (win is not None and in_head))), (v, win, read)
    if read is not None:
        assert read[:2] == (s, d) and torch.equal(at, s * mn + lin + d)
        assert read[2] == (head if d else 1)


class Rotated(torch.nn.Module):
    """A split-K projection read by a rotation of each head by p (RoPE's rotate-half when p is
    half the head): y * c + cat(-y[p:], y[:p]) * s, optionally appended to a cache at pos."""

    def __init__(self, k, heads, head, p, append):
        super().__init__()
        self.shape, self.p, self.append = (1, heads, 1, head), p, append
        self.proj = torch.nn.Linear(k, heads * head, bias=False)
        self.register_buffer("c", torch.randn(head))
        self.register_buffer("s", torch.randn(head))
        self.register_buffer("cache", torch.randn(1, heads, 6, head))

    def forward(self, x, pos):
        y = self.proj(x).view(self.shape)
        z = y * self.c + torch.cat((-y[..., self.p :], y[..., : self.p]), -1) * self.s
        if not self.append:
            return z * 2.0
        self.cache[:, :, pos] = z
        return self.cache * 2.0


@settings(max_examples=int(os.environ.get("MKCOMPILER_FUZZ_ROPE", "16")), deadline=None)
@given(
    k=st.sampled_from([32, 48]),
    heads=st.integers(1, 3),
    head=st.sampled_from([8, 16]),
    p_frac=st.floats(0.05, 0.95),
    append=st.booleans(),
    bn=st.sampled_from([8, 16, 32]),
    seed=st.integers(0, 2**16),
    in_kernel=st.integers(0, 3),
)
def test_random_rotations_of_split_sums_match_eager(k, heads, head, p_frac, append, bn, seed, in_kernel):
    """Random rotations (any shift p, not only half a head), tile widths below, at and above the
    head, with and without a cache append: the VM under random interleavings, and for a quarter
    of the cases the interpreted kernel, against eager; the fold happens when a block holds
    whole heads."""
    torch.manual_seed(seed)
    p = max(1, min(head - 1, round(p_frac * head)))
    model = Rotated(k, heads, head, p, append)
    ref = copy.deepcopy(model).double()
    x, pos = torch.randn(1, k), torch.tensor([seed % 6])
    mk = mkcompiler.compile(
        model, (x, pos), split_k=2, matmul_tile=(16, bn, 16), split_sum_in_matmul=True, cache=False, num_workers=3
    )
    moved, scatter = rope_matmuls(mk)
    if bn % head:
        assert not moved  # a block would split a head
    event("rotated in the matmul" if moved else "rotated apart")
    event("appended in the matmul" if scatter else "appended apart" if append else "no append")
    start = model.cache.clone()
    want = ref(x.double(), pos)
    runs = [lambda: run_megakernel(mk, x, pos, seed=seed)[0]] + ([lambda: mk(x, pos)] if in_kernel == 0 else [])
    for run in runs:
        model.cache.copy_(start)
        model.cache[:, :, pos] = float("nan")  # an append that does not happen shows
        mk.poison()
        got = run()
        assert rel_err(got, want) <= 1e-5, (p, bn, append, bool(moved), bool(scatter))


def test_a_group_that_would_not_split_takes_wide_pairs_for_its_heads():
    """Heads of 128 (as Llama-3.1-8B's) in a Q/K/V group that would not split (its 64-row tiles
    already fill the workers): with split sums it takes BN=128 and two K chunks instead (as many
    tiles, each as big), so its RoPE and cache append move into the projections; without split
    sums it keeps (64, no split). The VM's result equals eager's."""
    shape = dict(dim=1024, n_layers=1, n_heads=8, n_kv_heads=2, hidden=1024, vocab_size=256, max_seq_len=16)
    model = random_llama("tiny", **shape)
    randomize_caches(model)
    ref = copy.deepcopy(model).double()
    tok, pos = torch.tensor([[3]]), torch.tensor([5])
    qkv = lambda mk: [op for op in mk.graph.ops if op.kind == "matmul"][:3]  # noqa: E731
    plain = mkcompiler.compile(model, (tok, pos), num_workers=24, cache=False)
    assert [(op.attrs["tile"][1], "split" in op.attrs) for op in qkv(plain)] == [(64, False)] * 3
    mk = mkcompiler.compile(model, (tok, pos), num_workers=24, split_sum_in_matmul=True, cache=False)
    assert [(op.attrs["tile"][1], op.attrs.get("split")) for op in qkv(mk)] == [(128, 2)] * 3
    moved, scatter = rope_matmuls(mk)
    assert len(moved) == 2 and len(scatter) == 2
    mk.poison()
    vm, _ = run_megakernel(mk, tok, pos, seed=2)
    assert rel_err(vm, ref(tok, pos)) <= TOL[torch.float32]
