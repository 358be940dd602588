"""Command line.

    python -m mkcompiler demo
    python -m mkcompiler ops
    python -m mkcompiler inspect MODULE:FACTORY [--workers N] [--no-offline] [--limit K]
    python -m mkcompiler profile MODULE:FACTORY [--out DIR] [--vm]

A FACTORY is a function returning (model, example_inputs) or (model, example_inputs,
compile_options); MODULE is a dotted module name (importable from the current directory or the
repository mkcompiler was installed from) or a path to a .py file (imported with its repository
root, or the top of the packages around it, on sys.path). examples/factories.py has some:
transformer_block, mlp, llama_1b_decode.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
import time

USAGE = """usage: python -m mkcompiler COMMAND ...

commands:
  demo                              compile a small model, run it, check it, show the queue and kernel
  ops                               list the ATen ops that compile into megakernels
  inspect MODULE:FACTORY [--workers N] [--no-offline] [--limit K]
                                    op graph, tiling, instruction queue, kernel source and an offline
                                    sm_90 compile's resources (registers, shared memory, spills)
  profile MODULE:FACTORY [--out DIR] [--vm]
                                    run once with per-instruction stamps (GPU; else the reference VM):
                                    writes DIR/trace.json (Perfetto) and DIR/gantt.png, prints a summary

A FACTORY returns (model, example_inputs) or (model, example_inputs, compile_options), e.g.
  python -m mkcompiler inspect examples.factories:transformer_block
`python -m mkcompiler COMMAND -h` lists a command's options."""


# ---- loading a model ----


REPO_MARKERS = ("pyproject.toml", "setup.py", ".git")


def load_factory(spec: str):
    """'pkg.module:function' or 'path/to/file.py:function' -> the function."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:FACTORY (e.g. examples.factories:mlp), got {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        module = _import_file(module_name)
    else:
        module = _import_dotted(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{module_name} has no {attr!r}") from None


def _repository_root(start: str) -> str | None:
    """The nearest directory at or above `start` holding a pyproject.toml, setup.py or .git."""
    d = os.path.abspath(start)
    while True:
        if any(os.path.exists(os.path.join(d, m)) for m in REPO_MARKERS):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def _import_dotted(name: str):
    """Import `name` from the current directory, else from the repository mkcompiler was installed
    from (an editable install: `examples.factories` works from any directory)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    roots = [os.getcwd()] + [r for r in [_repository_root(here)] if r and r != os.getcwd()]
    failure = None
    for root in roots:
        _on_sys_path(root)
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not (e.name and (name == e.name or name.startswith(e.name + "."))):
                raise _import_failed(name, roots, e) from e  # the module exists; something it imports does not
            failure = e
    raise _import_failed(name, roots, failure) from failure


def _import_file(path: str):
    """Import a .py file as the module its repository (or the packages around it) would name it,
    with that root on sys.path, so that its own imports of sibling modules work."""
    path = os.path.abspath(path if path.endswith(".py") else path + ".py")
    if not os.path.isfile(path):
        raise ValueError(f"no file {path}")
    root = os.path.dirname(path)
    while os.path.isfile(os.path.join(root, "__init__.py")):  # up through the packages around the file
        root = os.path.dirname(root)
    repo = _repository_root(root)
    parts = os.path.relpath(path, repo)[:-3].split(os.sep) if repo else []
    if parts and all(p.isidentifier() for p in parts):
        root = repo  # `from examples.llama import ...` inside examples/factories.py works
    name = ".".join(os.path.relpath(path, root)[:-3].split(os.sep))
    roots = list(dict.fromkeys([root, os.path.dirname(path)]))
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") == path:
        return loaded
    mspec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module  # a new file of an old name replaces it (each test's own factories.py)
    _on_sys_path(*roots)
    try:
        mspec.loader.exec_module(module)
    except ImportError as e:
        del sys.modules[name]
        raise _import_failed(f"{path} as {name!r}", roots, e) from e
    return module


def _on_sys_path(*dirs: str) -> None:
    """Put directories first on sys.path, for good: the factory may import more when it is called
    (the console script does not even add the current directory)."""
    sys.path[:0] = [d for d in dirs if d not in sys.path]


