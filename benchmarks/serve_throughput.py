"""End-to-end serving throughput (issue 21): mkcompiler.serve finishing a synthetic workload,
against transformers' own continuous batching and the same engine with torch.compile'd steps.

    python benchmarks/serve_throughput.py --size llama-3.2-1b --requests 512           # H100
    python benchmarks/serve_throughput.py --size llama-3.1-8b --requests 512 --rate 8  # a Poisson stream
    python benchmarks/serve_throughput.py --tiny                                       # CPU: tiny shapes, seconds

Workload (seeded, nothing downloaded): ShareGPT-like prompt and output lengths drawn from
log-normal distributions (means --prompt-mean 256 and --output-mean 128 tokens, sigma --sigma),
clipped so prompt + output fit --max-seq-len; prompt tokens uniform over the vocabulary. All
--requests requests are submitted at once, or (--rate R) as a Poisson stream of R requests/s.
Greedy decoding, no stop tokens: every request produces exactly its drawn output length.

Model: examples/hf_decode.py's SIZES (a Hugging Face LlamaForCausalLM of the real shapes, random
weights, --dtype). Engines (--engines, in order): mkcompiler (mkcompiler.serve, megakernel
steps), torch.compile (the same engine, steps through torch.compile; on a GPU mode
"reduce-overhead": each step shape a CUDA graph), eager (the same engine, eager steps), hf
(transformers' continuous batching manager, its paged "sdpa" attention, CUDA graphs asked for on
a GPU; skipped when the installed transformers has none). Step shapes (--buckets): the engine's
choice per backend (coarse for megakernels, powers of two otherwise). Each compiled engine first
compiles every step shape (--precompile, where there are at most PRECOMPILE_MAX), then every
engine gets a warm-up run of a few requests; neither is timed.

Reported per engine: requests/s, output tokens/s, time to first token (TTFT: arrival to first
token) and time per output token (TPOT: per request, (last - first token) / (tokens - 1)), p50
and p99 over requests, the engine's steps and compiles; --json PATH writes the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mkcompiler  # noqa: E402,F401  (before transformers: Triton must see TRITON_INTERPRET first)
from examples.hf_decode import SIZES  # noqa: E402
from mkcompiler.frontend.hf import random_model  # noqa: E402
from mkcompiler.serve import Engine, EngineConfig, SamplingParams  # noqa: E402
from mkcompiler.serve.batch import BUCKET_POLICIES  # noqa: E402

ENGINES = ("mkcompiler", "torch.compile", "eager", "hf")
PRECOMPILE_MAX = 64  # step shapes compiled up front at most (powers of two can make hundreds)


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_new_tokens: int
    arrival: float  # seconds after the start


def workload(n, seed, vocab, prompt_mean, output_mean, sigma, max_seq_len, rate=None) -> list[Request]:
    """n requests with log-normal prompt and output lengths of the given means (each >= 1, and
    prompt + output <= max_seq_len), arriving at 0 or as a Poisson stream of `rate` per second."""
    g = torch.Generator().manual_seed(seed)

    def lognormal(mean):
        mu = math.log(mean) - sigma**2 / 2  # the mean of exp(N(mu, sigma^2)) is `mean`
        return torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * sigma + mu).round().clamp_min(1).long()

    prompts = lognormal(prompt_mean).clamp_max(max_seq_len - 1)
    outputs = torch.minimum(lognormal(output_mean), max_seq_len - prompts)
    gaps = torch.distributions.Exponential(rate).sample((n,)) if rate else torch.zeros(n)
    arrivals = gaps.cumsum(0) if rate else gaps
    return [
        Request(torch.randint(0, vocab, (int(p),), generator=g).tolist(), int(o), float(a))
        for p, o, a in zip(prompts, outputs, arrivals)
    ]


@dataclass
class Timing:
    """Per request: arrival and token times (seconds after the start)."""

    arrival: float
    tokens: list[float]


@dataclass
class Row:
    engine: str
    requests: int
    seconds: float
    output_tokens: int
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    steps: int = 0
    compiles: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def summarize(engine: str, timings: list[Timing], seconds: float, steps=0, compiles=0) -> Row:
    ttft = [(t.tokens[0] - t.arrival) * 1e3 for t in timings if t.tokens]
    tpot = [(t.tokens[-1] - t.tokens[0]) * 1e3 / (len(t.tokens) - 1) for t in timings if len(t.tokens) > 1]
    out = sum(len(t.tokens) for t in timings)
    return Row(
        engine, len(timings), seconds, out, len(timings) / seconds, out / seconds,
        percentile(ttft, 0.5), percentile(ttft, 0.99), percentile(tpot, 0.5), percentile(tpot, 0.99), steps, compiles,
    )  # fmt: skip


def run_engine(engine: Engine, requests: list[Request], sync) -> tuple[list[Timing], float]:
    """Submit each request at its arrival time, step until all finish; token times as the host sees them."""
    pending = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
    timings = [Timing(r.arrival, []) for r in requests]
    index_of = {}  # engine request id -> index in `requests`
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and requests[pending[0]].arrival <= now:
            i = pending.pop(0)
            index_of[
                engine.add_request(requests[i].prompt, SamplingParams(max_new_tokens=requests[i].max_new_tokens))
            ] = i
        if not engine.has_unfinished():
            time.sleep(max(0.0, requests[pending[0]].arrival - now))
            continue
        produced = engine.step()  # its token read synchronizes with the device
        stamp = time.perf_counter() - start
        for rid, _ in produced:
            timings[index_of[rid]].tokens.append(stamp)
    sync()
    return timings, time.perf_counter() - start


def run_hf(
    model, requests: list[Request], sync, engine: EngineConfig, cuda_graphs: bool | None = None
) -> tuple[list[Timing], float]:
    """transformers' continuous batching manager: requests added at their arrival times, its
    cache and batch sized as our engine's (pages, page size, tokens and sequences per step);
    `cuda_graphs`: its use_cuda_graph (None: its own choice)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in requests))
    config.eos_token_id = None  # every request runs to its max_new_tokens, as on our engine
    batching = ContinuousBatchingConfig(
        block_size=engine.page_size, num_blocks=engine.pool_pages, max_batch_tokens=engine.max_batch_size + engine.chunk,
        max_requests_per_batch=engine.max_batch_size, allow_block_sharing=False, use_cuda_graph=cuda_graphs,
    )  # fmt: skip
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=batching)
    manager.start()
    timings, ids = [], {}
    start = time.perf_counter()
    try:
        for i, r in sorted(enumerate(requests), key=lambda x: x[1].arrival):
            time.sleep(max(0.0, r.arrival - (time.perf_counter() - start)))
            rid = manager.add_request(r.prompt, max_new_tokens=r.max_new_tokens, record_timestamps=True)
            ids[rid] = i
        done = {}
        while len(done) < len(requests):
            out = manager.get_result(timeout=600)
            if out is None:
                raise RuntimeError("transformers' continuous batching stopped before every request finished")
            if out.is_finished():
                done[ids[out.request_id]] = out
    finally:
        manager.stop(block=True)
    sync()
    seconds = time.perf_counter() - start
    for i, r in enumerate(requests):
        out = done[i]
        # created_time and timestamps are perf_counter() readings
        timings.append(Timing(r.arrival, [t - start for t in (out.timestamps or [])]))
    return timings, seconds


