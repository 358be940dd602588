"""The serving engine: requests in, tokens out, one batched step at a time.

    llm = LLM(model, max_batch_size=64, max_seq_len=2048, page_size=16)
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=128))   # in prompt order
    for index, token in llm.stream(prompts, params): ...               # index into prompts

`Engine` is the incremental form: add_request() at any time (requests join a running batch),
step() runs one batched step and returns the tokens it produced.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from torch import nn

from mkcompiler.serve.batch import BucketPolicy, Buckets, build_step, padding_step
from mkcompiler.serve.paged_lm import PagedLM
from mkcompiler.serve.pages import PageAllocator, pages_for
from mkcompiler.serve.params import SamplingParams, check_request
from mkcompiler.serve.runners import Backend, StepRunner
from mkcompiler.serve.sampling import sample
from mkcompiler.serve.scheduler import Scheduler, Sequence


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 64  # sequences decoding at once
    max_seq_len: int = 2048  # prompt + generated tokens of one request
    page_size: int = 16  # KV-cache slots per page
    num_pages: int | None = None  # None: every batch slot can hold a max_seq_len sequence (no preemption)
    max_chunk: int = 256  # prompt tokens per step (chunked prefill)
    backend: Backend = "eager"
    seed: int = 0  # draws the seeds of requests that give none
    buckets: BucketPolicy | None = None  # step shapes (batch.Buckets); None: coarse for megakernels, else powers of two

    @property
    def bucket_policy(self) -> BucketPolicy:
        if self.buckets is not None:
            return self.buckets
        return "coarse" if self.backend == "mkcompiler" else "powers_of_two"

    @property
    def pages_per_sequence(self) -> int:
        return pages_for(self.max_seq_len, self.page_size)

    @property
    def pool_pages(self) -> int:
        """Pages per layer pool, the scratch page included."""
        return self.num_pages if self.num_pages is not None else self.max_batch_size * self.pages_per_sequence + 1

    @property
    def chunk(self) -> int:
        return min(self.max_chunk, self.max_seq_len)

    def check(self) -> None:
        if self.max_batch_size < 1 or self.max_seq_len < 2 or self.max_chunk < 1:
            raise ValueError(f"max_batch_size, max_chunk >= 1 and max_seq_len >= 2 needed: {self}")
        if self.pool_pages < self.pages_per_sequence + 1:
            raise ValueError(
                f"num_pages={self.pool_pages} cannot hold one max_seq_len={self.max_seq_len} sequence: it needs "
                f"{self.pages_per_sequence} pages of {self.page_size} slots plus the scratch page"
            )


class Engine:
    def __init__(self, model: nn.Module, config: EngineConfig, compile_options: dict | None = None):
        config.check()
        self.config = config
        self.lm = PagedLM(model, config.pool_pages, config.page_size).eval()  # TypeError for other models
        self.device = next(model.parameters()).device
        self.pages = PageAllocator(config.pool_pages, config.page_size)
        self.scheduler = Scheduler(
            self.pages, config.max_batch_size, config.max_batch_size + config.chunk, config.chunk
        )
        self.buckets = Buckets.of(config.bucket_policy, config.chunk, config.max_batch_size, config.pages_per_sequence)
        self.runner = StepRunner(self.lm, config.backend, compile_options)
        self._seeds = random.Random(config.seed)
        self._next_id = 0
        self.sequences: dict[int, Sequence] = {}
        self.finished: set[int] = set()
        self.steps = 0

    @property
    def vocab_size(self) -> int:
        return self.lm.vocab_size

    def add_request(self, prompt: Seq[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. A request that cannot be served raises ValueError
        naming it (nothing else changes)."""
        params = params or SamplingParams()
        request_id = self._next_id
        tokens, problems = self.check(prompt, params)
        if problems:
            raise ValueError(f"request {request_id}: " + "; ".join(problems))
        self._next_id += 1
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(32)
        seq = Sequence(request_id, tokens, params, seed & 0xFFFFFFFF)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def check(self, prompt: Seq[int], params: SamplingParams) -> tuple[list[int], list[str]]:
        """(the prompt as ints, what makes the request impossible to serve: empty when nothing does)."""
        return check_request(prompt, params, self.vocab_size, self.config.max_seq_len)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def output(self, request_id: int) -> list[int]:
        return list(self.sequences[request_id].generated)

    def precompile(self, on_shape: Callable[[tuple[int, int, int], float], None] | None = None) -> int:
        """Compile (and run once, on padding rows only) every step shape of the buckets, so that
        no compile happens while serving; returns the compiles made. Megakernels' coarse buckets
        have a few dozen shapes at most; powers of two, hundreds. `on_shape(shape, seconds)` is
        called after each (progress: a shape's compile takes seconds to tens of seconds)."""
        before = self.runner.compiles
        for shape in self.buckets.grid():
            t0 = time.perf_counter()
            self.runner(padding_step(shape, self.device))
            if on_shape is not None:
                on_shape(shape, time.perf_counter() - t0)
        return self.runner.compiles - before

    def step(self) -> list[tuple[int, int]]:
        """One batched step: (request id, new token) for each token it produced."""
        plan = self.scheduler.schedule()
        if plan.chunk is None and not plan.decode:
            return []
        step = build_step(plan, self.pages, self.buckets, self.vocab_size, self.device)
        logits = self.runner(step.inputs)
        tokens = sample(logits, step.sampling, step.drawn).tolist()  # the step's one read from the device
        self.steps += 1
        grown = self.scheduler.advance(plan, {seq.request_id: tokens[row] for row, seq in step.owners})
        for seq in grown:
            if self._done(seq):
                self.scheduler.finish(seq)
                self.finished.add(seq.request_id)
        return [(seq.request_id, seq.generated[-1]) for seq in grown]

    def _done(self, seq: Sequence) -> bool:
        p = seq.params
        return (
            len(seq.generated) >= p.max_new_tokens
            or seq.generated[-1] in p.stop_token_ids
            or len(seq.tokens) >= self.config.max_seq_len
        )


