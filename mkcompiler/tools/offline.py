"""Compile a generated megakernel for sm_90 on a CPU-only machine and report its resources.

    report = compile_sm90(mk.source)          # registers, spills, shared memory, ...
    python -m mkcompiler.tools.offline kernel.py    # one-line report (--json for all fields)

No GPU or driver is needed: Triton's compiler and ptxas ship in the wheel. Under
TRITON_INTERPRET=1 (what `import mkcompiler` sets without a GPU) @triton.jit returns
interpreter functions that cannot be compiled, so compile_sm90 runs this module in a
subprocess with TRITON_INTERPRET=0.

Registers and stack come from `cuobjdump -res-usage` on the cubin (its SHARED is only the
static part: Triton's shared memory is dynamic, sized by the kernel's metadata); spill
stores/loads from ptxas' own log (`ptxas -v`, which Triton runs and prints when
TRITON_DUMP_PTXAS_LOG=1). The subprocess compiles afresh (TRITON_ALWAYS_COMPILE=1) so that
log exists and the compile time is real.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from mkcompiler.ir.settings import triton_interprets

# The megakernel's parameters (codegen.LOOP_HEAD) and their Triton signature types.
SIGNATURE = {
    "instr_ptr": "*i32",
    "n_instr": "i32",
    "waits_ptr": "*i32",
    "counters_ptr": "*i32",
    "head_ptr": "*i32",
    "err_ptr": "*i32",
    "addrs_ptr": "*i64",
    "views_ptr": "*i64",
    "order_ptr": "*i32",
    "worker_begin_ptr": "*i32",
    "generation": "i32",
    "prof_ptr": "*i64",
    "MAX_SPIN": "constexpr",
    "DYNAMIC": "constexpr",
    "PROFILE": "constexpr",
    "LOGICAL_CLOCK": "constexpr",
    "WAIT_MODE": "constexpr",
}
# A tensor-parallel kernel (codegen_tp.py) takes the rank's table after prof_ptr.
_AFTER = list(SIGNATURE).index("prof_ptr") + 1
TP_SIGNATURE = dict([*list(SIGNATURE.items())[:_AFTER], ("tp_ptr", "*i64"), *list(SIGNATURE.items())[_AFTER:]])


def signature_of(arg_names) -> dict:
    """SIGNATURE or TP_SIGNATURE, whichever names exactly these parameters (else raise)."""
    for sig in (SIGNATURE, TP_SIGNATURE):
        if list(arg_names) == list(sig):
            return sig
    raise OfflineCompileError(f"megakernel parameters {list(arg_names)} differ from offline.SIGNATURE")


def default_num_warps() -> int:
    """What a megakernel launches with unless told otherwise (one definition: settings.py)."""
    from mkcompiler.ir.settings import Settings

    return Settings().replace(interpret=False).for_target().num_warps


def default_waits() -> str:
    from mkcompiler.ir.settings import Settings

    return Settings().waits


def default_num_stages() -> int:
    from mkcompiler.ir.settings import Settings

    return Settings().num_stages


class OfflineCompileError(RuntimeError):
    pass


def compile_sm90(
    source: str,
    num_warps: int | None = None,
    num_stages: int | None = None,
    arch: int = 90,
    dynamic: bool = True,
    timeout: float = 600,
    profile: bool = False,
    waits: str | None = None,
) -> dict:
    """Compile megakernel source for sm_`arch` in a subprocess; return its resource report:
    regs (per thread), spill_stores / spill_loads / spilled_bytes (bytes per thread), shared
    (bytes per block), stack (bytes per thread), ptx_lines, compile_s, plus the options used."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
        path = f.name
    num_warps = num_warps or default_num_warps()
    num_stages = num_stages or default_num_stages()
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_ALWAYS_COMPILE="1")
    cmd = [
        sys.executable,
        "-m",
        "mkcompiler.tools.offline",
        path,
        "--json",
        f"--num-warps={num_warps}",
        f"--num-stages={num_stages}",
        f"--arch={arch}",
        "--dynamic" if dynamic else "--static",
        *(["--profile"] if profile else []),
        *([f"--waits={waits}"] if waits else []),
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        raise OfflineCompileError(f"sm_{arch} compile failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_report(r: dict) -> str:
    return (
        f"sm_{r['arch']}: {r['regs']} regs/thread, {r['spilled_bytes']} B spilled "
        f"({r['spill_stores']} B stores, {r['spill_loads']} B loads), {r['shared']} B shared, "
        f"{r['stack']} B stack, {r['ptx_lines']} PTX lines, {r['compile_s']:.1f} s "
        f"(num_warps={r['num_warps']}, num_stages={r['num_stages']}, {'dynamic' if r['dynamic'] else 'static'})"
    )


# ---- what runs in the subprocess (TRITON_INTERPRET=0) ----


def _load_kernel(path: str):
    """The `megakernel` JITFunction of a generated source file."""
    from mkcompiler.runtime.megakernel import load_source  # imports mkcompiler: keeps TRITON_INTERPRET as set

    with open(path) as f:
        kernel = load_source(f.read()).megakernel
    if not hasattr(kernel, "arg_names"):
        raise OfflineCompileError("megakernel is not a JITFunction: run with TRITON_INTERPRET=0")
    signature_of(kernel.arg_names)
    return kernel


def _compile(
    kernel,
    num_warps: int,
    num_stages: int,
    arch: int,
    dynamic: bool,
    profile: bool = False,
    waits: str | None = None,
):
    """triton.compile for a CUDA target without a driver; returns (kernel, ptxas log)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mkcompiler.ir.settings import WAIT_MANY_MODE, WAIT_MODES, Settings, default_max_spin, register_cap

    waits = Settings().waits if waits is None else waits
    index = {name: i for i, name in enumerate(kernel.arg_names)}
    constexprs = {
        (index["MAX_SPIN"],): default_max_spin(interpret=False),
        (index["DYNAMIC"],): dynamic,
        (index["PROFILE"],): profile,
        (index["LOGICAL_CLOCK"],): False,
        # "acquire-many": the kernel runtime.wait_mode gives queues with more than 3 waits in a row
        (index["WAIT_MODE"],): WAIT_MANY_MODE if waits == "acquire-many" else WAIT_MODES.index(waits),
    }
    # The JIT marks 16-byte-aligned pointers divisible by 16; without it nothing is vectorized.
    signature = signature_of(kernel.arg_names)
    attrs = {(index[n],): [["tt.divisibility", 16]] for n, t in signature.items() if t.startswith("*")}
    src = ASTSource(fn=kernel, signature=dict(signature), constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v output (registers, spills)
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=register_cap(num_warps)),
        )
    return compiled, log.getvalue()


def _res_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the megakernel from `cuobjdump -res-usage`."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.check_output([knobs.nvidia.cuobjdump.path, "-res-usage", path], text=True)
    finally:
        os.unlink(path)
    m = re.search(r"Function megakernel:\s*\n\s*(.*)", out)
    if not m:
        raise OfflineCompileError(f"no megakernel in cuobjdump output:\n{out}")
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", m.group(1))}


def _ptxas_spills(log: str) -> tuple[int, int]:
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not m:
        raise OfflineCompileError(f"no spill line in the ptxas log (was the kernel compiled afresh?):\n{log}")
    return int(m.group(1)), int(m.group(2))


def report_for(
    path: str,
    num_warps: int | None = None,
    num_stages: int | None = None,
    arch: int = 90,
    dynamic: bool = True,
    dump_dir: str | None = None,
    profile: bool = False,
    waits: str | None = None,
) -> dict:
    num_warps = num_warps or default_num_warps()
    num_stages = num_stages or default_num_stages()
    kernel = _load_kernel(path)
    t0 = time.perf_counter()
    compiled, log = _compile(kernel, num_warps, num_stages, arch, dynamic, profile, waits)
    seconds = time.perf_counter() - t0
    res = _res_usage(compiled.asm["cubin"])
    stores, loads = _ptxas_spills(log)
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        for ext in ("ttir", "ttgir", "llir", "ptx"):
            with open(os.path.join(dump_dir, f"megakernel_sm{arch}.{ext}"), "w") as f:
                f.write(compiled.asm[ext])
    return {
        "arch": arch,
        "num_warps": num_warps,
        "num_stages": num_stages,
        "dynamic": dynamic,
        "profile": profile,
        "waits": waits or default_waits(),
        "regs": res["reg"],
        "spill_stores": stores,
        "spill_loads": loads,
        "spilled_bytes": stores + loads,
        "local": res.get("local", 0),
        "shared": compiled.metadata.shared,  # what the launch requests (Triton's shared memory is dynamic)
        "static_shared": res.get("shared", 0),  # cuobjdump SHARED: on sm_90 the 1 KiB system reserve
        "stack": res.get("stack", 0),
        "ptx_lines": compiled.asm["ptx"].count("\n"),
        "compile_s": round(seconds, 3),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Compile a generated megakernel source file for sm_90 (no GPU needed).")
    p.add_argument("source", help="generated megakernel source (mk.source written to a file)")
    p.add_argument("--num-warps", type=int, default=None, help="default: the Triton backend's (settings.DEFAULT_WARPS)")
    p.add_argument("--num-stages", type=int, default=None, help="default: Settings().num_stages")
    p.add_argument("--arch", type=int, default=90)
    sched = p.add_mutually_exclusive_group()
    sched.add_argument("--dynamic", dest="dynamic", action="store_true", default=True)
    sched.add_argument("--static", dest="dynamic", action="store_false")
    p.add_argument("--profile", action="store_true", help="the profiling variant (per-instruction stamps)")
    p.add_argument(
        "--waits",
        default=None,
        help='Settings.waits of the compile (default: Settings), or "acquire-many" (acquire waits with wait_many)',
    )
    p.add_argument("--dump", metavar="DIR", help="write ttir/ttgir/llir/ptx here")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    a = p.parse_args(argv)
    if triton_interprets() or os.environ.get("TRITON_ALWAYS_COMPILE") != "1":
        # `import mkcompiler` (which runs before this module) chose the interpreter, so the ops'
        # @triton.jit functions cannot be compiled any more: start again without it. A cached
        # kernel would have no ptxas log, hence TRITON_ALWAYS_COMPILE.
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_ALWAYS_COMPILE="1")
        args = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "mkcompiler.tools.offline", *args], env)
    r = report_for(a.source, a.num_warps, a.num_stages, a.arch, a.dynamic, a.dump, a.profile, a.waits)
    print(json.dumps(r) if a.json else format_report(r))


if __name__ == "__main__":
    main()
