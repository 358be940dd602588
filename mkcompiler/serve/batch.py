"""A StepPlan as the tensors of one shape-bucketed step: PagedInputs for the model and
SamplingRows for the sampler, padded up to the bucket's shape, built on the host and moved to
the device in two copies (one int64, one float32)."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Literal

import torch

from mkcompiler.serve.paged_lm import PagedInputs
from mkcompiler.serve.pages import SCRATCH, PageAllocator
from mkcompiler.serve.sampling import SamplingRows
from mkcompiler.serve.scheduler import Sequence, StepPlan

BucketPolicy = Literal["powers_of_two", "coarse"]
BUCKET_POLICIES: tuple[str, ...] = ("powers_of_two", "coarse")
# Coarse buckets step by this factor: a part is padded to at most 4x its rows, and the compiles
# of a (chunk, batch) grid grow as log4 of each limit (5 x 4 for chunks of 256 and 64 sequences).
COARSE_RATIO = 4


def powers_of_two(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to limit, and limit itself."""
    sizes = [1 << i for i in range(limit.bit_length()) if 1 << i < limit]
    return (*sizes, limit)


def geometric(limit: int, ratio: int) -> tuple[int, ...]:
    """limit, limit / ratio, limit / ratio^2, ... (rounded down) and 1, ascending: the largest
    bucket is the limit itself (a full chunk or batch pads nothing)."""
    sizes = {1, limit}
    n = limit
    while n > 1:
        n //= ratio
        sizes.add(max(n, 1))
    return tuple(sorted(sizes))


@dataclass(frozen=True)
class Buckets:
    """The shapes a step is padded up to (each sorted ascending); one compile per shape used."""

    chunk: tuple[int, ...]  # chunk rows C
    batch: tuple[int, ...]  # decode rows B
    pages: tuple[int, ...]  # page-table length P

    @classmethod
    def powers_of_two(cls, max_chunk: int, max_batch: int, max_pages: int) -> Buckets:
        """Little padding, many shapes (up to log2 of each limit, multiplied): for backends whose
        compiles are cheap."""
        return cls(powers_of_two(max_chunk), powers_of_two(max_batch), powers_of_two(max_pages))

    @classmethod
    def coarse(cls, max_chunk: int, max_batch: int, max_pages: int) -> Buckets:
        """Few shapes, for megakernels (a compile each): chunks and batches in COARSE_RATIO steps,
        and one page-table length, the longest (attention stops at each row's end at run time,
        so a longer table costs its entries, not their keys)."""
        return cls(geometric(max_chunk, COARSE_RATIO), geometric(max_batch, COARSE_RATIO), (max_pages,))

    @classmethod
    def of(cls, policy: BucketPolicy, max_chunk: int, max_batch: int, max_pages: int) -> Buckets:
        if policy not in BUCKET_POLICIES:
            raise ValueError(f"buckets must be one of {BUCKET_POLICIES}, not {policy!r}")
        return getattr(cls, policy)(max_chunk, max_batch, max_pages)

    @property
    def shapes(self) -> int:
        """How many step shapes there are (a bound on the compiles)."""
        return len(self.chunk) * len(self.batch) * len(self.pages)

    def fit(self, chunk: int, batch: int, pages: int) -> tuple[int, int, int]:
        return _round_up(self.chunk, chunk), _round_up(self.batch, batch), _round_up(self.pages, pages)

    def grid(self) -> list[tuple[int, int, int]]:
        """Every step shape (C, B, P)."""
        return list(itertools.product(self.chunk, self.batch, self.pages))


def _round_up(sizes: tuple[int, ...], n: int) -> int:
    i = bisect.bisect_left(sizes, max(n, 1))
    if i == len(sizes):
        raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")
    return sizes[i]


@dataclass
class Step:
    """A built step: its inputs on the device, and which sampled row belongs to whom."""

    inputs: PagedInputs
    sampling: SamplingRows
    owners: list[tuple[int, Sequence]]  # (row of the sampled tokens, its sequence)
    drawn: list[int]  # rows sampled with a temperature above 0 (the rest: argmax; sampling.sample)