def _import_failed(what: str, roots: list[str], e: BaseException) -> ValueError:
    tried = ", ".join(roots)
    return ValueError(
        f"cannot import {what} ({type(e).__name__}: {e}; tried with {tried} on sys.path): run from the "
        "directory that holds it, or give the path of its .py file as path/to/file.py:FACTORY"
    )


def build(spec: str, workers: int | None = None, gpu_codegen: bool = False):
    """Call the factory and compile its model: (megakernel, example inputs, compile seconds)."""
    import mkcompiler

    made = load_factory(spec)()
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise ValueError(f"{spec} must return (model, example_inputs) or (model, example_inputs, options)")
    model, inputs = made[0], made[1]
    options = dict(made[2]) if len(made) == 3 and made[2] else {}
    if workers is not None:
        options["num_workers"] = workers
    inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    if gpu_codegen:
        options["interpret"] = False  # a GPU's kernel (half-precision dots), to read and compile offline
    t0 = time.perf_counter()
    mk = mkcompiler.compile(model, inputs, **options)
    seconds = time.perf_counter() - t0
    if not isinstance(mk, mkcompiler.Megakernel):
        raise ValueError(
            f"{spec} compiled into {len(mk.megakernels)} megakernel segments with eager fallback "
            f"({', '.join(str(f[0]) for f in mk.fallen_back)}); inspect and profile need one megakernel"
        )
    return mk, inputs, seconds


# ---- inspect ----


def heading(title: str) -> str:
    return f"\n== {title} " + "=" * max(4, 76 - len(title))


def _dtype(dt) -> str:
    return str(dt).replace("torch.", "")


def _view(v) -> str:
    if v is None:
        return "-"
    shape = "x".join(map(str, v.shape)) or "scalar"
    return f"{shape}:{_dtype(v.dtype)}" + ("" if v.is_contiguous() else "(strided)")


def _expr(e) -> str:
    """Compact text of an elementwise expression tree ('op', name, dtype, *args) / ('in', k) / ('const', c)
    / ('idx', inner, size) / ('win', k, inner, size, lo, hi)."""
    if isinstance(e, tuple) and e:
        if e[0] == "in":
            return f"x{e[1]}"
        if e[0] == "const":
            return repr(e[1])
        if e[0] == "idx":  # the output index along one dim (ops/elementwise.py, positional leaves)
            return f"i[{e[1]}:{e[2]}]"
        if e[0] == "win":  # an input read inside a window of that index only
            return f"x{e[1]}@i[{e[2]}:{e[3]}]in[{e[4]}:{e[5]}]"
        if e[0] == "op":
            return f"{e[1]}({', '.join(_expr(a) for a in e[3:])})"
    return repr(e)


TILING_ATTRS = ("tile", "block", "blocks_per_tile", "split")


def _set_attrs(op) -> dict:
    """The op's attributes that differ from their defaults (those a pass has not set are None)."""
    if op.attrs is None:
        return {}
    values = {f.name: (getattr(op.attrs, f.name), f.default) for f in dataclasses.fields(op.attrs)}
    return {k: v for k, (v, default) in values.items() if v != default}


def _attrs(op) -> str:
    parts = []
    for k, v in _set_attrs(op).items():
        if k in TILING_ATTRS:
            continue
        if k == "expr":
            parts.append(_expr(v))
        elif k == "dot":
            parts.append(f"dot={'/'.join(_dtype(x) for x in v) if isinstance(v, tuple) else _dtype(v)}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def graph_section(mk) -> list[str]:
    g = mk.graph
    lines = [heading(f"op graph: {len(g.ops)} ops, {len(g.buffers)} buffers")]
    width = max((len(op.name) for op in g.ops), default=4)
    for k, op in enumerate(g.ops):
        ins = ", ".join(_view(v) for v in op.inputs)
        outs = ", ".join(_view(v) for v in op.outputs)
        attrs = _attrs(op)
        lines.append(f"  {k:>4}  {op.name:<{width}}  {op.kind:<17} {ins} -> {outs}" + (f"   {attrs}" if attrs else ""))
    return lines


def _si(x: float) -> str:
    for scale, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g}{p}"
    return f"{x:.3g}"


