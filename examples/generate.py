"""Greedy generation with two megakernels compiled from one plain-PyTorch Llama: one for the
prefill shape (B x prompt tokens) and one for the decode shape (B x 1 token). Both read the
model's weights and update its KV-cache buffers in place, so they share one cache.

    python examples/generate.py --model tiny --new-tokens 8 --check
    python examples/generate.py --model llama-3.2-1b --prompt-len 512 --new-tokens 64 --batch 16
    python examples/generate.py --model llama-3.2-1b --checkpoint ~/Llama-3.2-1B   # local HF directory

Weights are random (nothing is downloaded) unless --checkpoint names a local Hugging Face
Llama directory (config.json + *.safetensors). Without a GPU the megakernels run in Triton's
interpreter on the CPU: only the tiny model is practical there, and tokens/s measure the
interpreter, not the design.

Host work between decode steps: write the next position into a preallocated device tensor,
launch, read the 8-int error record back (the one synchronisation), clone the logits
(copy_outputs), argmax them with torch and copy the tokens into the preallocated input. The
input addresses never change, so the address table is not re-uploaded. On a GPU the report
splits a decode step into the megakernel's own time and that host overhead.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mkcompiler  # noqa: E402  (chooses the interpreter when there is no GPU)
from examples.llama import CONFIGS, Llama, LlamaConfig  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # relative error of logits vs eager


# ---------------------------------------------------------------- Hugging Face checkpoints
def read_hf_config(directory: str) -> tuple[LlamaConfig, dict]:
    """Our LlamaConfig from config.json, plus the rope parameters (type, scaling)."""
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    refuse = {
        "attention_bias": cfg.get("attention_bias", False),
        "mlp_bias": cfg.get("mlp_bias", False),
        "hidden_act is not silu": cfg.get("hidden_act", "silu") != "silu",
        "head_dim != hidden_size / num_attention_heads": head_dim * heads != cfg["hidden_size"],
    }
    bad = [k for k, v in refuse.items() if v]
    if bad:
        raise ValueError(f"{directory}: this Llama example does not support {', '.join(bad)}")
    # transformers < 5 writes rope_theta + rope_scaling; 5.x may write rope_parameters.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    if rope["rope_type"] not in ("default", "llama3"):
        raise ValueError(f"{directory}: rope_type {rope['rope_type']!r} is not supported (default, llama3)")
    c = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        hidden=cfg["intermediate_size"],
        rope_theta=float(rope["rope_theta"]),
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
    )
    rope["tie_word_embeddings"] = cfg.get("tie_word_embeddings", False)
    return c, rope


def rope_inv_freq(c: LlamaConfig, rope: dict) -> torch.Tensor:
    """Rotary inverse frequencies in fp32, with Llama 3's frequency-dependent scaling (as
    transformers' _compute_llama3_parameters) when the checkpoint asks for it."""
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
    if rope.get("rope_type") != "llama3":
        return inv_freq
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def hf_names(n_layers: int) -> dict[str, str]:
    """Hugging Face LlamaForCausalLM parameter name -> our Llama's. HF's q/k projections are
    stored for the half-split rotary convention (rotate_half), which our Llama uses too, so
    the weights load as they are (no permutation)."""
    names = {
        "model.embed_tokens.weight": "embed.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    for i in range(n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for p in "qkvo":
            names[f"{hf}self_attn.{p}_proj.weight"] = f"{ours}attn.w{p}.weight"
        for p in ("gate", "up", "down"):
            names[f"{hf}mlp.{p}_proj.weight"] = f"{ours}mlp.{p}.weight"
        names[f"{hf}input_layernorm.weight"] = f"{ours}attn_norm.weight"
        names[f"{hf}post_attention_layernorm.weight"] = f"{ours}mlp_norm.weight"
    return names


def load_checkpoint(model: Llama, directory: str, tie_word_embeddings: bool = False) -> None:
    """Copy a local HF checkpoint's safetensors into `model` (cast to its dtype, on its device)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    names = hf_names(model.c.n_layers)
    params = dict(model.named_parameters())
    loaded = set()
    with torch.no_grad():
        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = names.get(key) or names.get("model." + key)  # a bare LlamaModel has no prefix
                    if name is None:
                        if key.endswith("rotary_emb.inv_freq"):  # old checkpoints store it; we compute it
                            continue
                        raise KeyError(f"{path}: unexpected tensor {key!r}")
                    t = f.get_tensor(key)
                    if tuple(t.shape) != tuple(params[name].shape):
                        raise ValueError(f"{key}: shape {tuple(t.shape)}, the config gives {tuple(params[name].shape)}")
                    params[name].copy_(t)
                    loaded.add(name)
        if "lm_head.weight" not in loaded and (tie_word_embeddings or "embed.weight" in loaded):
            model.lm_head.weight.copy_(model.embed.weight)  # tied embeddings: a copy, not a shared parameter
            loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise KeyError(f"{directory}: the checkpoint lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}")


# ---------------------------------------------------------------- the model
def build_model(c: LlamaConfig, dtype: torch.dtype, device, seed: int = 0, inv_freq=None) -> Llama:
    """A Llama built directly on `device` in `dtype` (no fp32 copy on the host: the 8B model
    fits), random weights like examples.llama.random_llama. The rotary frequencies stay fp32
    as in transformers (random_llama's .to(bf16) rounds them to bf16)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Llama(c)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.uniform_(0.8, 1.2)
        if inv_freq is not None:
            model.inv_freq.copy_(inv_freq)
    return model.requires_grad_(False)


def make_model(args, device, max_seq_len: int) -> Llama:
    dtype = DTYPES[args.dtype]
    if args.checkpoint:
        c, rope = read_hf_config(args.checkpoint)
        c = LlamaConfig(**{**c.__dict__, "max_seq_len": max_seq_len, "max_batch": args.batch})
        model = build_model(c, dtype, device, args.seed, inv_freq=rope_inv_freq(c, rope))
        load_checkpoint(model, args.checkpoint, rope["tie_word_embeddings"])
        return model
    c = LlamaConfig(**{**CONFIGS[args.model].__dict__, "max_seq_len": max_seq_len, "max_batch": args.batch})
    return build_model(c, dtype, device, args.seed)


# ---------------------------------------------------------------- generation
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def kernel_ms(mk, repeats: int = 10) -> float:
    """The decode megakernel's own time (CUDA events around launches; rerunning the last step
    rewrites the same cache slot with the same values)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        mk.launch()
    end.record()
    end.synchronize()
    mk.check()
    return start.elapsed_time(end) / repeats


def generate(
    model: Llama, prompt: torch.Tensor, new_tokens: int, check: bool = False, warmup: int = 0, log=print, **options
) -> dict:
    """Prefill `prompt` [B, S] and decode greedily until `new_tokens` tokens per row exist.
    With `check`, an eager copy of the model runs each step on the same tokens."""
    device = prompt.device
    timer = Timer(device)
    b, s = prompt.shape
    if s + new_tokens - 1 > model.c.max_seq_len:
        raise ValueError(f"prompt {s} + {new_tokens} new tokens do not fit max_seq_len {model.c.max_seq_len}")
    ref = copy.deepcopy(model) if check else None  # before any step writes the cache
    tol = TOLERANCE[model.embed.weight.dtype]
    errors, mismatches = [], 0

    t = time.perf_counter()
    prefill = mkcompiler.compile(model, (prompt, torch.arange(s, device=device)), **options)
    t_pre_compile = time.perf_counter() - t
    tok = torch.zeros(b, 1, dtype=torch.long, device=device)  # decode inputs, preallocated: fixed addresses
    pos = torch.zeros(1, dtype=torch.long, device=device)
    t = time.perf_counter()
    decode = mkcompiler.compile(model, (tok, pos), **options)
    t_dec_compile = time.perf_counter() - t
    log(
        f"compiled: prefill {len(prefill.queue)} instructions in {t_pre_compile:.1f}s, "
        f"decode {len(decode.queue)} instructions in {t_dec_compile:.1f}s ({decode.num_workers} workers)"
    )

    prompt_pos = torch.arange(s, device=device)
    pos.fill_(s)
    for _ in range(warmup):  # first launches include Triton's JIT; the real steps rewrite these slots
        prefill(prompt, prompt_pos)
        decode(tok, pos)

    t = timer.now()
    logits = prefill(prompt, prompt_pos)
    tok.copy_(logits[:, -1].argmax(-1, keepdim=True))
    t_prefill = timer.now() - t
    generated = [tok.clone()]
    if check:
        ref_logits = ref(prompt, prompt_pos)
        errors.append(rel_err(logits, ref_logits))
        mismatches += int((ref_logits[:, -1].argmax(-1, keepdim=True) != tok).sum())

    t_decode = 0.0
    for i in range(new_tokens - 1):
        t = timer.now()
        pos.fill_(s + i)
        logits = decode(tok, pos)
        tok.copy_(logits[:, -1].argmax(-1, keepdim=True))
        t_decode += timer.now() - t
        if check:  # teacher-forced: eager sees the tokens the megakernels chose
            ref_logits = ref(generated[-1], pos)
            errors.append(rel_err(logits, ref_logits))
            mismatches += int((ref_logits[:, -1].argmax(-1, keepdim=True) != tok).sum())
        generated.append(tok.clone())

    steps = new_tokens - 1
    result = {
        "tokens": torch.cat(generated, dim=1).cpu(),
        "prefill_s": t_prefill,
        "prefill_tokens_per_s": b * s / t_prefill,
        "decode_s": t_decode,
        "decode_tokens_per_s": b * steps / t_decode if steps else float("nan"),
        "compile_s": (t_pre_compile, t_dec_compile),
    }
    log(f"prefill: {b}x{s} tokens in {t_prefill * 1e3:.1f} ms = {result['prefill_tokens_per_s']:.1f} tokens/s")
    if steps:
        log(
            f"decode: {steps} steps x {b} rows in {t_decode * 1e3:.1f} ms = {result['decode_tokens_per_s']:.1f} "
            f"tokens/s ({t_decode / steps * 1e3:.2f} ms/step)"
        )
    if steps and device.type == "cuda":
        k = kernel_ms(decode)
        result["decode_kernel_ms"] = k
        log(f"decode step: megakernel {k:.3f} ms, host work and launch {t_decode / steps * 1e3 - k:.3f} ms")
    if check:
        result.update(max_rel_err=max(errors), rel_errs=errors, argmax_mismatches=mismatches, ok=max(errors) <= tol)
        log(
            f"check vs eager: max relative error of logits {max(errors):.3g} over {len(errors)} steps "
            f"(tolerance {tol:g}), {mismatches} greedy tokens differ from eager's argmax: "
            f"{'OK' if result['ok'] else 'FAILED'}"
        )
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=sorted(CONFIGS), default="tiny", help="shape of the random model")
    p.add_argument("--checkpoint", help="local Hugging Face Llama directory (config.json, *.safetensors)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--prompt-ids", help="comma-separated prompt token ids (default: random ids)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per row (the first by prefill)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 in the interpreter")
    p.add_argument("--max-seq-len", type=int, help="KV-cache length (default: prompt + new tokens, rounded up to 64)")
    p.add_argument("--check", action="store_true", help="compare every step's logits with an eager copy")
    p.add_argument("--warmup", type=int, help="untimed runs first (default: 1 on a GPU, 0 in the interpreter)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None, log=print) -> dict:
    args = parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    device = torch.device("cpu" if interpret else "cuda")
    args.dtype = args.dtype or ("fp32" if interpret else "bf16")
    if args.prompt_ids:
        ids = [int(x) for x in args.prompt_ids.split(",")]
        args.prompt_len = len(ids)
    max_seq_len = args.max_seq_len or 64 * math.ceil((args.prompt_len + args.new_tokens) / 64)
    model = make_model(args, device, max_seq_len)
    c = model.c
    log(
        f"model: {args.checkpoint or args.model} {args.dtype} (dim {c.dim}, {c.n_layers} layers, {c.n_heads}/"
        f"{c.n_kv_heads} heads, vocab {c.vocab_size}, KV cache {args.batch}x{max_seq_len}) on "
        f"{'the Triton interpreter (CPU)' if interpret else torch.cuda.get_device_name(device)}"
    )
    gen = torch.Generator().manual_seed(args.seed)
    if args.prompt_ids:
        if not all(0 <= i < c.vocab_size for i in ids):
            raise ValueError(f"--prompt-ids must lie in [0, {c.vocab_size})")
        prompt = torch.tensor(ids).expand(args.batch, -1).contiguous()
    else:
        prompt = torch.randint(0, c.vocab_size, (args.batch, args.prompt_len), generator=gen)
    warmup = args.warmup if args.warmup is not None else (0 if interpret else 1)
    result = generate(model, prompt.to(device), args.new_tokens, check=args.check, warmup=warmup, log=log)
    log("tokens:", result["tokens"][0].tolist() if args.batch == 1 else result["tokens"].tolist())
    return result


if __name__ == "__main__":
    sys.exit(0 if main().get("ok", True) else 1)
