"""Greedy decoding of a Hugging Face causal LM with two megakernels: one for the prompt
(prefill), one for a single token (decode), both updating the same static KV cache in place.

    python examples/hf_decode.py --family qwen3 --new-tokens 16          # tiny random model
    python examples/hf_decode.py --size llama-3.2-1b --dtype bfloat16    # real shapes, random weights (GPU)
    python examples/hf_decode.py --model-dir ./my-checkpoint             # local weights (safetensors)

Checks the generated tokens against eager PyTorch and prints tokens/s. On a machine without a
GPU the megakernels run in Triton's interpreter (slow: use the tiny default).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import mkcompiler  # before transformers: without a GPU, Triton must see TRITON_INTERPRET first
from mkcompiler.frontend.hf import FAMILIES, StaticCacheLM, greedy, random_model

# Model shapes (random weights): config overrides of mkcompiler.frontend.hf.TINY.
SIZES = {
    "tiny": {},
    "llama-3.2-1b": dict(
        family="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "llama-3.1-8b": dict(
        family="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
    "qwen3-0.6b": dict(
        family="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
}


def load_model(args, device):
    dtype = getattr(torch, args.dtype)
    if args.model_dir:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            args.model_dir, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
        )
        return model.to(device).eval()
    overrides = dict(SIZES[args.size])
    family = overrides.pop("family", args.family)
    return random_model(family, dtype, device=device, **overrides)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--model-dir", help="a local Hugging Face checkpoint directory (nothing is downloaded)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--max-cache", type=int, default=None, help="cache slots (default: prompt + new tokens)")
    ap.add_argument("--no-check", action="store_true", help="skip the eager comparison")
    args = ap.parse_args()

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    model = load_model(args, device)
    max_cache = args.max_cache or args.prompt_len + args.new_tokens
    lm = StaticCacheLM(model, batch_size=args.batch, max_cache_len=max_cache, next_token=True)
    torch.manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), device=device)

    t0 = time.perf_counter()
    prefill = mkcompiler.compile(lm, (prompt, torch.arange(args.prompt_len, device=device)))
    decode = mkcompiler.compile(lm, (prompt[:, :1].contiguous(), torch.tensor([args.prompt_len], device=device)))
    print(
        f"compiled prefill ({len(prefill.queue)} instructions) and decode ({len(decode.queue)}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )

    # Warm up (first launches load the kernel), then time a clean run from an empty cache.
    greedy(prefill, decode, prompt, 2)
    lm.reset()
    synchronize(device)
    t0 = time.perf_counter()
    prefill(prompt, torch.arange(args.prompt_len, device=device))
    synchronize(device)
    t_prefill = time.perf_counter() - t0
    lm.reset()
    t0 = time.perf_counter()
    tokens = greedy(prefill, decode, prompt, args.new_tokens)
    synchronize(device)
    t_all = time.perf_counter() - t0
    steps = max(args.new_tokens - 1, 1)
    print(
        f"prefill {args.prompt_len} tokens x {args.batch}: {t_prefill * 1e3:.1f} ms; "
        f"decode: {args.batch * steps / max(t_all - t_prefill, 1e-9):.1f} tokens/s "
        f"({(t_all - t_prefill) / steps * 1e3:.2f} ms/step)"
    )
    print("tokens:", tokens[0].tolist())

    if not args.no_check:
        eager = StaticCacheLM(model, batch_size=args.batch, max_cache_len=max_cache, next_token=True)
        with torch.no_grad():
            want = greedy(eager, eager, prompt, args.new_tokens)
        same = (tokens == want).all(0)
        first = int((~same).nonzero()[0]) if not bool(same.all()) else None
        print(
            "eager tokens match"
            if first is None
            else f"tokens differ from eager from step {first} "
            "(expected now and then in low precision: greedy decoding amplifies rounding)"
        )


if __name__ == "__main__":
    main()
