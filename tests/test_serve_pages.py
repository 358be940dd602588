"""The page allocator and the continuous-batching scheduler under random workloads (hypothesis),
with no model: tokens are made up, so thousands of schedules run in seconds. Checked at every
step: no page is owned by two sequences, pages owned + free = the pool (no leak), every
sequence in the step owns the slots it writes, the step stays within its batch and token
budget; at the end every request has finished with all its tokens and every page is free."""

from hypothesis import given, settings
from hypothesis import strategies as st

from mkcompiler.serve.pages import SCRATCH, PageAllocator, pages_for
from mkcompiler.serve.params import SamplingParams
from mkcompiler.serve.scheduler import Scheduler, Sequence


def check_pages(pages: PageAllocator) -> None:
    owned = [p for table in pages.owners().values() for p in table]
    assert len(owned) == len(set(owned)), "a page is owned by two sequences"
    assert SCRATCH not in owned
    assert len(owned) + pages.num_free == pages.capacity, "pages leaked"


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 6), st.lists(st.tuples(st.sampled_from(["grow", "release"]), st.integers(0, 4), st.integers(0, 30)))
)
def test_allocator_never_shares_or_leaks_pages(num_pages, ops):
    pages = PageAllocator(num_pages + 1, page_size=4)
    want = {}  # seq -> slots asked for
    for op, seq, slots in ops:
        if op == "grow":
            before = pages.pages(seq)[:]
            if pages.grow(seq, slots):
                want[seq] = max(want.get(seq, 0), slots)
                assert pages.pages(seq)[: len(before)] == before, "growing moved a sequence's pages"
            else:
                assert pages.pages(seq) == before, "a failed grow changed the table"
                assert pages_for(slots, 4) - len(before) > pages.num_free
        else:
            assert pages.release(seq) == pages_for(want.pop(seq, 0), 4)
        for s, n in want.items():
            assert len(pages.pages(s)) == pages_for(n, 4)
        check_pages(pages)


requests = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 6)),  # prompt length, max new tokens, arrival step
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(
    requests,
    st.integers(1, 4),  # page size
    st.integers(0, 6),  # pages beyond one max_seq_len sequence's
    st.integers(1, 5),  # max batch
    st.integers(1, 16),  # max chunk
)
def test_every_request_finishes_without_sharing_or_leaking_pages(reqs, page_size, spare, max_batch, max_chunk):
    max_seq_len = 52
    pages = PageAllocator(pages_for(max_seq_len, page_size) + 1 + spare, page_size)
    sched = Scheduler(pages, max_batch, max_batch + max_chunk, max_chunk)
    seqs = [Sequence(i, [i % 7] * n, SamplingParams(max_new_tokens=m), seed=i) for i, (n, m, _) in enumerate(reqs)]
    arrivals = sorted((a, i) for i, (_, _, a) in enumerate(reqs))
    step = 0
    while arrivals or sched.has_work():
        while arrivals and arrivals[0][0] <= step:
            sched.add(seqs[arrivals.pop(0)[1]])
        plan = sched.schedule()
        check_pages(pages)
        assert len(plan.decode) <= max_batch and len(plan.decode) + plan.chunk_len <= max_batch + max_chunk
        assert len(sched.running) + any(s.computed for s in sched.waiting) <= max_batch
        for seq in plan.decode:
            assert pages.slots(seq.request_id) >= seq.computed + 1
        if plan.chunk is not None:
            assert plan.chunk_start == plan.chunk.computed
            assert pages.slots(plan.chunk.request_id) >= plan.chunk.computed + plan.chunk_len
        sampled = [s for s in plan.decode] + ([plan.chunk] if plan.chunk_completes else [])
        for seq in sched.advance(plan, {s.request_id: 100 + len(s.generated) for s in sampled}):
            if len(seq.generated) >= seq.params.max_new_tokens or len(seq.tokens) >= max_seq_len:
                sched.finish(seq)
        step += 1
        assert step < 2000, "no progress"
    for seq, (n, m, _) in zip(seqs, reqs):
        # The made-up tokens count the sampled ones: recompute after a preemption resumes, never resamples.
        assert seq.generated == [100 + k for k in range(min(m, max_seq_len - n))]
    assert pages.num_free == pages.capacity


def test_the_newest_sequence_is_preempted_and_recomputes():
    """Two sequences, room for one page each beyond the first: when both need a page, the newer
    one gives its pages back, waits, and recomputes prompt + generated tokens later."""
    pages = PageAllocator(4, page_size=2)  # 3 usable pages
    sched = Scheduler(pages, max_batch_size=2, token_budget=8, max_chunk=6)
    old, new = (Sequence(i, [1, 2], SamplingParams(max_new_tokens=4), seed=0) for i in range(2))
    sched.add(old)
    sched.add(new)
    plan = sched.schedule()
    assert plan.chunk is old and plan.chunk_len == 2
    sched.advance(plan, {0: 7})
    plan = sched.schedule()  # old decodes (needs page 2), new prefills (page 3)
    assert plan.decode == [old] and plan.chunk is new
    sched.advance(plan, {0: 7, 1: 8})
    plan = sched.schedule()  # old's slot 3 fits its page; new needs a page for slot 2: none is free
    assert plan.decode == [old] and new.preemptions == 1 and new.computed == 0 and new in sched.waiting
    assert new.generated == [8] and pages.pages(1) == []
