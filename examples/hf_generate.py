"""Hugging Face generate() with megakernels: the usual static-cache recipe, backend="mkcompiler".

    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = True  # not transformers' own torch.compile (inductor) on top
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe} if args.skip_module_guards else {}
    model.forward = torch.compile(model.forward, backend="mkcompiler", options=options)
    model.generate(prompt, max_new_tokens=64, do_sample=False)

Dynamo captures the prefill and the decode step of `forward` as two graphs; each runs as a
megakernel that writes the static cache in place. Usage:

    python examples/hf_generate.py                                      # tiny random Llama (CPU: interpreter)
    python examples/hf_generate.py --family qwen3
    python examples/hf_generate.py --size llama-3.2-1b --dtype bfloat16 --new-tokens 64   # real shapes (GPU)
    python examples/hf_generate.py --model-dir ./my-checkpoint          # local weights (safetensors)
    python examples/hf_generate.py --size llama-3.2-1b --dtype bfloat16 --skip-module-guards   # fewer dynamo guards (unsafe)
    python examples/hf_generate.py --size llama-3.2-1b --dtype float32 --trace   # what the forward runs beside mk(...)

Checks the tokens against eager generate() and prints, per decode step (medians):
- the gap between tokens as generate() sees it: the forward plus transformers' own work per step
  (logits processors, stopping criteria, the streamer), which no backend removes;
- the compiled forward inside generate(): the call of `model.forward`, synchronized (on a GPU)
  before and after: dynamo's guards, its code around the graph, our CompiledGraph, the megakernel;
- the last decode step replayed: the compiled forward again, and its megakernels called directly,
  `mk(...)` as examples/hf_decode.py calls its own (the reference the forward is compared with).
Model sizes and loading are examples/hf_decode.py's, which runs the same model through
mkcompiler.compile directly.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mkcompiler  # noqa: E402  (before transformers: without a GPU, Triton must see TRITON_INTERPRET first)
from examples.hf_decode import SIZES, load_model  # noqa: E402
from mkcompiler.frontend.hf import FAMILIES  # noqa: E402


class StepTimer:
    """A generate() streamer that stamps each token's arrival: the gaps after the first new token
    are the decode steps (the megakernel plus transformers' own work per step)."""

    def __init__(self, device: str):
        self.device, self.stamps = device, []

    def put(self, value) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_ms(self) -> float:
        # stamps[0]: the prompt; [1]: the prefill's token; [2]: the first decode step's, which also binds
        # the megakernel to this generate()'s new cache. The median of the steps after it.
        return median_ms([b - a for a, b in zip(self.stamps[2:], self.stamps[3:])])


def median_ms(seconds: list[float]) -> float:
    return sorted(seconds)[len(seconds) // 2] * 1e3 if seconds else float("nan")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    """fn() and its time in seconds: from a synchronized start to its results ready on the
    device (host work and kernels alike)."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


class ForwardTimer:
    """Wraps `model.forward` (generate() calls it for each step): times each decode call (one new
    token per sequence) and keeps the last one's arguments, to replay that step."""

    def __init__(self, model, device: str):
        self.forward, self.device, self.seconds, self.last = model.forward, device, [], None

        @functools.wraps(self.forward)  # generate() reads forward's signature (through __wrapped__)
        def forward(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None or ids.shape[-1] != 1:
                return self.forward(*args, **kwargs)  # the prefill
            self.last = (args, kwargs)
            out, seconds = timed(lambda: self.forward(*args, **kwargs), self.device)
            self.seconds.append(seconds)
            return out

        model.forward = forward

    def decode_ms(self) -> float:
        # The first decode step also binds the megakernel to this generate()'s new cache.
        return median_ms(self.seconds[1:])


def generate(model, prompt, new_tokens: int, device: str) -> tuple[torch.Tensor, StepTimer, ForwardTimer]:
    """Greedy generate() of `new_tokens` tokens, timing the gaps between tokens and the decode
    forward calls (model.forward is wrapped for the call only)."""
    timer, forward = StepTimer(device), ForwardTimer(model, device)
    try:
        tokens = model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=timer
        )
    finally:
        model.forward = forward.forward
    return tokens, timer, forward


def replay(forward: ForwardTimer, repeats: int) -> tuple[float, float, int, dict]:
    """The last decode step of a generate(), again: the compiled forward on its arguments, and the
    megakernels that forward ran, each called directly on the inputs it gave them (mk(...), as
    examples/hf_decode.py calls its own), alternately `repeats` times. Medians in ms, and the number
    of megakernels (graph breaks give several), and the two callables (for --trace). The step
    rewrites the cache slot it wrote: the same values, nothing else changes."""
    args, kwargs = forward.last

    def step():
        return forward.forward(*args, **kwargs)

    step()  # dynamo may compile again here (e.g. another grad mode than generate()'s): graphs after it
    graphs = mkcompiler.dynamo.compiled_graphs()
    for g in graphs:
        g.last_call = None
    step()  # marks the graphs this step runs
    calls = [(g.compiled[g.last_call[0]], g.last_call[1]) for g in graphs if g.last_call is not None]

    def direct():
        return [mk(*inputs) for mk, inputs in calls]

    times = [(timed(step, forward.device)[1], timed(direct, forward.device)[1]) for _ in range(repeats)]
    callables = {"compiled forward": step, "mk(...) directly": direct}
    return median_ms([f for f, _ in times]), median_ms([d for _, d in times]), len(calls), callables


def trace(callables: dict, device: str, rows: int = 12) -> None:
    """One call of each under torch.profiler: the operators and kernels it ran, by device time (on
    a GPU) or host time: what the compiled forward runs beside its megakernels, and how long."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device != "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, fn in callables.items():
        with profile(activities=activities) as prof:
            timed(fn, device)
        print(f"--trace: {name}")
        print(prof.key_averages().table(sort_by="device_time_total" if cuda else "cpu_time_total", row_limit=rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--model-dir", help="a local Hugging Face checkpoint directory (nothing is downloaded)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--no-check", action="store_true", help="skip the eager comparison")
    ap.add_argument(
        "--trace", action="store_true", help="profile one replayed step and its megakernels (torch.profiler)"
    )
    ap.add_argument(
        "--skip-module-guards",
        action="store_true",
        help="torch.compile(..., options={'guard_filter_fn': torch.compiler.skip_guard_on_all_nn_modules_unsafe}): "
        "dynamo skips its guards on the model's modules (most of the ~1750 it checks per call at 16 layers); "
        "unsafe where the modules change after compiling",
    )
    args = ap.parse_args()

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    model = load_model(args, device)
    model.generation_config.cache_implementation = "static"
    # On a GPU with a static cache transformers compiles the decode step itself (inductor, wrapping
    # model.__call__): that compile would trace through our forward and run instead of the
    # megakernels (session 14: the replay found none). Eager must be eager too.
    model.generation_config.disable_compile = True
    torch.manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), device=device)
    if not args.no_check:
        with torch.no_grad():
            want, eager, eager_forward = generate(model, prompt, args.new_tokens, device)
        print(
            f"eager generate(): decode {eager.decode_ms():.2f} ms/token, "
            f"its forward {eager_forward.decode_ms():.2f} ms/step (medians)"
        )

    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe} if args.skip_module_guards else {}
    model.forward = torch.compile(model.forward, backend="mkcompiler", options=options)
    t0 = time.perf_counter()
    generate(model, prompt, 2, device)  # compiles the prefill and the decode graph
    print(f"first generate() (dynamo capture and two mkcompiler compiles): {time.perf_counter() - t0:.1f} s")
    # Each generate() makes a new static cache: the megakernels are bound to it again (a compile-cache hit).
    tokens, timer, forward = generate(model, prompt, args.new_tokens, device)
    print(
        f"generate() with backend='mkcompiler': decode {timer.decode_ms():.2f} ms/token (gap between tokens), "
        f"compiled forward {forward.decode_ms():.2f} ms/step (medians)"
    )
    with torch.no_grad():
        step_ms, mk_ms, n, callables = replay(forward, max(args.new_tokens, 10))
        print(
            f"last decode step replayed: compiled forward {step_ms:.3f} ms, its {n} megakernel(s) called directly "
            f"mk(...) {mk_ms:.3f} ms (forward/mk {step_ms / mk_ms:.3f}x; medians)"
        )
        if args.trace:
            trace(callables, device)
    for graph in mkcompiler.dynamo.compiled_graphs():
        print(" ", graph, "->", ", ".join(type(r).__name__ for r in graph.compiled.values()))
    new = tokens[0, args.prompt_len :].tolist()
    print("tokens:", new)
    if not args.no_check:
        same = tokens == want
        print(
            "eager tokens match"
            if bool(same.all())
            else f"tokens differ from eager from position {int((~same[0]).nonzero()[0])} "
            "(expected now and then in low precision: greedy decoding amplifies rounding)"
        )


if __name__ == "__main__":
    main()
