"""Page allocation for the paged KV cache.

The pool of every layer has `num_pages` pages of `page_size` slots; page tables index all
layers' pools alike, so one allocator serves them all. Page SCRATCH (0) is never handed out:
padding rows of a shape-bucketed step write their keys and values there, and padded page-table
entries point there (masked out by position, so never read as a live sequence's keys).

Invariants (tests/test_serve_pages.py checks them under random operation sequences): a page is
either free or owned by exactly one sequence; a sequence owns exactly ceil(slots / page_size)
pages for the slots it asked for; releasing a sequence returns all its pages."""

from __future__ import annotations

SCRATCH = 0


def pages_for(slots: int, page_size: int) -> int:
    return -(-slots // page_size)


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"a paged KV cache needs at least 2 pages (one is scratch), not {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be positive, not {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        # Popped from the end: the lowest-numbered pages go first (reproducible page tables).
        self._free = list(range(num_pages - 1, SCRATCH, -1))
        self._owned: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages that can be handed out at all (every page but the scratch page)."""
        return self.num_pages - 1

    def pages(self, seq: int) -> list[int]:
        """The page table of `seq` (empty when it owns none); slot s lives at pages[s // page_size]."""
        return self._owned.get(seq, [])

    def slots(self, seq: int) -> int:
        """How many slots `seq` can write without growing."""
        return len(self.pages(seq)) * self.page_size

    def can_grow(self, seq: int, slots: int) -> bool:
        return pages_for(slots, self.page_size) - len(self.pages(seq)) <= len(self._free)

    def grow(self, seq: int, slots: int) -> bool:
        """Make `seq` own pages for `slots` slots; all or nothing (False: not enough free pages)."""
        need = pages_for(slots, self.page_size) - len(self.pages(seq))
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        table = self._owned.setdefault(seq, [])
        table.extend(self._free.pop() for _ in range(need))
        return True

    def release(self, seq: int) -> int:
        """Free every page of `seq`; returns how many."""
        table = self._owned.pop(seq, [])
        self._free.extend(reversed(table))
        return len(table)

    def owners(self) -> dict[int, list[int]]:
        """seq -> its pages (a copy, for checks)."""
        return {seq: list(table) for seq, table in self._owned.items()}
