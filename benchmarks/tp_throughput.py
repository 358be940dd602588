"""Tensor-parallel throughput (issue 8): mkcompiler against the peer baseline
(../shared/bench/peer_llama_tp.py) in one torchrun process group, on the same GPUs, in one run.

    torchrun --standalone --nproc-per-node 4 benchmarks/tp_throughput.py --model llama-70b --layers 10 \\
        [--cases decode256,prefill4096,decode64,mixed512+64] [--json PATH] [--time-budget S]
    bash benchmarks/tp_bench.sh 4                   # the same under a hard timeout; log and JSON under $OUT
    python benchmarks/tp_throughput.py --dry-run    # no GPU: tiny shapes, 2 ranks in the Triton interpreter

Model: examples/llama.py's Llama with the real per-layer shapes of --model (llama-70b: dim 8192,
FFN 28672, 64 heads, 8 KV heads of 128, vocab 128256; llama-8b) and --layers layers, random
bf16 weights built once on every rank's GPU from the same seed (the same weights everywhere),
shared by every case; each case gets its own KV caches (max_seq_len = ctx + tokens + 8, the
peer's), filled with random values. mkcompiler compiles it with tensor_parallel=N (each rank its
shard: views of the weights, its own kv heads' caches). For a prefill the final norm and LM head
see the last position only (as the peer's model does; a wrapper around `model.norm`, see
LastPosition; --all-logits turns it off).

Cases (--cases, run in the order given): decodeB = one decode step of batch B at position ctx
(--ctx 1024: 1024 tokens already in the cache); prefillT = T tokens of one sequence at positions
0..T-1; mixedC+B (not in the default cases) = one mixed step (examples/llama.py's MixedStep, as
serving engines batch a chunked prefill with decodes): a prefill chunk of C tokens of one sequence
at positions ctx..ctx+C-1 (a prompt whose first ctx tokens are already in the cache: KV-cache row
0) plus one decode token of each of B other sequences at position ctx (rows 1..B), C + B tokens in
one launch; its caches have B + 1 rows of max_seq_len = ctx + C + 8, and every row's logits are
computed (no last-position wrapper). Per case:
1. mkcompiler: compile (seconds printed), a first call (the Triton compile of the kernel), rank
   0's logits against eager of the whole (unsharded) model on rank 0 (same weights, same cache
   contents; relative error printed and flagged above --tol, never fatal), the ranks' logits
   compared (checksums), then timed: `mk(*inputs)` (mk call: checks, launch, error read, output
   copy) and `mk.launch()` (mk kernel). If a prefill does not compile (an error such as out of
   memory), it is retried with half the tokens down to --min-prefill-chunk, printing the chunk
   (--prefill-fallback off: no retry); the peer then runs the same chunk. (A mixed step is not
   retried.) --profile DIR: then one profiled launch on every rank; rank 0's stamps, Gantt chart
   and summary go under DIR, with the share of the communication tiles' busy time that other
   tiles ran beside (Profile.overlap: communication overlapping compute).
2. peer: the peer's own model (its ShardedLlama, imported from --peer, never copied here) with
   the same shapes, batch, tokens and max_seq_len, timed eager and with torch.compile in the
   peer's modes (--peer-modes; compile-cg = torch.compile(mode="reduce-overhead"): the peer's
   "torch.compile + CUDA graphs"; compile = mode="max-autotune-no-cudagraphs"; compile-max-cg =
   mode="max-autotune", not in the peer). The peer has no mixed step: its baseline for mixedC+B is
   what a server without mixing runs, a decode step of batch B at ctx and a prefill of the C
   tokens at positions ctx.. (two ShardedLlama of batch B and 1 sharing one copy of the weights,
   caches as long as mkcompiler's), timed as one function making both calls (each compiled on its
   own, static shapes), labelled "decode B + prefill C, two calls".
Timing is the peer's: warm-up calls, a barrier, then --iters calls each between two CUDA events
and a synchronize; the median per rank; reported: rank 0's median and the max over the ranks'
medians (the peer's number). Whole-model figures are scaled the peer's way, exactly: measured ms
(max over ranks) / layers x real depth (so embedding and LM head, inside the measured ms, are
scaled too: the peer's docstring says "plus the sharded LM head" but its code scales the whole
time); tokens/s = tokens per step (batch x tokens; a mixed step: C + B) / scaled seconds. "vs
best" = best peer baseline's scaled ms / this row's (above 1: faster than the best baseline).

Differences from the peer's model that remain: mkcompiler's model embeds tokens (the peer starts
from hidden states) and all-gathers the vocab-sharded logits (the peer leaves them sharded); both
are small beside 10 layers.

Robustness: every phase in try/except (the error printed, the run goes on); ranks agree after
every phase on whether it worked, and rank 0 decides what --time-budget still allows (phase
estimates, then measured times x 1.3): what does not fit is skipped with a note. Output is
flushed as it goes; each case's table is printed when the case ends and the JSON rewritten.
NVLink multicast stays off (the variables below are set at import, before torch.distributed).
"""

from __future__ import annotations

import os

# NVLink multicast must stay off (set before torch.distributed / symmetric memory / NCCL start).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
_OVERRIDDEN = {k: os.environ[k] for k, v in MULTICAST_OFF.items() if os.environ.get(k, v) != v}
os.environ.update(MULTICAST_OFF)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from benchmarks.decode_latency import (  # noqa: E402
    compile_options,
    default_dtype_and_device,
    free_memory,
    git_info,
    rel,
)
from examples.llama import CONFIGS, Llama, LlamaConfig, MixedStep, random_llama  # noqa: E402

# Nothing here touches CUDA at import time; mkcompiler and triton are imported where used.

MODELS = {"llama-70b": "llama-3.1-70b", "llama-8b": "llama-3.1-8b"}  # peer name -> examples/llama.py CONFIGS
DEFAULT_CASES = "decode256,prefill4096,decode64"
DEFAULT_PEER = os.path.join(ROOT, "..", "shared", "bench", "peer_llama_tp.py")
# The peer's modes (its main()), plus max-autotune with CUDA graphs.
PEER_MODES = {
    "eager": None,
    "compile": "max-autotune-no-cudagraphs",
    "compile-cg": "reduce-overhead",
    "compile-max-cg": "max-autotune",
}
DEFAULT_PEER_MODES = "eager,compile-cg"
TOL = 5e-2  # logits rel err (bf16, 10 layers) above which a case is flagged
PEER_EXTRA_SEQ = 8  # the peer's max_seq = ctx + tokens + 8