def _range(a) -> str:
    lo, hi = float(a.min()), float(a.max())
    return _si(lo) if lo == hi else f"{_si(lo)}..{_si(hi)}"


def tiling_section(mk) -> list[str]:
    import numpy as np

    from mkcompiler.ir.layout import Field
    from mkcompiler.ops.registry import FAMILIES
    from mkcompiler.tools.profiling import instruction_work

    q, g, dag = mk.queue, mk.graph, mk.dag
    nbytes, flops = instruction_work(mk.compilation)
    op_of = np.array([dag.tasks[t].op for t in q.rows[:, Field.TASK].tolist()], dtype=np.int64)
    header = ["op", "kind", "tile", "tiles", "bytes/tile", "FLOPs/tile", "bytes", "FLOPs"]
    rows = []
    for k, op in enumerate(g.ops):
        sel = op_of == k
        attrs = {a: v for a, v in _set_attrs(op).items() if a in TILING_ATTRS}
        fam = FAMILIES[op.kind]
        if op.kind == "matmul" and fam.splits(op) > 1:
            attrs["split_k"] = fam.splits(op)
        tile = " ".join(f"{a}={'x'.join(map(str, v)) if isinstance(v, tuple) else v}" for a, v in attrs.items())
        if not sel.any():
            rows.append([op.name, op.kind, tile or "-", "0", "-", "-", "-", "-"])
            continue
        b, f = nbytes[sel], flops[sel]
        rows.append(
            [
                op.name,
                op.kind,
                tile or "-",
                str(int(sel.sum())),
                _range(b) + "B",
                _range(f) if f.any() else "-",
                _si(b.sum()) + "B",
                _si(f.sum()) if f.any() else "-",
            ]
        )
    rows.append(
        ["total", "", "", str(len(q)), "", "", _si(nbytes.sum()) + "B", _si(flops.sum()) if flops.any() else "-"]
    )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [heading(f"tiling: {len(q)} tiles (instructions) over {len(g.ops)} ops")]
    for r in [header, *rows]:
        lines.append(
            "  " + "  ".join(v.ljust(w) if c < 3 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))).rstrip()
        )
    lines.append("  bytes: what a tile loads and stores; FLOPs: matmul and attention only")
    return lines


def schedule_section(mk) -> list[str]:
    """The static schedule by the cost model (passes/schedule.schedule_stats): how far the
    makespan is from its bounds, and tiles of one op waiting on each other."""
    from mkcompiler.passes.schedule import schedule_stats

    comp = mk.compilation
    lines = [heading("schedule (the scheduler's cost model)")]
    if comp.schedule is None:  # every pipeline run and cache entry has one; a hand-made compilation may not
        return lines + ["  none recorded"]
    st = schedule_stats(comp.dag, comp.schedule, mk.num_workers)
    lines.append(
        f"  makespan {st.makespan_ns / 1e3:.1f} us on {mk.num_workers} workers; lower bounds: work / workers "
        f"{st.work_bound_ns / 1e3:.1f} us, critical path {st.critical_path_ns / 1e3:.1f} us "
        f"(efficiency {st.efficiency:.0%})"
    )
    if st.intra_op_edges:
        named = ", ".join(f"{mk.graph.ops[o].name} {n}" for o, n in sorted(st.intra_op_edges.items()))
        lines.append(f"  tiles of one op waiting on each other (only overlapping writes need it): {named}")
    else:
        lines.append("  no tile waits on another tile of its own op")
    return lines


