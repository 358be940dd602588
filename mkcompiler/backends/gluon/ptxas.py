"""Offline sm_90 compiles of Gluon kernels on a machine without a GPU: one fresh compile with
ptxas's log captured, and the resources every report shows (registers, spills, shared memory,
setmaxnreg, PTX op counts). Used by stream.py and matmul.py."""

from __future__ import annotations

import contextlib
import io
import re
import time


def compile_report(
    fn, signature: dict, constants: dict, attrs: dict, num_warps: int, arch: int, ptx_ops, error, keep_asm: bool
) -> dict:
    """Compile the Gluon kernel `fn` (signature and constants by argument name) for sm_`arch`;
    `ptx_ops`: PTX substrings to count; `error`: the exception type raised when ptxas's log has
    no register/spill line."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    idx = {n: i for i, n in enumerate(fn.arg_names)}
    src = GluonASTSource(
        fn,
        signature,
        {(idx[n],): v for n, v in constants.items()},
        {(idx[n],): v for n, v in attrs.items()},
    )
    log = io.StringIO()
    old = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True  # fresh compile: log exists
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    seconds = time.perf_counter() - t0
    text = log.getvalue()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.search(r"Used (\d+) registers", text)
    if not spills or not regs:
        raise error(f"no register/spill line in the ptxas log:\n{text}")
    ptx = k.asm["ptx"]
    r = {
        "arch": arch,
        "num_warps": k.metadata.num_warps,
        "regs": int(regs.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "spilled_bytes": int(spills.group(1)) + int(spills.group(2)),
        "shared": k.metadata.shared,
        "setmaxnreg": sorted(set(re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))),
        "ptx_counts": {p: ptx.count(p) for p in ptx_ops},
        "ptx_lines": ptx.count("\n"),
        "compile_s": round(seconds, 3),
    }
    if keep_asm:
        r["ptx"], r["ttgir"], r["ptxas_log"] = ptx, k.asm["ttgir"], text
    return r
