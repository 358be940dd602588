"""How a step runs: eagerly, as megakernels (mkcompiler.compile) or with torch.compile; the
compiled ones are specialised to a step's shape bucket and made once per bucket."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from mkcompiler.serve.paged_lm import PagedInputs, PagedLM

Backend = Literal["eager", "mkcompiler", "torch.compile"]
BACKENDS: tuple[str, ...] = ("eager", "mkcompiler", "torch.compile")


class StepRunner:
    """runner(inputs) -> the step's logits [1 + B, vocab]; `compiles` counts the buckets compiled."""

    def __init__(self, lm: PagedLM, backend: Backend = "eager", options: dict | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.lm, self.backend, self.options = lm, backend, dict(options or {})
        self._steps: dict[tuple[int, int, int], Callable] = {}
        self._dynamo = torch.compile(lm, dynamic=False, **self.options) if backend == "torch.compile" else None

    @property
    def compiles(self) -> int:
        return len(self._steps) if self.backend != "eager" else 0

    def _step_for(self, inputs: PagedInputs) -> Callable:
        key = inputs.shape_key
        step = self._steps.get(key)
        if step is None:
            if self.backend == "mkcompiler":
                import mkcompiler

                step = mkcompiler.compile(self.lm, tuple(inputs), **self.options)
            else:  # eager, or torch.compile (which recompiles once per new shape itself)
                step = self._dynamo if self._dynamo is not None else self.lm
            self._steps[key] = step
        return step

    def __call__(self, inputs: PagedInputs) -> torch.Tensor:
        with torch.no_grad():
            return self._step_for(inputs)(*inputs)