MK_KERNEL, MK_CALL = "mkcompiler kernel", "mkcompiler call"
IMPL_LABEL = {
    MK_KERNEL: "mkcompiler kernel (`mk.launch()`)",
    MK_CALL: "mkcompiler call (`mk(*inputs)`)",
    "peer eager": "peer eager",
    "peer compile": "peer torch.compile max-autotune-no-cudagraphs",
    "peer compile-cg": "peer torch.compile + CUDA graphs (reduce-overhead)",
    "peer compile-max-cg": "peer torch.compile max-autotune + CUDA graphs",
}
# The peer's published numbers (../shared/bench/README.md): 4 x H200, llama-70b, TP=4, 10 layers
# scaled to 80, ctx 1024; (kind, batch, tokens) -> {mode: ms/step}. Printed beside ours, never mixed in.
PEER_README = {
    ("decode", 256, 1): {"compile-cg": 35.9, "eager": 211.0},
    ("decode", 64, 1): {"compile-cg": 21.3},
    ("prefill", 1, 4096): {"compile-cg": 317.0, "eager": 402.0},
}

# Phase duration guesses (s, 70B shapes, 10 layers) before one was measured; --time-budget only.
DEFAULT_ESTIMATES = {
    "build": 15.0,
    "mk:decode": 120.0,
    "mk:prefill": 200.0,
    "mk:mixed": 200.0,
    "peer:eager": 20.0,
    "peer:compile": 240.0,
    "peer:compile-cg": 120.0,
    "peer:compile-max-cg": 300.0,
}
SAFETY = 1.3
RESERVE_S = 10.0

# --dry-run: tiny shapes (the peer's SHAPES format), 2 simulated ranks, small cases.
DRY_SHAPES = dict(dim=64, ffn=128, depth=2, heads=4, kv_heads=2, hd=16, vocab=256)
DRY_LAYERS, DRY_CTX, DRY_TP, DRY_ITERS = 1, 8, 2, 1


LEGEND = (
    "measured ms: median of the timed calls (rank 0's; the max over the ranks' medians); ms/step: that max / "
    "layers x the model's depth (the peer's scaling, embedding and LM head included); tokens/s = tokens per step "
    "(batch x tokens; a mixed step: chunk + batch) / ms/step; vs best baseline = the best peer variant's ms/step / "
    "this row's (the tokens/s ratio: above 1, faster)"
)


def say(*a) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------- arguments and cases


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # as given: decode256, prefill4096, mixed512+64
    kind: str  # "decode", "prefill" or "mixed"
    batch: int  # sequences (a mixed step: the decoding ones)
    tokens: int  # tokens per sequence in one call (1 for decode and for a mixed step's decoders)
    chunk: int = 0  # a mixed step's prefill chunk (tokens of one more sequence); 0 otherwise

    @property
    def step_tokens(self) -> int:
        """Tokens one call processes: batch x tokens, plus a mixed step's chunk."""
        return self.batch * self.tokens + self.chunk

    @property
    def cache_rows(self) -> int:
        """KV-cache rows (max_batch): a mixed step's chunk has row 0, its decoders rows 1..B."""
        return self.batch + (1 if self.kind == "mixed" else 0)


CASE_RE = re.compile(r"^(?:(decode|prefill)(\d+)|mixed(\d+)\+(\d+))$")


