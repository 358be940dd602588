"""Per-request sampling parameters and the checks that make a bad request a ValueError naming it."""

from __future__ import annotations

import operator
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops.

    temperature 0 is greedy (argmax). top_k 0 and top_p 1 keep the whole vocabulary. seed None:
    the engine draws one from its own seeded generator, so a run is reproducible either way; a
    request's draws depend only on its seed and how many tokens it has generated (not on what
    it was batched with, nor on preemption)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def problems(self) -> list[str]:
        """What is wrong with these parameters (empty when nothing is)."""
        found = []
        if self.max_new_tokens <= 0:
            found.append(f"max_new_tokens must be positive, not {self.max_new_tokens}")
        if self.temperature < 0:
            found.append(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            found.append(f"top_k must be >= 0 (0: no limit), not {self.top_k}")
        if not 0 < self.top_p <= 1:
            found.append(f"top_p must be in (0, 1], not {self.top_p}")
        return found


def check_request(prompt, params: SamplingParams, vocab_size: int, max_seq_len: int) -> tuple[list[int], list[str]]:
    """(the prompt as a list of ints, what makes the request impossible to serve: empty when nothing does)."""
    found = list(params.problems())
    try:
        tokens = [operator.index(t) for t in prompt]  # ints of any kind (numpy, 0-d tensors); not floats
    except TypeError:
        return [], [*found, "the prompt must be a sequence of integer token ids"]
    if not tokens:
        found.append("the prompt is empty")
    elif len(tokens) >= max_seq_len:
        found.append(f"the prompt has {len(tokens)} tokens; max_seq_len {max_seq_len} leaves no room for a new one")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        found.append(f"token ids outside the vocabulary [0, {vocab_size}): {bad[:8]}")
    return tokens, found