class RequestError(ValueError):
    """Some requests of a generate()/stream() call could not be served; the others finished.
    `problems`: prompt index -> what is wrong; `outputs`: generate()'s list, None where bad."""

    def __init__(self, problems: dict[int, str], outputs: list[list[int] | None]):
        super().__init__("; ".join(f"request {i}: {why}" for i, why in sorted(problems.items())))
        self.problems, self.outputs = problems, outputs


class LLM:
    def __init__(
        self,
        model: nn.Module,
        max_batch_size: int = 64,
        max_seq_len: int = 2048,
        page_size: int = 16,
        compile_options: dict | None = None,
        **options,
    ):
        """options: the other fields of EngineConfig (num_pages, max_chunk, backend, seed, buckets)."""
        config = EngineConfig(max_batch_size, max_seq_len, page_size, **options)
        self.engine = Engine(model, config, compile_options)

    def stream(
        self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> Iterator[tuple[int, int]]:
        """(prompt index, token) as tokens are produced. Requests that cannot be served raise
        RequestError (a ValueError naming them) after the others have finished."""
        yield from self._run(prompts, params, [])

    def generate(
        self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[list[int]]:
        """The generated tokens of each prompt, in prompt order."""
        outputs: list[list[int] | None] = []
        for _ in self._run(prompts, params, outputs):
            pass
        return outputs

    def _run(self, prompts, params, outputs: list) -> Iterator[tuple[int, int]]:
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        engine = self.engine
        index_of, problems = {}, {}
        for i, (prompt, sp) in enumerate(zip(prompts, per_prompt)):
            why = engine.check(prompt, sp or SamplingParams())[1]
            if why:
                problems[i] = "; ".join(why)
            else:
                index_of[engine.add_request(prompt, sp)] = i
        pending = set(index_of)
        while pending:
            for rid, token in engine.step():
                if rid in index_of:
                    yield index_of[rid], token
            pending -= engine.finished
        outputs[:] = [None] * len(prompts)
        for rid, i in index_of.items():
            outputs[i] = engine.output(rid)
        if problems:
            raise RequestError(problems, list(outputs))
