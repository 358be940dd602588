"""Hugging Face generate() with megakernels: the usual static-cache recipe, backend="mkcompiler".

    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, backend="mkcompiler")
    model.generate(prompt, max_new_tokens=64, do_sample=False)

Dynamo captures the prefill and the decode step of `forward` as two graphs; each runs as a
megakernel that writes the static cache in place. Usage:

    python examples/hf_generate.py                                      # tiny random Llama (CPU: interpreter)
    python examples/hf_generate.py --family qwen3
    python examples/hf_generate.py --size llama-3.2-1b --dtype bfloat16 --new-tokens 64   # real shapes (GPU)
    python examples/hf_generate.py --model-dir ./my-checkpoint          # local weights (safetensors)

Checks the tokens against eager generate() and prints the decode time per token as generate()
sees it (median gap between tokens: the megakernel plus transformers' own work per step). Model sizes and loading are
examples/hf_decode.py's, which runs the same model through mkcompiler.compile directly.
"""

from __future__ import annotations

import argparse
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
        gaps = [b - a for a, b in zip(self.stamps[2:], self.stamps[3:])]
        return sorted(gaps)[len(gaps) // 2] * 1e3 if gaps else float("nan")


def generate(model, prompt, new_tokens: int, device: str) -> tuple[torch.Tensor, StepTimer]:
    timer = StepTimer(device)
    tokens = model.generate(
        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=timer
    )
    return tokens, timer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--model-dir", help="a local Hugging Face checkpoint directory (nothing is downloaded)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--no-check", action="store_true", help="skip the eager comparison")
    args = ap.parse_args()

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    model = load_model(args, device)
    model.generation_config.cache_implementation = "static"
    torch.manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), device=device)
    if not args.no_check:
        with torch.no_grad():
            want, eager = generate(model, prompt, args.new_tokens, device)
        print(f"eager generate(): decode {eager.decode_ms():.2f} ms/token (median)")

    model.forward = torch.compile(model.forward, backend="mkcompiler")
    t0 = time.perf_counter()
    generate(model, prompt, 2, device)  # compiles the prefill and the decode graph
    print(f"first generate() (dynamo capture and two mkcompiler compiles): {time.perf_counter() - t0:.1f} s")
    # Each generate() makes a new static cache: the megakernels are bound to it again (a compile-cache hit).
    tokens, timer = generate(model, prompt, args.new_tokens, device)
    print(f"generate() with backend='mkcompiler': decode {timer.decode_ms():.2f} ms/token (median)")
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
