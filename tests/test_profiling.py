"""Per-instruction profiles (mkcompiler/tools/profiling.py) on the CPU: a reference-VM profile of a
one-layer Llama decode step (split-K and split-KV forced, so every tile kind shows up) written
as a Chrome trace, a Gantt PNG and a text summary; bytes and FLOPs per instruction."""

import json
import math

import numpy as np
import pytest
import torch

import mkcompiler
from examples.factories import transformer_block
from mkcompiler.ir.layout import Field
from mkcompiler.tools.profiling import END, FETCH, READY, WORKER, Profile, instruction_work, profile_vm
from mkcompiler.vm import run_queue

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compiled():
    model, inputs = transformer_block()
    mk = mkcompiler.compile(model, inputs, split_k=2, split_kv=2)
    return model, inputs, mk


@pytest.fixture(scope="module")
def vm_profile(compiled):
    _, inputs, mk = compiled
    return profile_vm(mk, *inputs, seed=3)


def kinds_of(mk) -> set[str]:
    return {mk.queue.opcode_keys[o][0] for o in mk.queue.rows[:, Field.OPCODE].tolist()}


def test_vm_profile_stamps_every_instruction_in_order(compiled, vm_profile):
    model, inputs, mk = compiled
    s = vm_profile.stamps
    assert s.shape == (len(mk.queue), 4) and vm_profile.unit == "ns" and vm_profile.source == "vm"
    assert (s >= 0).all(), "every instruction has all four stamps"
    assert (s[:, FETCH] <= s[:, READY]).all() and (s[:, READY] <= s[:, END]).all()
    assert set(s[:, WORKER].tolist()) <= set(range(mk.num_workers))
    # The VM runs one instruction at a time: ready->end intervals never overlap.
    by_ready = np.argsort(s[:, READY])
    assert (s[by_ready[1:], READY] >= s[by_ready[:-1], END]).all()
    # Profiling changes nothing: the VM computed the model's outputs.
    ref = model(*inputs)
    torch.testing.assert_close(mk.outputs(), ref, rtol=1e-4, atol=1e-4)


def test_trace_has_one_event_per_instruction(vm_profile, tmp_path):
    q = vm_profile.queue
    path = vm_profile.trace(str(tmp_path / "sub" / "trace.json"))
    doc = json.loads(open(path).read())
    events = doc["traceEvents"]
    ops = [e for e in events if e["ph"] == "X" and e.get("cat") != "wait"]
    waits = [e for e in events if e["ph"] == "X" and e.get("cat") == "wait"]
    assert len(ops) == len(q)
    assert sorted(e["args"]["instruction"] for e in ops) == list(range(len(q)))
    assert all(e["ts"] >= 0 and e["dur"] >= 0 for e in ops + waits)
    assert min(e["ts"] for e in ops + waits) == 0  # relative to the earliest fetch
    s = vm_profile.stamps
    # A wait starts at the fetch, or at the worker's previous end when it fetched ahead (Profile._times).
    _, _, waiting_from, ready, _, _ = vm_profile._times()
    assert (waiting_from >= s[:, FETCH] - s[vm_profile.ran(), FETCH].min()).all()
    for e in ops:
        i = e["args"]["instruction"]
        assert e["name"] == q.opcode_name(i) and e["args"]["tile"] == q.descs[i]
        assert e["tid"] == s[i, WORKER]
        assert e["dur"] == pytest.approx((s[i, END] - s[i, READY]) / 1e3, abs=2e-3)
        assert e["args"]["wait"] == pytest.approx((ready[i] - waiting_from[i]) / 1e3, abs=2e-3)
    # A wait event per instruction that waited, ending where the instruction's event starts.
    start = {e["args"]["instruction"]: e["ts"] for e in ops}
    assert {w["args"]["instruction"] for w in waits} == set(np.nonzero(ready > waiting_from)[0].tolist())
    assert all(
        w["name"] == "wait" and w["ts"] + w["dur"] == pytest.approx(start[w["args"]["instruction"]], abs=2e-3)
        for w in waits
    )
    # One named track per worker used, and nothing on other tracks.
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    used = set(s[:, WORKER].tolist())
    assert set(names) == used == {e["tid"] for e in ops}
    assert all(names[w] == f"worker {w}" for w in used)
    assert len({e["pid"] for e in events}) == 1
    nbytes, flops = instruction_work(vm_profile.compilation)
    assert [e["args"]["bytes"] for e in sorted(ops, key=lambda e: e["args"]["instruction"])] == nbytes.astype(
        int
    ).tolist()
    assert doc["otherData"]["missing_instructions"] == []