def build_step(plan: StepPlan, pages: PageAllocator, buckets: Buckets, vocab_size: int, device) -> Step:
    chunk = [plan.chunk] if plan.chunk is not None else []
    longest = max(len(pages.pages(s.request_id)) for s in chunk + plan.decode)
    c, b, p = buckets.fit(plan.chunk_len, len(plan.decode), longest)
    rows = _Rows(c + b, pages)
    if plan.chunk is not None:
        rows.put(0, plan.chunk, range(plan.chunk_start, plan.chunk_start + plan.chunk_len))
    for i, seq in enumerate(plan.decode):
        rows.put(c + i, seq, [seq.computed])
    tables = [_padded(pages.pages(s.request_id) if s is not None else [], p) for s in (chunk or [None]) + plan.decode]
    tables += [[SCRATCH] * p] * (b - len(plan.decode))
    sample_rows = [max(plan.chunk_len, 1) - 1, *range(c, c + b)]
    owners = [(0, plan.chunk)] if plan.chunk_completes else []
    owners += [(1 + i, seq) for i, seq in enumerate(plan.decode)]
    top_k, seed, step, temperature, top_p = _sampling_rows(1 + b, owners, vocab_size)
    ints = torch.tensor(
        rows.flat() + [x for t in tables for x in t] + sample_rows + top_k + seed + step, dtype=torch.int64
    )
    ints = ints.to(device)
    floats = torch.tensor([temperature, top_p], dtype=torch.float32).to(device)
    parts = ints.split([c + b] * 4 + [p, b * p, 1 + b] + [1 + b] * 3)
    inputs = PagedInputs(*parts[:5], parts[5].view(b, p), parts[6])
    drawn = [r for r, t in enumerate(temperature) if t > 0]
    return Step(inputs, SamplingRows(floats[0], parts[7], floats[1], parts[8], parts[9]), owners, drawn)


def padding_step(shape: tuple[int, int, int], device) -> PagedInputs:
    """A step of shape (C, B, P) made of padding rows only (token 0 at position 0, its keys and
    values written to slot 0 of the scratch page, every table the scratch page): running it compiles that
    shape and leaves every live sequence's cache as it was."""
    c, b, p = shape
    ints = torch.tensor([0] * (4 * (c + b)) + [SCRATCH] * ((1 + b) * p) + [0, *range(c, c + b)], dtype=torch.int64)
    parts = ints.to(device).split([c + b] * 4 + [p, b * p, 1 + b])  # separate memory each, as build_step's
    return PagedInputs(*parts[:5], parts[5].view(b, p), parts[6])


def _padded(table: list[int], n: int) -> list[int]:
    return table + [SCRATCH] * (n - len(table))


class _Rows:
    """tokens, positions, slot pages and slot offsets of a step's rows (padding: token 0 at
    position 0, written to the scratch page)."""

    def __init__(self, n: int, pages: PageAllocator):
        self.tokens, self.positions, self.slot_pages, self.slot_offsets = [0] * n, [0] * n, [SCRATCH] * n, [0] * n
        self.pages = pages

    def put(self, row: int, seq: Sequence, positions) -> None:
        tokens, table, size = seq.tokens, self.pages.pages(seq.request_id), self.pages.page_size
        for r, pos in enumerate(positions, start=row):
            self.tokens[r], self.positions[r] = tokens[pos], pos
            self.slot_pages[r], self.slot_offsets[r] = table[pos // size], pos % size

    def flat(self) -> list[int]:
        return self.tokens + self.positions + self.slot_pages + self.slot_offsets


def _sampling_rows(n: int, owners: list[tuple[int, Sequence]], vocab_size: int) -> tuple[list, ...]:
    """Per row (top_k, seed, step, temperature, top_p) lists; rows nobody owns are greedy."""
    top_k, seed, step, temperature, top_p = [vocab_size] * n, [0] * n, [0] * n, [0.0] * n, [1.0] * n
    for row, seq in owners:
        sp = seq.params
        top_k[row], seed[row], step[row] = sp.top_k or vocab_size, seq.seed, len(seq.generated)
        temperature[row], top_p[row] = sp.temperature, sp.top_p
    return top_k, seed, step, temperature, top_p