def parse_cases(text: str) -> list[Case]:
    cases = []
    for piece in text.split(","):
        piece = piece.strip()
        if not piece:
            continue
        m = CASE_RE.match(piece)
        if not m or any(n.isdigit() and int(n) < 1 for n in m.groups() if n):
            raise argparse.ArgumentTypeError(
                f"--cases: {piece!r} is not decodeB (batch B, one token), prefillT (T tokens, batch 1) or "
                "mixedC+B (a prefill chunk of C tokens and B decode tokens in one step)"
            )
        if m.group(1) is None:
            case = Case(piece, "mixed", int(m.group(4)), 1, chunk=int(m.group(3)))
        else:
            n = int(m.group(2))
            case = Case(piece, "decode", n, 1) if m.group(1) == "decode" else Case(piece, "prefill", 1, n)
        if case not in cases:
            cases.append(case)
    if not cases:
        raise argparse.ArgumentTypeError("--cases: empty")
    return cases


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if modes == ["none"]:
        return []
    bad = [m for m in modes if m not in PEER_MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"--peer-modes: unknown {bad}; known: {', '.join(PEER_MODES)} or none")
    return list(dict.fromkeys(modes))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Tensor-parallel throughput: mkcompiler vs the peer baseline (torchrun).")
    p.add_argument("--model", default="llama-70b", choices=sorted(MODELS), help="per-layer shapes (default llama-70b)")
    p.add_argument("--layers", type=int, default=10, help="layers built and measured (default 10)")
    p.add_argument(
        "--cases",
        type=parse_cases,
        default=None,
        help="comma-separated, in run order: decodeB (a decode step of batch B at --ctx), prefillT (T tokens "
        "at positions 0..T-1), mixedC+B (one step: a prefill chunk of C tokens at positions ctx.. plus a decode "
        f"token of B other sequences at ctx; not in the default) (default {DEFAULT_CASES})",
    )
    p.add_argument("--ctx", type=int, default=1024, help="decode position: tokens already in the cache (default 1024)")
    p.add_argument("--json", default=None, help="write everything measured (rank 0; rewritten after every case)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds: skip what would end after this")
    p.add_argument("--peer", default=DEFAULT_PEER, help="the peer's peer_llama_tp.py (default ../shared/bench/)")
    p.add_argument(
        "--peer-modes",
        type=parse_modes,
        default=None,
        help=f"peer variants, in order ({', '.join(PEER_MODES)}, or none); default {DEFAULT_PEER_MODES}",
    )
    p.add_argument("--no-mk", action="store_true", help="time the peer only")
    p.add_argument("--no-check", action="store_true", help="skip the eager check of mkcompiler's logits")
    p.add_argument("--tol", type=float, default=TOL, help=f"flag a logits rel err above this (default {TOL:g})")
    p.add_argument("--iters", type=int, default=20, help="timed calls per variant and rank (default 20, the peer's)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3, the peer's)")
    p.add_argument("--seed", type=int, default=0, help="weights, caches and tokens (default 0)")
    p.add_argument("--prefill-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="retry a prefill that fails to compile with half the tokens (default on)")  # fmt: skip
    p.add_argument("--min-prefill-chunk", type=int, default=512, help="smallest retried prefill chunk (default 512)")
    p.add_argument("--all-logits", action="store_true", help="prefill: LM head over every position (not the last)")
    p.add_argument("--keep-kernels", action="store_true",
                   help="keep every case's megakernel (and its symmetric memory) alive to the end")  # fmt: skip
    p.add_argument("--opt", action="append", default=[], metavar="K=V", help="mkcompiler.compile option (repeatable)")
    p.add_argument("--exchange", action="store_true",
                   help="the post-attention exchange (tp.default_plan(model, exchange=True): attention outputs "
                        "ExchangeParallel) instead of row-wise O projections")  # fmt: skip
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, one profiled launch per case: rank 0's stamps, Gantt chart and summary "
                        "(communication overlap) under DIR (GPUs only)")  # fmt: skip
    p.add_argument(
        "--dry-run",
        action="store_true",
        help=f"no GPU, one process: tiny shapes, {DRY_TP} ranks in the Triton interpreter, the peer eager on the CPU",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    if a.cases is None:
        a.cases = parse_cases(DEFAULT_CASES)
    if a.peer_modes is None:
        a.peer_modes = parse_modes(DEFAULT_PEER_MODES)
    for what in ("layers", "iters", "min_prefill_chunk"):
        if getattr(a, what) < 1:
            p.error(f"--{what.replace('_', '-')}: expected a positive integer")
    if a.ctx < 0 or a.warmup < 0:
        p.error("--ctx and --warmup: expected 0 or more")
    if a.time_budget is not None and a.time_budget <= 0:
        p.error("--time-budget: expected a positive number of seconds")
    return a


# ---------------------------------------------------------------- shapes, memory, scaling


def llama_config(model: str, layers: int, dry: bool = False) -> LlamaConfig:
    """examples/llama.py's config for --model with `layers` layers (or the dry run's tiny one)."""
    if dry:
        s = DRY_SHAPES
        return LlamaConfig(
            vocab_size=s["vocab"],
            dim=s["dim"],
            n_layers=layers,
            n_heads=s["heads"],
            n_kv_heads=s["kv_heads"],
            hidden=s["ffn"],
        )
    return dataclasses.replace(CONFIGS[MODELS[model]], n_layers=layers)


def shapes_of(c: LlamaConfig, depth: int) -> dict:
    """A config in the peer's SHAPES format."""
    return dict(
        dim=c.dim, ffn=c.hidden, depth=depth, heads=c.n_heads, kv_heads=c.n_kv_heads, hd=c.head_dim, vocab=c.vocab_size
    )


def shape_mismatch(ours: dict, peer: dict) -> list[str]:
    return [f"{k}: ours {ours[k]}, peer {peer.get(k)}" for k in ours if ours[k] != peer.get(k)]


def max_seq_len(ctx: int, tokens: int) -> int:
    return ctx + tokens + PEER_EXTRA_SEQ


def kv_heads_per_rank(n_kv: int, tp: int) -> int:
    return n_kv // tp if n_kv % tp == 0 else 1  # more ranks than kv heads: replicated (mkcompiler.tp.plan, the peer)


def memory_estimate(
    c: LlamaConfig, tp: int, batch: int, tokens: int, ctx: int, dtype_bytes: int = 2, chunk: int = 0
) -> dict:
    """Bytes per GPU (every rank alike) that the case allocates besides activations: the model's
    weights (whole, on every rank: shards are views), its KV caches (whole: the eager reference
    and the source of the shards' caches), mkcompiler's shard caches, and the peer's sharded
    weights and caches. mkcompiler's activations and symmetric-memory arena, torch.compile's
    buffers and CUDA-graph pools come on top (the run prints measured peaks). chunk > 0: a mixed
    step (batch decoders and a chunk): B + 1 cache rows of max_seq_len(ctx, chunk), on both sides
    (the peer's decode model has B rows, its prefill model 1, one copy of the weights)."""
    d, hd, L, f = c.dim, c.head_dim, c.n_layers, c.hidden
    layer = d * c.n_heads * hd * 2 + d * c.n_kv_heads * hd * 2 + 3 * d * f + 2 * d
    weights = (L * layer + 2 * c.vocab_size * d + d) * dtype_bytes
    seq = max_seq_len(ctx, chunk if chunk else tokens)
    rows = batch + 1 if chunk else batch
    kv = kv_heads_per_rank(c.n_kv_heads, tp)
    cache = lambda heads: 2 * L * rows * heads * seq * hd * dtype_bytes  # noqa: E731
    nh = c.n_heads // tp
    peer_layer = (nh + 2 * kv) * hd * d + d * nh * hd + 3 * (f // tp) * d + 2 * d
    peer_weights = (L * peer_layer + (c.vocab_size // tp) * d + d) * dtype_bytes
    out = {
        "weights": weights,
        "model_kv_caches": cache(c.n_kv_heads),
        "mk_shard_kv_caches": cache(kv) if tp > 1 else 0,
        "peer_weights": peer_weights,
        "peer_kv_caches": cache(kv),
    }
    out["total"] = sum(out.values())
    return out


def scaled_ms(ms: float, layers: int, depth: int) -> float:
    """The peer's whole-model figure: measured ms / layers x depth (its `per_layer * depth`)."""
    return ms / layers * depth


def tokens_per_s(batch: int, tokens: int, full_ms: float, chunk: int = 0) -> float:
    """Tokens per step (batch x tokens, plus a mixed step's chunk) / the step's seconds."""
    return (batch * tokens + chunk) / (full_ms / 1e3)


# ---------------------------------------------------------------- ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """This process's rank of the torchrun group (one GPU each). Collectives: every rank must
    call them in the same order (the script's control flow only depends on agreed values)."""

    cuda = True

    def __init__(self):
        import torch.distributed as dist

        if "RANK" not in os.environ:  # plain `python tp_throughput.py` on one GPU: a group of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        self.device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=self.device)
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.tp = self.world  # mkcompiler's tensor_parallel and the peer's ws
        self.peer_ws = self.world

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        self.sync()
        self.dist.barrier(device_ids=[self.device.index])

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank."""
        t = torch.tensor([1 if flag else 0], device=self.device)
        self.dist.broadcast(t, 0)
        return bool(t.item())

    def all_ok(self, ok: bool) -> bool:
        t = torch.tensor([0 if ok else 1], device=self.device)
        self.dist.all_reduce(t)
        return t.item() == 0

    def gather(self, values: list[float]) -> list[list[float]]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(out, t)
        return [o.tolist() for o in out]


class LocalRanks:
    """--dry-run: one process on the CPU; mkcompiler's ranks run together in the interpreter."""

    cuda = False
    rank, world = 0, 1

    def __init__(self, tp: int = DRY_TP):
        self.device = torch.device("cpu")
        self.tp = tp
        self.peer_ws = 1  # the peer's collectives need a process group: unsharded here

    def sync(self) -> None:
        pass

    def barrier(self) -> None:
        pass

    def agree(self, flag: bool) -> bool:
        return bool(flag)

    def all_ok(self, ok: bool) -> bool:
        return bool(ok)

    def gather(self, values: list[float]) -> list[list[float]]:
        return [list(values)]


# ---------------------------------------------------------------- time budget


class BudgetExceeded(BaseException):
    """SIGTERM (as `timeout` sends): a BaseException, so no `except Exception` swallows it."""


class Budget:
    """Does a phase still fit in --time-budget: the longest time it took so far x SAFETY, else
    a guess (DEFAULT_ESTIMATES). Only rank 0's answer counts (Ranks.agree)."""

    def __init__(self, seconds: float | None, clock=time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.start = clock()
        self.seen: dict[str, float] = {}

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def estimate(self, phase: str) -> float:
        if phase in self.seen:
            return SAFETY * self.seen[phase]
        return DEFAULT_ESTIMATES.get(phase, 60.0)

    def fits(self, *phases: str) -> bool:
        return self.seconds is None or self.left() - RESERVE_S >= sum(self.estimate(p) for p in phases)

    def record(self, phase: str, seconds: float) -> None:
        self.seen[phase] = max(seconds, self.seen.get(phase, 0.0))


def _raise_budget(signum, frame):
    raise BudgetExceeded(signal.Signals(signum).name)


# ---------------------------------------------------------------- models


class LastPosition(nn.Module):
    """Wraps the final norm so that it (and the LM head after it) sees the last position only:
    the peer's model returns the last position's logits, and so does this one."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x[:, -1:])


def build_base(c: LlamaConfig, device, seed: int) -> Llama:
    """Weights once per run (random, seeded: the same on every rank), with token caches."""
    with default_dtype_and_device(torch.bfloat16, device):  # no fp32 copy of 21 GB first
        base = random_llama(c, dtype=torch.bfloat16, device=device, seed=seed, max_seq_len=8, max_batch=1)
    return base.eval()


def case_model(base: Llama, batch: int, seq: int, device, seed: int, last_only: bool) -> Llama:
    """A Llama sharing `base`'s weights (same tensors) with KV caches for this case,
    [batch, kv heads, seq, head dim], filled with random values (seeded: the same on every rank)."""
    c = dataclasses.replace(base.c, max_batch=batch, max_seq_len=seq)
    with torch.device("meta"):
        m = Llama(c)
    m.load_state_dict(base.state_dict(), assign=True)  # parameters: base's tensors, no copies
    m.inv_freq = base.inv_freq
    gen = torch.Generator(device=device).manual_seed(seed + 1000)
    shape = (batch, c.n_kv_heads, seq, c.head_dim)
    for layer in m.layers:
        for name in ("k_cache", "v_cache"):
            t = torch.empty(shape, dtype=torch.bfloat16, device=device)
            t.normal_(0.0, 0.5, generator=gen)
            setattr(layer.attn, name, t)
    if last_only:
        m.norm = LastPosition(m.norm)
    return m.eval()


def case_inputs(c: LlamaConfig, case: Case, tokens: int, ctx: int, device, seed: int):
    """(tokens, positions); a mixed step: (chunk tokens [1, C], positions ctx..ctx+C-1, the
    decoders' tokens [B, 1], their positions: ctx each), MixedStep's inputs."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    if case.kind == "mixed":
        chunk_tok = torch.randint(0, c.vocab_size, (1, case.chunk), device=device, generator=gen)
        dec_tok = torch.randint(0, c.vocab_size, (case.batch, 1), device=device, generator=gen)
        chunk_pos = torch.arange(ctx, ctx + case.chunk, device=device)
        dec_pos = torch.full((case.batch,), ctx, dtype=torch.long, device=device)
        return chunk_tok, chunk_pos, dec_tok, dec_pos
    tok = torch.randint(0, c.vocab_size, (case.batch, tokens), device=device, generator=gen)
    pos = torch.tensor([ctx], device=device) if case.kind == "decode" else torch.arange(tokens, device=device)
    return tok, pos


def load_peer(path: str):
    """The peer's module (its file executed as a module; its main() does not run), or None."""
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("peer_llama_tp", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("peer_llama_tp", mod)  # torch.compile and pickling look modules up by name
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- timing


def time_fn(fn, ranks, iters: int, warmup: int) -> dict:
    """The peer's bench(): warm-up, barrier, then each call between CUDA events and a sync; the
    median (sorted[n // 2]) per rank. Returns rank 0's median, the max over ranks, every rank's."""
    for _ in range(warmup):
        fn()
    ranks.barrier()
    ts = []
    for _ in range(iters):
        if ranks.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    med = sorted(ts)[len(ts) // 2]
    meds = [r[0] for r in ranks.gather([med])]
    return {"rank0": meds[0], "max": max(meds), "ranks": meds, "min_rank_local": min(ts)}


# ---------------------------------------------------------------- mkcompiler


class MkHandle:
    """A compiled megakernel bound to its inputs: call (the whole call), launch (kernel only),
    check (read the error record), first() (rank 0's outputs, do all ranks agree)."""

    def __init__(self, ranks, model, inputs, opts: dict, exchange: bool = False):
        from mkcompiler.tp import plan as tp

        self.ranks, self.inputs = ranks, inputs
        plan = tp.default_plan(model, exchange=exchange)
        if ranks.cuda:
            import mkcompiler

            self.mk = mkcompiler.compile(model, inputs, tensor_parallel=ranks.tp, tp_plan=plan, **opts)
            self.info = {"instructions": len(self.mk.queue), "workers": self.mk.num_workers}
            self.info["timings"] = {k: round(v, 3) for k, v in self.mk.timings.items()}
        else:  # every rank in this process, the Triton interpreter
            from mkcompiler.tp.runtime import compile_world

            opts = {"num_workers": 2, "max_spin": 200_000, **opts}
            self.mk = compile_world(tp.shard_ranks(model, ranks.tp, plan), inputs, each_rank=False, **opts)
            self.info = {"instructions": len(self.mk.queue), "workers": self.mk.ranks[0].num_workers}

    def call(self):
        return self.mk(*self.inputs)

    def launch(self):
        if self.ranks.cuda:
            self.mk.launch()
        else:
            self.mk.run(*self.inputs)  # World has no bare launch: the whole call

    def check(self) -> None:
        if self.ranks.cuda:
            self.mk.check()

    def first(self):
        """The first call (on a GPU it compiles the Triton kernel): rank 0's outputs, and whether
        every rank's outputs are the same (checksums on GPUs, the tensors in the dry run)."""
        if self.ranks.cuda:
            out = self.call()
            self.ranks.sync()
            f = out.float()
            sums = self.ranks.gather([f.sum().item(), f.abs().sum().item()])
            return out, all(s == sums[0] for s in sums)
        outs = self.mk.run(*self.inputs)
        return outs[0], all(torch.equal(outs[0], o) for o in outs[1:])


def run_mk(ranks, base, case: Case, row: dict, args, budget: Budget, keep: list):
    """Build the case's model, compile (a prefill that fails: halve the chunk), check, time. A mixed
    step: MixedStep around a Llama of B + 1 cache rows (every row's logits: no LastPosition)."""
    c = base.c
    tokens = row["tokens"]
    mixed = case.kind == "mixed"
    opts = compile_options(args.opt)
    while True:
        model = handle = None
        err = None
        try:
            t0 = time.perf_counter()
            seq = max_seq_len(args.ctx, case.chunk if mixed else tokens)
            last_only = case.kind == "prefill" and case.tokens > 1 and not args.all_logits
            model = case_model(base, case.cache_rows, seq, ranks.device, args.seed, last_only)
            if mixed:
                model = MixedStep(model).eval()
            inputs = case_inputs(c, case, tokens, args.ctx, ranks.device, args.seed)
            ranks.sync()
            budget.record("build", time.perf_counter() - t0)
            t0 = time.perf_counter()
            handle = MkHandle(ranks, model, inputs, opts, exchange=args.exchange)
            if args.exchange:
                row["notes"].append("mkcompiler with the post-attention exchange (tp.ExchangeParallel)")
            row["compile_s"]["mkcompiler"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            err = e
            _error(row, "mkcompiler compile" + (f" ({tokens} tokens)" if case.kind == "prefill" else ""), e, ranks)
        ok = ranks.all_ok(err is None)
        if ok:
            break
        model = handle = err = None
        free_memory()
        half = tokens // 2
        if case.kind != "prefill" or not args.prefill_fallback or half < args.min_prefill_chunk:
            return None
        if not ranks.agree(budget.fits("mk:prefill")):
            row["skipped"].append(f"mkcompiler prefill chunk {half} (time budget)")
            return None
        tokens = half
        row["tokens"] = tokens
        row["notes"].append(f"prefill of {case.tokens} tokens did not compile: chunk of {tokens} tokens")
        say_0(ranks, f"  prefill {case.tokens}: compile failed; retrying with a chunk of {tokens} tokens")
    row["mk"] = dict(handle.info, max_seq_len=seq)
    what = f"a chunk of {case.chunk} + {case.batch} decode tokens" if mixed else f"{tokens} tokens"
    say_0(
        ranks,
        f"  mkcompiler compiled in {row['compile_s']['mkcompiler']:.1f} s: {handle.info['instructions']} "
        f"instructions, {handle.info['workers']} workers, tensor_parallel={ranks.tp}, {what}",
    )
    t0 = time.perf_counter()
    out, agree = handle.first()
    row["first_call_s"]["mkcompiler"] = time.perf_counter() - t0
    row["ranks_agree"] = agree
    say_0(ranks, f"  first call {row['first_call_s']['mkcompiler']:.1f} s (Triton compile); ranks agree: {agree}")
    if not args.no_check and ranks.rank == 0:
        try:
            with torch.no_grad():
                ref = model(*handle.inputs)
            row["rel_err"] = rel(out, ref)
            row["tol_exceeded"] = not row["rel_err"] <= args.tol
            flag = "  FLAG: above tol" if row["tol_exceeded"] else ""
            say(f"  logits rel err vs eager (whole model, rank 0): {row['rel_err']:.2e} (tol {args.tol:g}){flag}")
            del ref
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for the eager reference
            _error(row, "eager check", e, ranks)
    out = None
    ranks.barrier()
    if not agree:
        row["notes"].append("ranks' logits differ")
    row["ms"][MK_CALL] = time_fn(handle.call, ranks, args.iters, args.warmup)
    row["ms"][MK_KERNEL] = time_fn(handle.launch, ranks, args.iters, args.warmup)
    handle.check()  # an error record left by the timed launches raises here
    say_0(
        ranks,
        f"  mkcompiler: call {_ms(row['ms'][MK_CALL])}, kernel {_ms(row['ms'][MK_KERNEL])} "
        f"(rank 0 median / max over ranks, {args.layers} layers)",
    )
    if ranks.cuda:
        row["mem"]["mk_peak_gb"] = torch.cuda.max_memory_allocated(ranks.device) / 1e9
    if args.profile:
        profile_case(handle, ranks, case, row, args.profile)
    ranks.barrier()  # no peer may still read this rank's memory when it is freed
    if args.keep_kernels:
        keep.append(handle)
    return None


def profile_case(handle, ranks, case: Case, row: dict, out_dir: str) -> None:
    """One profiled launch on every rank (a collective; its kernel variant compiles first); rank
    0 writes its stamps (.npz), Gantt chart (.png) and summary (.txt) under out_dir and records
    how much of the communication tiles' busy time other tiles ran beside (Profile.overlap)."""
    if not ranks.cuda:
        row["skipped"].append("profile (dry run: World has no profiled launch)")
        return
    try:
        prof = handle.mk.profile(*handle.inputs)
    except Exception as e:  # noqa: BLE001 - the timings above stand
        _error(row, "mkcompiler profile", e, ranks)
        return
    if ranks.rank != 0:
        return
    import numpy as np

    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{case.name}_rank0")
    np.savez_compressed(base + ".npz", stamps=prof.stamps)
    span_us = prof.span() / 1e3
    prof.gantt(base + ".png", title=f"{case.name}, rank 0 of {ranks.tp}: {span_us:.0f} us")
    with open(base + ".txt", "w") as f:
        f.write(prof.summary())
    row["profile"] = {"files": base + ".{npz,png,txt}", "span_us": span_us, "comm_overlap": prof.overlap()}
    comm = row["profile"]["comm_overlap"]
    if comm:
        say(f"  profile: span {span_us:.1f} us; communication {comm['busy'] / 1e3:.1f} us busy, "
            f"{100 * comm['share']:.1f}% of it beside other tiles; {base}.png")  # fmt: skip


# ---------------------------------------------------------------- the peer


def peer_twin(peer, like, shapes: dict, layers: int, ws: int, batch: int, seq: int, dev):
    """The peer's model for another batch sharing `like`'s weights and rope tables (one copy of
    the weights): built on the meta device, then given like's tensors (same shapes: `seq` must be
    like's) and KV caches of its own (zeros, as the peer's)."""
    m = peer.ShardedLlama(shapes, layers, ws, batch, seq, "meta")
    for mine, theirs in zip(m.L, like.L, strict=True):
        for k, t in mine.items():
            if t.dim() == 4:  # a cache [batch, kv heads, seq, head dim]
                mine[k] = torch.zeros(t.shape, dtype=t.dtype, device=dev)
            elif theirs[k].shape == t.shape:
                mine[k] = theirs[k]
            else:
                raise RuntimeError(f"peer layer tensor {k}: {tuple(t.shape)} here, {tuple(theirs[k].shape)} to share")
    for name, t in list(vars(m).items()):
        if isinstance(t, torch.Tensor):
            if getattr(like, name).shape != t.shape:
                raise RuntimeError(f"peer tensor {name}: {tuple(t.shape)}, {tuple(getattr(like, name).shape)} to share")
            setattr(m, name, getattr(like, name))
    tensors = [t for layer in m.L for t in layer.values()] + [
        t for t in vars(m).values() if isinstance(t, torch.Tensor)
    ]
    if any(t.is_meta for t in tensors):
        raise RuntimeError("the peer's model has tensors this script does not know (left on the meta device)")
    return m


def peer_calls(peer, ranks, case: Case, tokens: int, shapes: dict, args) -> list[tuple]:
    """The peer's model calls of one step, [(model, hidden states, positions)]: one (a decode
    step of batch B at ctx, or a prefill at 0..T-1); a mixed step two, what a server without
    mixing runs: a decode step of batch B at ctx, then the chunk's prefill at ctx..ctx+C-1 (both
    models with mkcompiler's cache length, max_seq_len(ctx, C), one copy of the weights)."""
    dev, dim, ctx = ranks.device, shapes["dim"], args.ctx
    torch.manual_seed(args.seed + 7)
    if case.kind != "mixed":
        B, T = case.batch, tokens
        m = peer.ShardedLlama(shapes, args.layers, ranks.peer_ws, B, max_seq_len(ctx, T), dev)
        x = torch.randn(B, T, dim, device=dev, dtype=torch.bfloat16)
        pos = torch.arange(ctx, ctx + T, device=dev) if case.kind == "decode" else torch.arange(T, device=dev)
        return [(m, x, pos)]
    B, C, seq = case.batch, case.chunk, max_seq_len(ctx, case.chunk)
    dec = peer.ShardedLlama(shapes, args.layers, ranks.peer_ws, B, seq, dev)
    pre = peer_twin(peer, dec, shapes, args.layers, ranks.peer_ws, 1, seq, dev)
    return [
        (dec, torch.randn(B, 1, dim, device=dev, dtype=torch.bfloat16), torch.arange(ctx, ctx + 1, device=dev)),
        (pre, torch.randn(1, C, dim, device=dev, dtype=torch.bfloat16), torch.arange(ctx, ctx + C, device=dev)),
    ]


def peer_step(calls: list[tuple], mode: str):
    """One function running the step's calls (each model's forward; compiled per PEER_MODES[mode],
    each on its own). Two calls: static shapes (dynamic=False: no automatic dynamic shapes from
    the second model's recompile; the peer compiles each case afresh), and with CUDA graphs each
    step marked as a new one (two graphs replayed in turn)."""
    how = PEER_MODES[mode]
    if how is None:
        fns = [m.forward for m, _, _ in calls]
    elif len(calls) == 1:
        fns = [torch.compile(calls[0][0].forward, mode=how)]
    else:
        fns = [torch.compile(m.forward, mode=how, dynamic=False) for m, _, _ in calls]
    if len(calls) == 1:
        (f,), (_, x, pos) = fns, calls[0]
        return lambda: f(x, pos)
    graphs = how in ("reduce-overhead", "max-autotune")

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        for f, (_, x, pos) in zip(fns, calls):
            f(x, pos)

    return step


def run_peer(peer, ranks, case: Case, row: dict, shapes: dict, args, budget: Budget) -> None:
    dev = ranks.device
    calls = built = None
    try:
        with torch.no_grad():
            try:
                calls = peer_calls(peer, ranks, case, row["tokens"], shapes, args)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory
                built = e
                _error(row, "peer build", e, ranks)
            if not ranks.all_ok(built is None):
                return
            if len(calls) > 1:
                row["notes"].append(
                    f"peer: decode {case.batch} + prefill {case.chunk}, two calls per step (it has no mixed step)"
                )
            for mode in args.peer_modes:
                impl, phase = f"peer {mode}", f"peer:{mode}"
                if not ranks.cuda and mode != "eager":
                    row["skipped"].append(f"{impl} (dry run)")
                    continue
                if not ranks.agree(budget.fits(phase)):
                    row["skipped"].append(f"{impl} (time budget)")
                    say_0(ranks, f"  skipped {impl}: {budget.left():.0f} s left, needs ~{budget.estimate(phase):.0f} s")
                    continue
                t_phase = time.perf_counter()
                failed = None
                try:
                    f = peer_step(calls, mode)
                    t0 = time.perf_counter()
                    f()
                    ranks.sync()
                    row["first_call_s"][impl] = time.perf_counter() - t0
                    row["ms"][impl] = time_fn(f, ranks, args.iters, args.warmup)
                    say_0(ranks, f"  {impl}: first call {row['first_call_s'][impl]:.1f} s, {_ms(row['ms'][impl])}")
                except Exception as e:  # noqa: BLE001
                    failed = e
                    _error(row, impl, e, ranks)
                    row["ms"].pop(impl, None)
                f = None
                if not ranks.all_ok(failed is None):
                    row["ms"].pop(impl, None)
                failed = None
                if PEER_MODES[mode] is not None:
                    torch._dynamo.reset()
                budget.record(phase, time.perf_counter() - t_phase)
                if ranks.cuda:
                    row["mem"][f"{impl} peak_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
    finally:
        calls = built = None
        free_memory()


# ---------------------------------------------------------------- table and JSON


def _ms(t: dict) -> str:
    return f"{t['rank0']:.3f} / {t['max']:.3f} ms"


def say_0(ranks, *a) -> None:
    if ranks.rank == 0:
        say(*a)


def _error(row: dict, phase: str, e: BaseException, ranks) -> None:
    row["errors"][phase] = f"rank {ranks.rank}: {type(e).__name__}: {e}"[:4000]
    row.setdefault("tracebacks", {})[phase] = traceback.format_exc()[-6000:]
    print(f"  [rank {ranks.rank}] {phase} FAILED: {type(e).__name__}: {str(e)[:800]}", flush=True)
    print(traceback.format_exc()[-2000:], file=sys.stderr, flush=True)


def derived(row: dict, layers: int, depth: int) -> dict:
    """Per implementation: ms/step and tokens/s at full depth (from the max over ranks, the
    peer's number), and the best peer baseline's scaled ms / this one's."""
    full = {k: scaled_ms(v["max"], layers, depth) for k, v in row["ms"].items()}
    tps = {k: tokens_per_s(row["batch"], row["tokens"], v, row.get("chunk", 0)) for k, v in full.items()}
    base = {k: v for k, v in full.items() if k.startswith("peer ")}
    best = min(base, key=base.get) if base else None
    vs = {k: base[best] / v for k, v in full.items()} if best else {}
    return {"full_ms": full, "tokens_per_s": tps, "best_baseline": best, "vs_best_baseline": vs}


def format_case(row: dict, meta: dict) -> str:
    """A markdown table for one case (heading line, table, notes)."""
    layers, depth = meta["layers"], meta["depth"]
    d = derived(row, layers, depth)
    what = f"batch {row['batch']}, {row['tokens']} token{'s' if row['tokens'] > 1 else ''}"
    where = f"context {row['ctx']}" if row["kind"] == "decode" else f"positions 0..{row['tokens'] - 1}"
    peer_how = ""
    if row["kind"] == "mixed":
        ctx, C, B = row["ctx"], row["chunk"], row["batch"]
        what = f"one step of {C + B} tokens: a prefill chunk of {C} at positions {ctx}..{ctx + C - 1}"
        where = f"{B} decode token{'s' if B > 1 else ''} at context {ctx}"
        peer_how = f" (decode {B} + prefill {C}, two calls)"
    lines = [
        f"### {row['case']}: {what}, {where} ({meta['model']}, TP={meta['tp']}, {meta['device']}; "
        f"{layers} layers measured, scaled to {depth})",
        "",
        f"| implementation | measured ms, rank 0 median | measured ms, max over ranks | ms/step, {depth} layers "
        "| tokens/s | vs best baseline |",
        "|---|---|---|---|---|---|",
    ]
    order = [MK_KERNEL, MK_CALL] + [f"peer {m}" for m in PEER_MODES]
    for k in order + sorted(set(row["ms"]) - set(order)):
        if k not in row["ms"]:
            continue
        t = row["ms"][k]
        vs = d["vs_best_baseline"].get(k)
        label = IMPL_LABEL.get(k, k) + (peer_how if k.startswith("peer ") else "")
        lines.append(
            f"| {label} | {t['rank0']:.3f} | {t['max']:.3f} | {d['full_ms'][k]:.2f} "
            f"| {d['tokens_per_s'][k]:,.0f} | {'—' if vs is None else f'{vs:.2f}x'} |"
        )
    notes = []
    if row.get("rel_err") is not None:
        notes.append(
            f"mkcompiler logits rel err vs eager {row['rel_err']:.2e} (tol {meta['tol']:g})"
            + (" FLAG" if row.get("tol_exceeded") else "")
        )
    if row.get("ranks_agree") is not None:
        notes.append("ranks agree" if row["ranks_agree"] else "RANKS DISAGREE")
    for k, v in row["compile_s"].items():
        notes.append(f"{k} compile {v:.1f} s")
    for k, v in row["first_call_s"].items():
        notes.append(f"{k} first call {v:.1f} s")
    notes += row["notes"]
    notes += [f"skipped {s}" for s in row["skipped"]]
    notes += [f"{k} failed: {v.splitlines()[0][:200]}" for k, v in row["errors"].items()]
    readme = PEER_README.get((row["kind"], row["batch"], row["tokens"]))
    if readme and meta["model"] == "llama-70b" and meta["tp"] == 4 and layers == 10 and row["ctx"] == 1024:
        notes.append(
            "peer's published figures (4 x H200, other run): "
            + ", ".join(f"{m} {v:g} ms/step" for m, v in readme.items())
        )
    if notes:
        lines += ["", "; ".join(notes).replace("|", "/") + "."]
    return "\n".join(lines)


def write_json(path: str | None, result: dict) -> None:
    if not path:
        return
    for row in result["cases"]:
        row["derived"] = derived(row, result["layers"], result["depth"])
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


def new_row(case: Case, ctx: int) -> dict:
    return {
        "case": case.name,
        "kind": case.kind,
        "batch": case.batch,
        "tokens": case.tokens,
        "chunk": case.chunk,
        "step_tokens": case.step_tokens,
        "ctx": ctx if case.kind in ("decode", "mixed") else 0,
        "status": "not run",
        "ms": {},
        "compile_s": {},
        "first_call_s": {},
        "rel_err": None,
        "tol_exceeded": False,
        "ranks_agree": None,
        "mem": {},
        "notes": [],
        "skipped": [],
        "errors": {},
    }


# ---------------------------------------------------------------- main


def env_info(ranks) -> dict:
    info = {"git": git_info(), "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if ranks.cuda:
        props = torch.cuda.get_device_properties(ranks.device)
        info.update(
            device=torch.cuda.get_device_name(ranks.device),
            sm_count=props.multi_processor_count,
            gpu_memory_gb=props.total_memory / 1e9,
        )
    else:
        info["device"] = "CPU (dry run: Triton interpreter)"
    return info


def memory_table(model: str, layers: int, ctx: int, cases: list[Case], tps=(2, 4)) -> dict:
    """memory_estimate of the real shapes for TP = 2 and 4, printed; {"TP=N case": {part: GB}}."""
    c = llama_config(model, layers)
    say(f"per-GPU memory of the real run ({model}, {layers} layers, ctx {ctx}), GB, before activations:")
    say("| TP | case | weights | model caches | shard caches | peer weights | peer caches | total |")
    say("|---|---|---|---|---|---|---|---|")
    out = {}
    for tp in tps:
        for k in cases:
            e = {n: v / 1e9 for n, v in memory_estimate(c, tp, k.batch, k.tokens, ctx, chunk=k.chunk).items()}
            out[f"TP={tp} {k.name}"] = {n: round(v, 3) for n, v in e.items()}
            say(
                f"| {tp} | {k.name} | {e['weights']:.1f} | {e['model_kv_caches']:.1f} | {e['mk_shard_kv_caches']:.1f} "
                f"| {e['peer_weights']:.1f} | {e['peer_kv_caches']:.1f} | {e['total']:.1f} |"
            )
    return out


def dry_case(case: Case) -> Case:
    """--dry-run's stand-in for a case: decode64 -> batch 1, decode256 -> 4; prefill -> 8 tokens;
    mixed512+64 -> a chunk of 8 and batch 1."""
    if case.kind == "decode":
        return dataclasses.replace(case, batch=max(1, case.batch // 64))
    if case.kind == "mixed":
        return dataclasses.replace(case, chunk=min(case.chunk, 8), batch=max(1, case.batch // 64))
    return dataclasses.replace(case, tokens=min(case.tokens, 8))


def main(argv=None) -> int:
    args = parse_args(argv)
    real_layers, real_ctx = args.layers, args.ctx
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before mkcompiler (and triton) are imported
        args.layers, args.ctx = DRY_LAYERS, DRY_CTX
        args.iters, args.warmup = min(args.iters, DRY_ITERS), 0
        args.min_prefill_chunk = min(args.min_prefill_chunk, 4)
        ranks = LocalRanks()
    else:
        if not torch.cuda.is_available():
            say("tp_throughput needs CUDA GPUs under torchrun (or --dry-run)")
            return 2
        ranks = Ranks()
    if _OVERRIDDEN:
        say_0(ranks, f"NVLink multicast forced off (was {_OVERRIDDEN})")
    budget = Budget(args.time_budget)
    old = {s: signal.signal(s, _raise_budget) for s in (signal.SIGTERM,)}
    c = llama_config(args.model, args.layers, dry=args.dry_run)
    depth = DRY_SHAPES["depth"] if args.dry_run else CONFIGS[MODELS[args.model]].n_layers
    cases = [dry_case(k) for k in args.cases] if args.dry_run else list(args.cases)
    result = {
        "model": args.model,
        "layers": args.layers,
        "depth": depth,
        "N": ranks.world,
        "world": ranks.world,
        "tp": ranks.tp,
        "args": {k: (v if k != "cases" else [x.name for x in v]) for k, v in vars(args).items()},
        "scaling": "ms/step = measured ms (max over ranks' medians) / layers x depth (the peer's); "
        "tokens/s = tokens per step (batch x tokens; a mixed step: chunk + batch) / that",
        "multicast_env": {k: os.environ.get(k) for k in MULTICAST_OFF},
        "cases": [new_row(k, args.ctx) for k in cases],
        "stopped": None,
    }
    keep: list = []
    rc = 0
    meta = {}
    try:
        result.update(env_info(ranks))
        result["commit"] = result["git"]["commit"]
        meta = dict(
            model=args.model + (" (dry run: tiny shapes)" if args.dry_run else ""),
            tp=ranks.tp,
            device=result["device"],
            layers=args.layers,
            depth=depth,
            tol=args.tol,
        )
        ours = shapes_of(c, depth)
        peer = None
        try:
            peer = load_peer(args.peer)
        except Exception as e:  # noqa: BLE001
            say_0(ranks, f"peer baseline {args.peer} failed to load ({type(e).__name__}: {e}): skipping it")
        if peer is None:
            say_0(ranks, f"peer baseline not found at {os.path.abspath(args.peer)}: skipping it")
        shapes = ours
        if peer is not None and not args.dry_run:
            shapes = peer.SHAPES[args.model]
            bad = shape_mismatch(ours, shapes)
            if bad:
                say_0(ranks, f"WARNING: the peer's {args.model} shapes differ from ours: {'; '.join(bad)}")
        result["peer"] = {"path": os.path.abspath(args.peer), "loaded": peer is not None, "shapes": shapes}
        say_0(
            ranks,
            f"{result['device']} x {ranks.world} process(es), tensor_parallel={ranks.tp}; torch {result['torch']}, "
            f"triton {result['triton']}, commit {result['git']['commit']}{' (dirty)' if result['git']['dirty'] else ''}",
        )
        say_0(
            ranks,
            f"{args.model}: {args.layers} of {depth} layers (dim {c.dim}, FFN {c.hidden}, {c.n_heads} heads, "
            f"{c.n_kv_heads} KV heads of {c.head_dim}, vocab {c.vocab_size}); cases {', '.join(k.name for k in cases)}; "
            f"peer modes {', '.join(args.peer_modes) or 'none'}",
        )
        for row, k in zip(result["cases"], cases):
            est = memory_estimate(c, ranks.tp, k.batch, k.tokens, args.ctx, chunk=k.chunk)
            row["mem"]["estimate_gb"] = {n: round(v / 1e9, 3) for n, v in est.items()}
            say_0(
                ranks,
                f"  {k.name}: per GPU ~{est['total'] / 1e9:.1f} GB before activations (weights {est['weights'] / 1e9:.1f}, "
                f"model caches {est['model_kv_caches'] / 1e9:.1f}, shard caches {est['mk_shard_kv_caches'] / 1e9:.1f}, "
                f"peer weights {est['peer_weights'] / 1e9:.1f}, peer caches {est['peer_kv_caches'] / 1e9:.1f})",
            )
        if args.dry_run:  # what the real run would allocate
            result["memory_estimates_real_gb"] = memory_table(args.model, real_layers, real_ctx, args.cases)
        t0 = time.perf_counter()
        base = None if args.no_mk else build_base(c, ranks.device, args.seed)
        ranks.sync()
        say_0(ranks, f"weights built in {time.perf_counter() - t0:.1f} s")
        for i, (row, case) in enumerate(zip(result["cases"], cases)):
            tag = f"[{i + 1}/{len(cases)}] {case.name}"
            mk_phase = f"mk:{case.kind}"
            need = ("build", mk_phase) if not args.no_mk else ("peer:eager",)
            if not ranks.agree(budget.fits(*need)):
                result["stopped"] = f"time budget: {budget.left():.0f} s left before {tag}"
                say_0(ranks, f"stopping: {result['stopped']}")
                break
            say_0(ranks, f"{tag} ({budget.elapsed():.0f} s elapsed)")
            row["status"] = "partial"
            if ranks.cuda:
                torch.cuda.reset_peak_memory_stats(ranks.device)
            if not args.no_mk:
                t0 = time.perf_counter()
                try:
                    run_mk(ranks, base, case, row, args, budget, keep)
                except Exception as e:  # noqa: BLE001
                    _error(row, "mkcompiler", e, ranks)
                free_memory()
                ranks.all_ok(True)  # every rank is past mkcompiler before the peer starts
                budget.record(mk_phase, time.perf_counter() - t0)
            if peer is not None:
                run_peer(peer, ranks, case, row, shapes, args, budget)
            row["status"] = "done"
            if row["errors"]:
                rc = 1
            if ranks.rank == 0:
                write_json(args.json, result)
                say("")
                say(format_case(row, meta))
                say("")
    except (BudgetExceeded, KeyboardInterrupt) as e:
        result["stopped"] = f"interrupted ({type(e).__name__} {e}) after {budget.elapsed():.0f} s"
        say_0(ranks, f"\nstopping: {result['stopped']}")
        rc = rc or 1
    except Exception as e:  # noqa: BLE001 - outside any case (building the weights, ...): report what was done
        result["error"] = f"rank {ranks.rank}: {type(e).__name__}: {e}"[:4000]
        print(f"[rank {ranks.rank}] FAILED: {result['error']}\n{traceback.format_exc()[-3000:]}", flush=True)
        rc = 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    result["elapsed_s"] = budget.elapsed()
    if ranks.rank == 0:
        write_json(args.json, result)
        done = [r for r in result["cases"] if r["status"] != "not run"]
        if done and meta:
            say(f"\n## Summary ({result['elapsed_s']:.0f} s)\n\n{LEGEND}.\n")
            for r in done:
                say(format_case(r, meta))
                say("")
        not_run = [r["case"] for r in result["cases"] if r["status"] == "not run"]
        if not_run:
            why = " (time budget)" if (result["stopped"] or "").startswith("time budget") else ""
            say(f"not run{why}: {', '.join(not_run)}")
        if args.json:
            say(f"wrote {args.json}")
    return rc


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if "--dry-run" in sys.argv[1:]:
        sys.exit(code)
    # No teardown: symmetric memory and NCCL have nothing left to do, and tearing them down at
    # exit can hang (tests/test_tp_gpu.py does the same).
    os._exit(code)