def hf_unavailable(model) -> str | None:
    """Why transformers' continuous batching cannot run here (None: it can)."""
    if not hasattr(model, "init_continuous_batching"):
        return "this transformers has no continuous batching (init_continuous_batching)"
    if next(model.parameters()).device.type == "cpu":
        try:
            import psutil  # noqa: F401
        except ImportError:
            return "on the CPU it sizes its cache with psutil, which is not installed"
    return None


def engine_config(args, backend="eager") -> EngineConfig:
    return EngineConfig(
        max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, page_size=args.page_size,
        num_pages=args.num_pages, max_chunk=args.max_chunk, backend=backend, buckets=args.buckets,
    )  # fmt: skip


def make_engine(model, name: str, args) -> Engine:
    config = engine_config(args, name)
    options = dict(matmul_tile=(16, 128, 64), elementwise_block=1024, row_block=8) if args.tiny else {}
    if name == "torch.compile":
        # The baseline: torch.compile'd steps replayed as CUDA graphs (CPU: no graphs)
        options = {"mode": "reduce-overhead"} if torch.cuda.is_available() and not args.tiny else {}
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)  # one entry per bucket
    return Engine(model, config, options)


def bench(model, name: str, args, requests, warmup, sync) -> Row:
    if name == "hf":
        # Its fastest setting on a GPU (CUDA graphs asked for, not left to its inference); where
        # that fails, its own choice, said in the log.
        graphs = True if torch.cuda.is_available() and not args.tiny else None
        try:
            run_hf(model, warmup, sync, engine_config(args), graphs)
        except Exception as e:  # noqa: BLE001 (any failure of that path: the baseline still runs)
            if graphs is None:
                raise
            print(f"hf: use_cuda_graph=True failed ({type(e).__name__}: {e}); its default instead", flush=True)
            graphs = None
            run_hf(model, warmup, sync, engine_config(args), graphs)
        timings, seconds = run_hf(model, requests, sync, engine_config(args), graphs)
        return summarize(name if graphs is None else "hf (CUDA graphs)", timings, seconds)
    engine = make_engine(model, name, args)
    if args.precompile and name != "eager":
        shapes = len(engine.buckets.grid())
        if shapes <= PRECOMPILE_MAX:
            t0 = time.perf_counter()

            def said(shape, seconds, name=name):
                print(f"{name}: step shape (chunk, batch, pages) {shape} compiled in {seconds:.1f} s", flush=True)

            engine.precompile(said)
            print(f"{name}: {shapes} step shapes compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        else:
            print(f"{name}: {shapes} step shapes, not compiled up front (> {PRECOMPILE_MAX})", flush=True)
    run_engine(engine, warmup, sync)
    steps = engine.steps
    timings, seconds = run_engine(engine, requests, sync)
    return summarize(name, timings, seconds, engine.steps - steps, engine.runner.compiles)


def print_table(rows: list[Row]) -> None:
    head = f"{'engine':>14} {'req/s':>8} {'out tok/s':>10} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>8} "
    print(head + f"{'steps':>6} {'compiles':>8}   (ms)")
    for r in rows:
        print(
            f"{r.engine:>14} {r.requests_per_s:8.2f} {r.output_tokens_per_s:10.1f} {r.ttft_p50_ms:9.1f} "
            f"{r.ttft_p99_ms:8.1f} {r.tpot_p50_ms:9.2f} {r.tpot_p99_ms:8.2f} {r.steps:6d} {r.compiles:8d}"
        )


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="llama-3.2-1b")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: all at once)")
    ap.add_argument("--prompt-mean", type=float, default=256)
    ap.add_argument("--output-mean", type=float, default=128)
    ap.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of both lengths")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--max-chunk", type=int, default=256)
    ap.add_argument("--buckets", choices=BUCKET_POLICIES, default=None, help="step shapes (default: per backend)")
    ap.add_argument(
        "--precompile", action=argparse.BooleanOptionalAction, default=True,
        help=f"compile every step shape before the warm-up (engines with at most {PRECOMPILE_MAX})",
    )  # fmt: skip
    ap.add_argument("--engines", default="mkcompiler,torch.compile,hf")
    ap.add_argument("--warmup-requests", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--tiny", action="store_true", help="CPU: tiny model, 6 short requests, eager and hf engines")
    args = ap.parse_args(argv)
    if args.tiny:
        args.size, args.dtype, args.requests, args.prompt_mean, args.output_mean = "tiny", "float32", 6, 8, 4
        args.max_seq_len, args.max_batch_size, args.page_size, args.max_chunk = 32, 4, 4, 8
        args.warmup_requests = 2
        if args.engines == ap.get_default("engines"):
            args.engines = "eager,hf"
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    overrides = dict(SIZES[args.size])
    model = random_model(overrides.pop("family", "llama"), getattr(torch, args.dtype), device=device, **overrides)
    vocab = model.config.vocab_size
    shape = (args.prompt_mean, args.output_mean, args.sigma, args.max_seq_len)
    requests = workload(args.requests, args.seed, vocab, *shape, rate=args.rate)
    warmup = workload(args.warmup_requests, args.seed + 1, vocab, *shape)
    print(
        f"{args.size} {args.dtype} on {device}: {len(requests)} requests, "
        f"{sum(len(r.prompt) for r in requests)} prompt and {sum(r.max_new_tokens for r in requests)} output tokens, "
        + (f"Poisson arrivals at {args.rate}/s" if args.rate else "all at once"),
        flush=True,
    )
    rows = []
    for name in args.engines:
        why = hf_unavailable(model) if name == "hf" else None
        if why:
            print(f"hf: skipped: {why}")
            continue
        t0 = time.perf_counter()
        try:
            rows.append(bench(model, name, args, requests, warmup, sync))
        except Exception as e:  # one engine failing leaves the others' rows
            print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
            continue
        print(f"{name}: done in {time.perf_counter() - t0:.1f} s (with warm-up)", flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