def test_gantt_writes_a_png(vm_profile, tmp_path):
    path = vm_profile.gantt(str(tmp_path / "gantt.png"))
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000


def test_summary_covers_every_op_kind(compiled, vm_profile):
    _, _, mk = compiled
    text = vm_profile.summary(bandwidth=3.35e12, flops=989e12)
    kinds = kinds_of(mk)
    assert {"matmul", "attention", "attention_combine", "elementwise", "scatter", "embedding"} <= kinds
    lines = text.splitlines()
    for kind in kinds:
        row = next((ln for ln in lines if ln.split() and ln.split()[0] == kind), None)
        assert row is not None, f"no summary row for {kind}:\n{text}"
        count = int(row.split()[1])
        assert count == sum(k == kind for k in vm_profile.kinds()), row
    for needle in ("total span", "B/s wall", "%BW wall", "%FLOP wall", "per worker", "waiting", "idle gaps"):
        assert needle in text, needle
    assert "never ran" not in text


def test_instruction_work_counts_matmul_and_attention_flops(compiled):
    _, _, mk = compiled
    nbytes, flops = instruction_work(mk.compilation)
    assert nbytes.shape == flops.shape == (len(mk.queue),)
    assert (nbytes > 0).all() and (flops >= 0).all()
    kinds = np.array([mk.queue.opcode_keys[o][0] for o in mk.queue.rows[:, Field.OPCODE]])
    want_mm = want_attn = 0.0
    for op in mk.graph.ops:
        if op.kind == "matmul":  # split-K: the tiles' K chunks add up to the whole K
            a, b = op.inputs[:2]  # A (or, computed, its first input: same shape), B
            want_mm += 2.0 * a.shape[0] * b.shape[1] * a.shape[1]
            assert op.outputs[0].rank == 3, "split_k=2 should have split every matmul"
        elif op.kind == "attention":  # decode: 1 query row per head over every key (masked or not)
            q, k, v, _ = op.inputs
            want_attn += 2.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * (q.shape[3] + v.shape[3])
    assert flops[kinds == "matmul"].sum() == want_mm
    assert flops[kinds == "attention"].sum() == want_attn
    assert flops[(kinds != "matmul") & (kinds != "attention")].sum() == 0
    # Every weight byte is read once by the matmuls (plus activations).
    weights = sum(
        p.numel() * p.element_size()
        for n, p in compiled[0].named_parameters()
        if n.endswith(".weight") and p.dim() == 2
    )
    embed = compiled[0].embed.weight
    assert nbytes[kinds == "matmul"].sum() >= weights - embed.numel() * embed.element_size()
    # The embedding reads one row per token, not the whole table.
    assert nbytes[kinds == "embedding"].sum() < embed.numel() * embed.element_size() / 10


def test_missing_instructions_and_ticks(vm_profile, tmp_path):
    stamps = vm_profile.stamps.copy()
    stamps[:, FETCH:] -= stamps[:, FETCH:].min()
    stamps[:, FETCH:] //= 1000  # pretend logical ticks
    stamps[3] = -1  # never ran
    p = Profile(vm_profile.queue, stamps, "tick", "interpreter", "test", vm_profile.compilation)
    assert p.missing() == [3]
    text = p.summary(bandwidth=1e12)
    assert "1 instructions never ran" in text and " 3 (" in text
    assert "ticks" in text and "B/s" not in text
    doc = json.loads(open(p.trace(str(tmp_path / "t.json"))).read())
    ops = [e for e in doc["traceEvents"] if e["ph"] == "X" and e.get("cat") != "wait"]
    assert len(ops) == len(stamps) - 1 and 3 not in {e["args"]["instruction"] for e in ops}
    assert doc["otherData"]["missing_instructions"] == [3]
    assert open(p.gantt(str(tmp_path / "g.png")), "rb").read(8) == PNG_SIGNATURE


