"""Continuous batching: which tokens each step computes, and who owns which KV-cache pages.

Every step takes one decode token from each running sequence and fills the rest of a token
budget with a chunk of one waiting sequence's known tokens (chunked prefill). A sequence whose
chunk reaches its last known token samples its next token and joins the running set; a finished
one leaves and frees its pages; a new request joins the waiting queue at any time.

Out of pages, the newest sequence holding pages is preempted: its pages are freed, it forgets
its cache (computed = 0) and waits again, in arrival order, to recompute prompt + generated
tokens. The oldest sequence is never preempted for a newer one, so it always progresses, and
the pool holds a whole max_seq_len sequence (Engine checks), so every request finishes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from mkcompiler.serve.pages import PageAllocator
from mkcompiler.serve.params import SamplingParams


@dataclass(eq=False)  # identity: `in` and remove() find this sequence, not an equal one
class Sequence:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    generated: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache (tokens[:computed])
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    def __lt__(self, other: Sequence) -> bool:  # arrival order (request ids rise)
        return self.request_id < other.request_id


@dataclass
class StepPlan:
    """One step's work: a decode token of each of `decode`; `chunk_len` tokens of `chunk` from
    its position `chunk_start` (no chunk: None)."""

    decode: list[Sequence]
    chunk: Sequence | None = None
    chunk_start: int = 0
    chunk_len: int = 0

    @property
    def chunk_completes(self) -> bool:
        """The chunk reaches its sequence's last known token: its last row is sampled."""
        return self.chunk is not None and self.chunk_start + self.chunk_len == len(self.chunk.tokens)


class Scheduler:
    def __init__(self, allocator: PageAllocator, max_batch_size: int, token_budget: int, max_chunk: int):
        if token_budget < max_batch_size:
            raise ValueError(f"token_budget {token_budget} is below max_batch_size {max_batch_size}")
        self.pages = allocator
        self.max_batch_size, self.token_budget, self.max_chunk = max_batch_size, token_budget, max_chunk
        self.waiting: list[Sequence] = []  # arrival order; at most one holds pages (a partial prefill)
        self.running: list[Sequence] = []  # arrival order; each has exactly one token not in the cache
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        before = self.preemptions
        plan = StepPlan(decode=self._decodes())
        # No prefill in a step that preempted: the pages just freed would go straight to a
        # (re)prefill that the next decode step preempts again. The running set, never empty
        # after a preemption, makes progress meanwhile.
        if self.preemptions == before:
            self._add_chunk(plan)
        return plan

    def _holders(self) -> list[Sequence]:
        return [s for s in self.running + self.waiting if self.pages.pages(s.request_id)]

    def _decodes(self) -> list[Sequence]:
        """Running sequences, oldest first, each with a page for its next slot (preempting the
        newest page holders while one is missing)."""
        scheduled = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted for an older one
                continue
            while not self.pages.grow(seq.request_id, seq.computed + 1):
                victim = max(self._holders())
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(seq)
        return scheduled

    def _chunk_candidate(self) -> Sequence | None:
        partial = [s for s in self.waiting if s.computed > 0]
        if partial:
            return partial[0]
        if self.waiting and len(self.running) < self.max_batch_size:
            return self.waiting[0]
        return None

    def _add_chunk(self, plan: StepPlan) -> None:
        seq = self._chunk_candidate()
        budget = min(self.token_budget - len(plan.decode), self.max_chunk)
        if seq is None or budget <= 0:
            return
        want = min(len(seq.tokens) - seq.computed, budget)
        free_slots = self.pages.slots(seq.request_id) + self.pages.num_free * self.pages.page_size
        n = min(want, free_slots - seq.computed)
        if n <= 0:
            return
        assert self.pages.grow(seq.request_id, seq.computed + n)
        plan.chunk, plan.chunk_start, plan.chunk_len = seq, seq.computed, n

    def preempt(self, seq: Sequence) -> None:
        """Free seq's pages and send it back to wait (it recomputes its tokens later)."""
        self.pages.release(seq.request_id)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        if seq in self.running:
            self.running.remove(seq)
            self.add(seq)

    def finish(self, seq: Sequence) -> None:
        self.pages.release(seq.request_id)
        self.running.remove(seq)

    def advance(self, plan: StepPlan, tokens: dict[int, int]) -> list[Sequence]:
        """Record a step's results: tokens[request_id] = the token sampled for it (decode rows,
        and the chunk when it completed). Returns the sequences that got a new token."""
        grown = []
        for seq in plan.decode:
            seq.computed += 1
            seq.generated.append(tokens[seq.request_id])
            grown.append(seq)
        if plan.chunk is not None:
            seq = plan.chunk
            seq.computed += plan.chunk_len
            if plan.chunk_completes:
                seq.generated.append(tokens[seq.request_id])
                self.waiting.remove(seq)
                bisect.insort(self.running, seq)
                grown.append(seq)
        return grown