def offline_section(mk) -> tuple[list[str], bool]:
    from mkcompiler.runtime.gluon import GluonMegakernel
    from mkcompiler.tools.offline import OfflineCompileError, compile_sm90, format_report

    s = mk.settings
    lines = [heading("offline sm_90 compile (no GPU needed)")]
    if isinstance(mk, GluonMegakernel):
        try:
            return lines + _gluon_offline(mk), True
        except Exception as e:  # noqa: BLE001  (Gluon's and Triton's compile errors: reported like the Triton path's)
            return lines + [f"  FAILED: {type(e).__name__}: {str(e)[:2000]}"], False
    try:
        r = compile_sm90(mk.source, num_warps=s.num_warps, num_stages=s.num_stages, dynamic=s.schedule != "static")
    except (OfflineCompileError, OSError, ValueError) as e:
        lines.append(f"  FAILED: {e}")
        return lines, False
    lines.append("  " + format_report(r))
    lines.append(
        f"  registers {r['regs']}/thread x {r['num_warps'] * 32} threads = {r['regs'] * r['num_warps'] * 32} per block "
        f"(65536 per SM); shared memory {r['shared']} B (228 KiB per SM); spilled {r['spilled_bytes']} B/thread; "
        f"local {r['local']} B; compiled in {r['compile_s']:.1f} s"
    )
    if mk.interpret and _has_half_dots(mk):
        lines.append(
            "  note: this source was generated for the interpreter (half-precision dots widened to fp32); "
            "--gpu-codegen generates what a GPU would run"
        )
    return lines, True


def _gluon_offline(mk) -> list[str]:
    """offline_section's lines for the Gluon backend's kernel (its own signature and compile)."""
    from mkcompiler.backends.gluon import codegen
    from mkcompiler.ir.settings import default_max_spin

    k = mk.kernel
    r = codegen.compile_offline(k, default_max_spin(interpret=False))
    return [
        f"  sm_{r['arch']} (Gluon: {k.num_warps} compute warps and the loaders): {r['regs']} regs/thread, "
        f"{r['spilled_bytes']} B spilled, {r['shared']} B shared, {r['ptx_lines']} PTX lines, "
        f"{r['compile_s']:.1f} s; weight ring {k.num_buf} x {k.box}"
    ]


def _has_half_dots(mk) -> bool:
    import torch

    from mkcompiler.ops.attention import ATTENTION_KINDS

    return any(
        op.kind in ("matmul", *ATTENTION_KINDS) and op.inputs[0].dtype in (torch.float16, torch.bfloat16)
        for op in mk.graph.ops
    )


