"""Serving: continuous batching over a paged KV cache (mkcompiler/serve/engine.py).

from mkcompiler.serve import LLM, SamplingParams
llm = LLM(model, max_batch_size=64, max_seq_len=2048, page_size=16)
outs = llm.generate(prompts, SamplingParams(max_new_tokens=128, temperature=0.0))
"""

from mkcompiler.serve.engine import LLM, Engine, EngineConfig, RequestError
from mkcompiler.serve.params import SamplingParams

__all__ = ["LLM", "Engine", "EngineConfig", "RequestError", "SamplingParams"]
