"""Large-M matmul throughput: the Gluon warp-specialized matmul (mkcompiler/backends/gluon/matmul.py)
against torch (cuBLAS) and a plain Triton tl.dot matmul, on Llama-3.1-8B prefill shapes (GPU only).

    python benchmarks/gluon_matmul_bw.py [--ms 2048 512] [--configs 128,128,64,4 128,256,64,3]
    python benchmarks/gluon_matmul_bw.py --residual      # C = A @ B^T + R (cuBLAS: addmm, beta=1)
    python benchmarks/gluon_matmul_bw.py --dry-run       # the plan, no GPU

C[M, N] = A[M, K] @ B[N, K]^T in bf16 with fp32 accumulation (B in nn.Linear's weight layout), for
M in --ms and (N, K) of q/o (4096, 4096), k/v (1024, 4096), gate/up (14336, 4096), down
(4096, 14336). Per shape: cuBLAS (torch.nn.functional.linear, or torch.addmm with a residual),
the best of a few plain Triton tl.dot configs (pointer loads, software-pipelined by Triton), and
every Gluon config of --configs ("BM,BN,BK,stages[,warps]"). Each is checked against an fp32
reference of the same bf16 operands (relative error of the norm; cuBLAS's shown beside), then
timed as the median of CUDA-graph replays of --reps back-to-back launches (no host launch cost
in the figure). Prints ms, TFLOP/s and % of cuBLAS per shape and implementation, then a summary
table. A config that does not fit (shared memory, registers) is reported and skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Llama-3.1-8B linear layers: name -> (N, K) of the weight
SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
DEFAULT_MS = [2048, 512]
DEFAULT_CONFIGS = ["128,128,64,4", "128,256,64,3", "128,128,64,4,8"]
# plain Triton tl.dot configs (BM, BN, BK, num_stages, num_warps): the best one per shape is shown
TRITON_CONFIGS = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 4), (64, 256, 64, 4, 4)]
H100_SMS = 132  # for the dry-run plan (tiles per wave)
MAX_REL_ERR = 1e-2


def parse_config(text: str, group_m: int):
    """'BM,BN,BK,stages[,warps]' -> gm.MatmulConfig (checked)."""
    from mkcompiler.backends.gluon import matmul as gm

    v = [int(x) for x in text.split(",")]
    if len(v) not in (4, 5):
        raise SystemExit(f"--configs takes BM,BN,BK,stages[,warps], got {text!r}")
    return gm.config_of(tuple(v[:3]), v[3], group_m, warps=v[4] if len(v) == 5 else 0)


def config_name(cfg) -> str:
    return f"gluon {cfg.BM}x{cfg.BN}x{cfg.BK} s{cfg.stages} w{cfg.num_warps}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", type=int, nargs="+", default=DEFAULT_MS, help="token counts M (default 2048 512)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="which (N, K) shapes")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="Gluon BM,BN,BK,stages[,warps]")
    p.add_argument("--group-m", type=int, default=8, help="Gluon tile grouping (row blocks per column walk)")
    p.add_argument("--residual", action="store_true", help="time C = A @ B^T + R (fused residual add)")
    p.add_argument("--no-triton", action="store_true", help="leave out the plain Triton tl.dot baseline")
    p.add_argument("--reps", type=int, default=10, help="launches per CUDA graph (default 10)")
    p.add_argument("--iters", type=int, default=15, help="graph replays timed (median; default 15)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    return p


def cases(args):
    return [(M, name, *SHAPES[name]) for M in args.ms for name in args.shapes]


def print_plan(args, configs, sms: int) -> None:
    print(
        f"plan: {len(cases(args))} shapes x (cuBLAS, " + ("" if args.no_triton else "Triton tl.dot best of 3, "), end=""
    )
    print(
        f"{len(configs)} Gluon configs); residual={args.residual}; {args.reps} launches per graph, {args.iters} replays"
    )
    for cfg in configs:
        print(f"  {config_name(cfg)} group_m={cfg.group_m}: {cfg.shared_bytes()} B shared")
    for M, name, N, K in cases(args):
        tiles = "; ".join(f"{c.BM}x{c.BN}: {c.tiles(M, N)} tiles ({c.tiles(M, N) / sms:.2f} waves)" for c in configs)
        print(f"  M={M:5d} {name:8s} N={N:5d} K={K:5d}: {2 * M * N * K / 1e9:6.1f} GFLOP; {tiles}")


# ---- the plain Triton baseline ----

try:
    import triton
    import triton.language as tl

    @triton.jit
    def triton_matmul_kernel(
        a_ptr, b_ptr, c_ptr, r_ptr, M, N, K, s_am, s_bn, s_cm, s_rm,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, HAS_RES: tl.constexpr,
    ):  # fmt: skip
        """C = A @ B^T (+ R): one program per output tile, grouped order, K loop pipelined by Triton."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        rows = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % rows
        pid_n = (pid % in_group) // rows
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + offs_m[:, None] * s_am + offs_k[None, :]
        b_ptrs = b_ptr + offs_n[:, None] * s_bn + offs_k[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K - k), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_n[:, None] < N) & (offs_k[None, :] < K - k), other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
            a_ptrs += BK
            b_ptrs += BK
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if HAS_RES:
            acc += tl.load(r_ptr + offs_m[:, None] * s_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptr + offs_m[:, None] * s_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)

except ImportError:  # the dry run needs no Triton
    triton = None


