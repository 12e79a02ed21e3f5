"""Host-side allocator of KV-cache pages.

Owns: which pages of the KV pool are free, and how many owners each allocated page has (reference
counts, so a page can later be shared between sequences with a common prefix). It does not own
which pages belong to which request (``engine.request.Request.pages``, kept by the scheduler), nor
the device arrays (``model.kv_cache.KVCache``).

Pages are numbered ``0 .. num_pages - 1`` like the first axis of ``KVCache.k[l]``. Page 0 is the
scratch page (``model.kv_cache.SCRATCH_PAGE``): it is never handed out, so ``num_usable_pages`` is
``num_pages - 1``. A sequence's token at position ``p`` lives in ``pages[p // page_size]``.

Error contract: ``allocate`` raises ``OutOfPages`` when the request cannot be met (nothing is
allocated then); callers that must not fail check ``can_allocate`` first. Freeing or sharing a page
that is not allocated (double free, page 0, out of range) raises ``PageOwnershipError`` and changes
nothing.
"""

from __future__ import annotations

import collections
import numbers
from collections.abc import Iterable

SCRATCH_PAGE = 0  # Mirrors model.kv_cache.SCRATCH_PAGE (that module imports JAX; this one must not).


class OutOfPages(RuntimeError):
    """``allocate(n)`` asked for more pages than are free."""

    def __init__(self, requested: int, available: int):
        super().__init__(f"cannot allocate {requested} KV pages: only {available} free")
        self.requested = requested
        self.available = available


class PageOwnershipError(ValueError):
    """A page was freed or shared that is not currently allocated."""


class PageAllocator:
    """Free list of pages ``1 .. num_pages - 1`` with per-page reference counts."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages} must be >= 2 (page 0 is the reserved scratch page)")
        if page_size < 1:
            raise ValueError(f"page_size={page_size} must be >= 1")
        self._num_pages = num_pages
        self._page_size = page_size
        # FIFO reuse: recently freed pages go to the back, so allocation order is deterministic.
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        self._refcounts = [0] * num_pages

    @property
    def num_pages(self) -> int:
        """Pages in the pool, scratch page included (the ``num_pages`` axis of the KV cache)."""
        return self._num_pages

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def num_usable_pages(self) -> int:
        """Pages that can ever be handed out: ``num_pages - 1``."""
        return self._num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable_pages - len(self._free)

    @property
    def utilization(self) -> float:
        """Fraction of usable pages allocated, in [0, 1]."""
        return self.num_used / self.num_usable_pages

    def pages_needed(self, num_tokens: int) -> int:
        """Pages that hold ``num_tokens`` tokens: ``ceil(num_tokens / page_size)``."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens} must be >= 0")
        return -(-num_tokens // self._page_size)

    def can_allocate(self, num_pages: int) -> bool:
        return 0 <= num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int]:
        """Take ``num_pages`` free pages (reference count 1 each); raises ``OutOfPages`` if short."""
        if num_pages < 0:
            raise ValueError(f"num_pages={num_pages} must be >= 0")
        if num_pages > len(self._free):
            raise OutOfPages(num_pages, len(self._free))
        pages = [self._free.popleft() for _ in range(num_pages)]
        for page in pages:
            self._refcounts[page] = 1
        return pages

    def unallocate(self, pages: list[int]) -> None:
        """Undo of the ``allocate`` calls that returned ``pages`` (the last allocations, in order): they go
        back to the front of the free list as they were, so the next ``allocate`` hands them out again.
        Each must have exactly one owner and be listed once; nothing changes otherwise."""
        if len(set(pages)) != len(pages):
            raise PageOwnershipError(f"pages {pages} list a page twice: a page is allocated once")
        for page in pages:
            self._check_allocated(page, times=1)
            if self._refcounts[page] != 1:
                raise PageOwnershipError(
                    f"page {page} has {self._refcounts[page]} owners: only a fresh allocation can be undone")
        for page in pages:
            self._refcounts[page] = 0
        self._free.extendleft(reversed(pages))

    def share(self, page: int) -> None:
        """Add an owner to an allocated page (prefix sharing); it is freed when all owners free it."""
        self._check_allocated(page, times=1)
        self._refcounts[page] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drop one ownership of each page; pages whose count reaches 0 return to the free list.

        All pages are validated before anything changes: a page listed more often than it has
        owners (double free), page 0 or an out-of-range page raises ``PageOwnershipError``.
        """
        counts = collections.Counter(pages)
        for page, times in counts.items():
            self._check_allocated(page, times)
        for page, times in counts.items():
            self._refcounts[page] -= times
            if self._refcounts[page] == 0:
                self._free.append(page)

    def refcount(self, page: int) -> int:
        """Owners of ``page`` (0 when free)."""
        self._check_in_range(page)
        return self._refcounts[page]

    def _check_in_range(self, page: int) -> None:
        if not isinstance(page, numbers.Integral) or not 0 <= page < self._num_pages:
            raise PageOwnershipError(f"page {page!r} is not in the pool [0, {self._num_pages})")

    def _check_allocated(self, page: int, times: int) -> None:
        self._check_in_range(page)
        if page == SCRATCH_PAGE:
            raise PageOwnershipError("page 0 is the scratch page; it is never allocated, shared or freed")
        owners = self._refcounts[page]
        if owners < times:
            raise PageOwnershipError(
                f"page {page} has {owners} owner(s) but {times} release(s)/share(s) were requested "
                "(double free or a page that was never allocated)"
            )
