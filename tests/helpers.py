"""Shared test helpers: relative error against a high-precision reference, poisoned runs."""

import torch
import torch.utils._pytree as pytree

import mkcompiler

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
# Two splits forced (small test models' K is too short for split_k to choose any).
FOLDED = dict(split_k=2)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere (an unwritten, poisoned tile) fails."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def reference(model, inputs):
    """Eager model run in float64 (a copy), outputs cast back to the model's dtypes."""
    import copy

    m64 = copy.deepcopy(model).double()
    ins = [x.double() if x.is_floating_point() else x for x in inputs]
    return m64(*ins)


def compile_and_check(model, inputs, dtype, tol=None, **options):
    """Compile, poison every intermediate, run, and compare each output with a float64 eager run."""
    mk = mkcompiler.compile(model, tuple(inputs), **options)
    mk.poison()
    out = mk(*inputs)
    ref = reference(model, inputs)
    tol = tol or TOL[dtype]
    for o, r in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref)):
        assert o.shape == r.shape, (o.shape, r.shape)
        err = rel_err(o, r)
        assert err <= tol, f"relative error {err:.3g} > {tol:g}"
    return mk, out


def check_kernel_and_vm(mk, model, args, tol: float, vm_tol: float = 1e-5) -> None:
    """Interpreter and reference VM, each on poisoned intermediates, against eager (rel err <=
    tol) and each other (<= vm_tol: the VM's references are the kernel's spec). `model` must be
    a copy the runs do not share state with."""
    from mkcompiler.vm import run_megakernel

    mk.poison()
    got = mk(*args)
    want = model(*args)
    for g, w in zip(pytree.tree_leaves(got), pytree.tree_leaves(want)):
        assert rel_err(g, w) <= tol
    mk.poison()
    vm, _ = run_megakernel(mk, *args, seed=3)
    for v, g, w in zip(pytree.tree_leaves(vm), pytree.tree_leaves(got), pytree.tree_leaves(want)):
        assert rel_err(v, w) <= tol
        assert rel_err(v, g) <= vm_tol


def op_structure(mk) -> tuple:
    """(op kinds with counts, instructions, dependent stages: ops on the longest chain of ops)
    of a megakernel: what two spellings of one computation must share."""
    import functools
    from collections import Counter

    dag, ops = mk.dag, mk.graph.ops
    preds: dict[int, set] = {}
    for a, b in dag.edges:
        if dag.tasks[a].op != dag.tasks[b].op:
            preds.setdefault(dag.tasks[b].op, set()).add(dag.tasks[a].op)

    @functools.cache
    def level(o):
        return 1 + max((level(p) for p in preds.get(o, ())), default=0)

    return Counter(op.kind for op in ops), len(mk.queue.rows), max(level(o) for o in range(len(ops)))


def new_graphs(before: list) -> list:
    """The dynamo backend's CompiledGraphs made since `before` (a compiled_graphs() list)."""
    from mkcompiler import dynamo

    ids = {id(g) for g in before}
    return [g for g in dynamo.compiled_graphs() if id(g) not in ids]


def runners(graphs: list) -> list:
    """What each of these CompiledGraphs runs for its compiled shapes (Megakernel, SegmentedModel)."""
    return [r for g in graphs for r in g.compiled.values()]