def triton_launch(a, b, r, out, cfg):
    BM, BN, BK, stages, warps = cfg
    M, K = a.shape
    N = b.shape[0]
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    res = out if r is None else r

    def launch():
        triton_matmul_kernel[grid](
            a, b, out, res, M, N, K, a.stride(0), b.stride(0), out.stride(0), res.stride(0),
            BM=BM, BN=BN, BK=BK, GROUP_M=8, HAS_RES=r is not None, num_stages=stages, num_warps=warps,
        )  # fmt: skip
        return out

    return launch


# ---- timing ----


def time_ms(fn, reps: int, iters: int) -> float:
    """Median ms of one call: a CUDA graph of `reps` calls replayed `iters` times (no host launch
    cost); plain back-to-back launches between events if capture fails."""
    fn()
    torch.cuda.synchronize()
    graph = None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        run = graph.replay
    except Exception:  # noqa: BLE001  (no capture: time launches instead)
        graph = None

        def run():
            for _ in range(reps):
                fn()

    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / reps)
    times.sort()
    return times[len(times) // 2]


def rel_err(got, ref) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


# ---- main ----


def run_case(args, M, name, N, K, configs):
    """Rows (impl, ms or None, rel err, note) of one shape; cuBLAS first."""
    from mkcompiler.backends.gluon import matmul as gm

    g = torch.Generator(device="cuda").manual_seed(M * 7 + N + K)
    a = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    b = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(torch.bfloat16)
    r = torch.randn(M, N, device="cuda", generator=g).to(torch.bfloat16) if args.residual else None
    ref = a.float() @ b.float().t()
    if r is not None:
        ref += r.float()
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    if r is None:
        cublas = lambda: torch.nn.functional.linear(a, b)  # noqa: E731
    else:
        cublas = lambda: torch.addmm(r, a, b.t())  # noqa: E731
    rows = [("cuBLAS", time_ms(cublas, args.reps, args.iters), rel_err(cublas(), ref), "")]
    if not args.no_triton:
        best = None
        for cfg in TRITON_CONFIGS:
            out.fill_(float("nan"))
            try:
                launch = triton_launch(a, b, r, out, cfg)
                err = rel_err(launch(), ref)
                ms = time_ms(launch, args.reps, args.iters)
            except Exception as e:  # noqa: BLE001  (a config that does not fit: try the next)
                print(f"    triton {cfg}: FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            if err <= MAX_REL_ERR and (best is None or ms < best[1]):
                best = (f"triton tl.dot {cfg[0]}x{cfg[1]}x{cfg[2]} s{cfg[3]} w{cfg[4]}", ms, err, "best of configs")
        rows.append(best or ("triton tl.dot", None, float("nan"), "no config ran correctly"))
    for cfg in configs:
        out.fill_(float("nan"))
        try:
            launch = gm.prepare_gluon_matmul(a, b, r, out, cfg)
            err = rel_err(launch(), ref)
        except Exception as e:  # noqa: BLE001  (a config that does not fit: report and go on)
            rows.append((config_name(cfg), None, float("nan"), f"FAILED {type(e).__name__}: {str(e)[:120]}"))
            continue
        if err > MAX_REL_ERR or out.isnan().any().item():
            rows.append((config_name(cfg), None, err, "WRONG RESULT"))
            continue
        rows.append((config_name(cfg), time_ms(launch, args.reps, args.iters), err, ""))
    return rows


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    configs = []
    for text in args.configs:
        try:
            configs.append(parse_config(text, args.group_m))
        except ValueError as e:  # GluonMatmulError: a config that cannot fit; the others still run
            print(f"skipping config {text}: {e}")
    if args.dry_run:
        print_plan(args, configs, H100_SMS)
        return
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("gluon_matmul_bw.py needs a CUDA GPU (Hopper, sm_90): nothing to measure here (try --dry-run)")
    from mkcompiler.backends.gluon import matmul as gm

    if not gm.HAVE_GLUON:
        sys.exit("triton.experimental.gluon is not importable (needs Triton 3.6)")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}")
    print_plan(args, configs, props.multi_processor_count)
    t0 = time.perf_counter()
    columns: list[str] = []  # implementations in first-seen order (cuBLAS first)
    pct: dict[tuple[int, str, str], float] = {}  # (M, shape, column) -> % of cuBLAS
    for M, name, N, K in cases(args):
        flop = 2 * M * N * K
        print(f"\nM={M} {name} N={N} K={K} ({flop / 1e9:.1f} GFLOP)", flush=True)
        rows = run_case(args, M, name, N, K, configs)
        base = rows[0][1]
        for impl, ms, err, note in rows:
            column = "triton tl.dot (best)" if impl.startswith("triton") else impl
            columns += [column] if column not in columns else []
            if ms is None:
                print(f"  {impl:34s} {'-':>8s} ms  {'-':>6s} TFLOP/s  {'-':>5s}  rel err {err:.1e}  {note}")
                continue
            pct[M, name, column] = 100 * base / ms
            print(
                f"  {impl:34s} {ms:8.4f} ms  {flop / ms / 1e9:6.1f} TFLOP/s  {pct[M, name, column]:5.1f}%  "
                f"rel err {err:.1e}  {note}",
                flush=True,
            )
    what = "C = A @ B^T + R" if args.residual else "C = A @ B^T"
    print(f"\n% of cuBLAS ({what}; {props.name}; {time.perf_counter() - t0:.0f} s)")
    print("| M | shape | " + " | ".join(columns[1:]) + " |")
    print("|---|---|" + "---|" * (len(columns) - 1))
    for M, name, *_ in cases(args):
        cells = [f"{pct[M, name, c]:.0f}%" if (M, name, c) in pct else "-" for c in columns[1:]]
        print(f"| {M} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