def test_vm_observe_hook_does_not_change_the_run(compiled):
    _, _, mk = compiled
    plain = run_queue(mk.queue, lambda i: None, seed=5)
    events = []
    observed = run_queue(mk.queue, lambda i: None, seed=5, observe=lambda e, i, w: events.append((e, i, w)))
    assert observed.executed == plain.executed and observed.worker_of == plain.worker_of
    n = len(mk.queue)
    assert [e for e, _, _ in events].count("fetch") == n == [e for e, _, _ in events].count("end")
    for i in range(n):  # fetch, ready, end in that order, all on one worker
        mine = [(e, w) for e, j, w in events if j == i]
        assert [e for e, _ in mine] == ["fetch", "ready", "end"] and len({w for _, w in mine}) == 1


def test_gantt_and_trace_scale_to_a_gpu_sized_profile(vm_profile, tmp_path):
    """15000 instructions on 132 SMs: the outputs stay quick (one collection per op kind)."""
    import time

    q0 = vm_profile.queue
    n, workers = 15000, 132
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(q0), n)
    q = type(q0)(
        rows=q0.rows[pick],
        waits=q0.waits,
        views=q0.views,
        opcode_keys=q0.opcode_keys,
        opcode_names=q0.opcode_names,
        worker_begin=np.linspace(0, n, workers + 1).astype(np.int32),
        worker_order=np.arange(n, dtype=np.int32),
        descs=[q0.descs[i] for i in pick],
        num_counters=q0.num_counters,
    )
    s = np.zeros((n, 4), dtype=np.int64)
    s[:, WORKER] = rng.integers(0, workers, n)
    s[:, FETCH] = np.sort(rng.integers(0, 2_000_000, n))
    s[:, READY] = s[:, FETCH] + rng.integers(0, 3000, n)
    s[:, END] = s[:, READY] + rng.integers(100, 5000, n)
    p = Profile(q, s, "ns", "gpu", "synthetic")
    t0 = time.perf_counter()
    p.gantt(str(tmp_path / "big.png"))
    p.trace(str(tmp_path / "big.json"))
    text = p.summary()
    elapsed = time.perf_counter() - t0
    assert elapsed < 15, f"{elapsed:.1f} s"
    assert f"{n} of {n} instructions on {workers} workers" in text and "most waiting: SM " in text
    assert math.isclose(p.span(), float(s[:, END].max() - s[:, FETCH].min()))


def test_overlap_measures_communication_running_beside_other_tiles():
    """Two communication tiles (an all_reduce and an all_to_all): one half covered by a matmul on
    another worker, the other covered for 10 of its 100 ns; matmul tiles' own overlap is not
    counted."""
    from mkcompiler.ir.layout import NUM_FIELDS
    from mkcompiler.ir.queue import Queue

    kinds = [0, 1, 2, 0, 0]  # opcodes: 0 matmul, 1 all_reduce, 2 all_to_all (both communication)
    rows = np.zeros((len(kinds), NUM_FIELDS), dtype=np.int32)
    rows[:, Field.OPCODE] = kinds
    q = Queue(
        rows=rows,
        waits=np.zeros((0, 4), dtype=np.int32),
        views=np.zeros((0, 8), dtype=np.int64),
        opcode_keys=[("matmul",), ("all_reduce",), ("all_to_all",)],
        opcode_names=["matmul", "all_reduce", "all_to_all"],
        worker_begin=np.array([0, 5], dtype=np.int32),
        worker_order=np.arange(5, dtype=np.int32),
        descs=["mm", "ar", "a2a", "mm", "mm"],
        num_counters=0,
    )
    s = np.array(
        [[0, 0, 0, 100], [1, 40, 50, 150], [2, 200, 200, 300], [0, 290, 290, 400], [3, 350, 360, 380]],
        dtype=np.int64,
    )
    p = Profile(q, s, "ns", "gpu", "synthetic")
    got = p.overlap()
    assert got["instructions"] == 2 and got["busy"] == 200.0
    assert got["overlapped"] == 60.0 and math.isclose(got["share"], 0.3)
    assert "communication: 2 tiles busy" in p.summary() and "30.0% of it while other tiles ran" in p.summary()
    assert p.overlap(("attention",)) is None
    assert p.overlap(("matmul",))["overlapped"] == 60.0  # the matmuls beside the all_reduces