def cmd_inspect(a) -> int:
    mk, _, seconds = build(a.factory, a.workers, a.gpu_codegen)
    out = [heading("model")]
    out.append(f"  {a.factory}: {mk} (compiled in {seconds:.2f} s)")
    out.append("  passes: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in mk.timings.items()))
    out.append(
        f"  settings: schedule={mk.settings.schedule} num_warps={mk.settings.num_warps} "
        f"interpreter={'yes' if mk.interpret else 'no'}"
    )
    print("\n".join(out))
    print("\n".join(graph_section(mk)))
    print("\n".join(tiling_section(mk)))
    print("\n".join(schedule_section(mk)))
    print(heading("instruction queue"))
    print(mk.queue.table(None if a.limit <= 0 else a.limit))
    print(heading(f"generated kernel source ({mk.source.count(chr(10))} lines)"))
    print(mk.source)
    ok = True
    if a.no_offline:
        print(heading("offline sm_90 compile (no GPU needed)"))
        print("  skipped (--no-offline)")
    else:
        sys.stdout.flush()
        lines, ok = offline_section(mk)
        print("\n".join(lines))
    return 0 if ok else 1


# ---- profile ----


def cmd_profile(a) -> int:
    from mkcompiler.errors import MissingExtraError
    from mkcompiler.tools.profiling import profile_vm

    mk, inputs, seconds = build(a.factory, a.workers)
    print(f"{a.factory}: {mk} (compiled in {seconds:.2f} s)")
    if a.vm or (mk.interpret and not a.interpreter):
        why = "--vm" if a.vm else "no GPU"
        print(f"profiling in the reference VM ({why}; host clock, one instruction at a time)")
        prof = profile_vm(mk, *inputs, seed=a.seed, warmup=a.warmup)
    else:
        for _ in range(a.warmup):
            mk(*inputs)  # compiles the kernel, warms caches and clocks
        prof = mk.profile(*inputs)
        if prof.compilation is None:
            prof.compilation = mk.compilation
    os.makedirs(a.out, exist_ok=True)
    trace = prof.trace(os.path.join(a.out, "trace.json"))
    try:
        wrote = f"{trace} (open in https://ui.perfetto.dev) and {prof.gantt(os.path.join(a.out, 'gantt.png'))}"
    except MissingExtraError as e:  # the trace and the summary need nothing optional
        wrote = f"{trace} (open in https://ui.perfetto.dev); no gantt.png: {e}"
    bandwidth = a.bandwidth * 1e9 if a.bandwidth else None
    flops = a.flops * 1e12 if a.flops else None
    print(prof.summary(bandwidth=bandwidth, flops=flops))
    print(f"\nwrote {wrote}")
    return 0 if not prof.missing() else 1


# ---- ops ----


def supported_ops() -> list[str]:
    """The ATen ops capture lowers (ops/registry.py LOWERINGS), sorted; others are decomposed into these
    first (torch.export's core ATen decompositions) or refused (fallback="eager" runs them eagerly)."""
    from mkcompiler.ops import registry

    registry.load_all()
    return sorted({str(t) for t in registry.LOWERINGS})


def cmd_ops(a) -> int:
    names = supported_ops()
    print(f"{len(names)} ATen ops compile into megakernels (after torch.export's core ATen decompositions):")
    width = max(map(len, names)) + 2
    per_line = max(1, 100 // width)
    for k in range(0, len(names), per_line):
        print("  " + "".join(n.ljust(width) for n in names[k : k + per_line]).rstrip())
    print('others raise UnsupportedOpError; compile with fallback="eager" to run them in eager PyTorch')
    return 0


# ---- entry ----


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mkcompiler", description="mkcompiler command line")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="compile a small model, run it, check it, show the queue and kernel")
    sub.add_parser("ops", help="list the ATen ops that compile into megakernels")
    i = sub.add_parser("inspect", help="op graph, tiling, queue, kernel source, offline sm_90 resources")
    i.add_argument("factory", metavar="MODULE:FACTORY")
    i.add_argument("--workers", type=int, default=None, help="num_workers (default: SMs, or 4 in the interpreter)")
    i.add_argument("--no-offline", action="store_true", help="skip the offline sm_90 compile")
    i.add_argument("--limit", type=int, default=40, help="queue rows to print (0: all; default 40)")
    i.add_argument(
        "--gpu-codegen",
        action="store_true",
        help="without a GPU, generate the kernel a GPU would run (interpret=False: half-precision dots), "
        "for the sm_90 compile to see; it is not run",
    )
    f = sub.add_parser("profile", help="per-instruction profile: trace.json, gantt.png and a summary")
    f.add_argument("factory", metavar="MODULE:FACTORY")
    f.add_argument("--out", default="mk_profile", help="output directory (default ./mk_profile)")
    f.add_argument("--vm", action="store_true", help="profile in the reference VM even on a GPU")
    f.add_argument(
        "--interpreter",
        action="store_true",
        help="without a GPU, profile the interpreted kernel (logical ticks: order, not duration) instead of the VM",
    )
    f.add_argument("--workers", type=int, default=None, help="num_workers (default: SMs, or 4 in the interpreter)")
    f.add_argument("--warmup", type=int, default=1, help="unprofiled runs first (default 1)")
    f.add_argument("--seed", type=int, default=0, help="VM worker interleaving seed")
    f.add_argument("--bandwidth", type=float, default=None, metavar="GB/s", help="memory bandwidth ceiling")
    f.add_argument("--flops", type=float, default=None, metavar="TFLOP/s", help="compute ceiling")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in ("demo", "ops", "inspect", "profile"):
        print(f"unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    a = parser().parse_args(argv)
    if a.command == "demo":
        from mkcompiler.tools.demo import main as demo

        return demo()
    if a.command == "ops":
        return cmd_ops(a)
    try:
        return cmd_inspect(a) if a.command == "inspect" else cmd_profile(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
