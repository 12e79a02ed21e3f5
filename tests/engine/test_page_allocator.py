"""PageAllocator: free list, reference counts, explicit errors."""

import numpy as np
import pytest

from autoglm_jax.engine.page_allocator import OutOfPages, PageAllocator, PageOwnershipError


def test_allocates_every_page_except_scratch_once():
    allocator = PageAllocator(num_pages=6, page_size=4)
    pages = allocator.allocate(5)
    assert sorted(pages) == [1, 2, 3, 4, 5]
    assert allocator.num_free == 0 and allocator.num_used == 5 and allocator.utilization == 1.0
    assert all(allocator.refcount(p) == 1 for p in pages)
    assert allocator.refcount(0) == 0


def test_out_of_pages_allocates_nothing():
    allocator = PageAllocator(num_pages=4, page_size=2)
    allocator.allocate(2)
    with pytest.raises(OutOfPages, match="cannot allocate 2 KV pages: only 1 free") as info:
        allocator.allocate(2)
    assert (info.value.requested, info.value.available) == (2, 1)
    assert allocator.num_free == 1
    assert not allocator.can_allocate(2) and allocator.can_allocate(1)


def test_free_returns_pages_and_they_are_reused():
    allocator = PageAllocator(num_pages=4, page_size=2)
    first = allocator.allocate(3)
    allocator.free(first[:2])
    assert allocator.num_free == 2 and allocator.utilization == pytest.approx(1 / 3)
    again = allocator.allocate(2)
    assert sorted(again) == sorted(first[:2])


def test_shared_page_is_freed_by_its_last_owner():
    allocator = PageAllocator(num_pages=3, page_size=2)
    (page,) = allocator.allocate(1)
    allocator.share(page)
    assert allocator.refcount(page) == 2
    allocator.free([page])
    assert allocator.refcount(page) == 1 and allocator.num_free == 1
    allocator.free([np.int64(page)])  # numpy ints (from page tables) are accepted
    assert allocator.refcount(page) == 0 and allocator.num_free == 2


@pytest.mark.parametrize(
    "bad_free, message",
    [
        ([2, 2], "double free"),      # page 2 has one owner, released twice in one call
        ([3], "never allocated"),     # free page
        ([0], "scratch page"),
        ([7], "not in the pool"),
        ([-1], "not in the pool"),
    ],
)
def test_bad_free_raises_and_changes_nothing(bad_free, message):
    allocator = PageAllocator(num_pages=5, page_size=2)
    allocator.allocate(2)  # pages 1, 2
    before = [allocator.refcount(p) for p in range(5)], allocator.num_free
    with pytest.raises(PageOwnershipError, match=message):
        allocator.free([1] + bad_free)
    assert ([allocator.refcount(p) for p in range(5)], allocator.num_free) == before


def test_double_free_across_calls():
    allocator = PageAllocator(num_pages=3, page_size=2)
    pages = allocator.allocate(1)
    allocator.free(pages)
    with pytest.raises(PageOwnershipError, match="0 owner"):
        allocator.free(pages)


def test_share_of_free_page_raises():
    allocator = PageAllocator(num_pages=3, page_size=2)
    with pytest.raises(PageOwnershipError):
        allocator.share(1)


@pytest.mark.parametrize("num_tokens, expected", [(0, 0), (1, 1), (4, 1), (5, 2), (12, 3)])
def test_pages_needed(num_tokens, expected):
    assert PageAllocator(num_pages=2, page_size=4).pages_needed(num_tokens) == expected


@pytest.mark.parametrize("num_pages, page_size", [(1, 4), (0, 4), (4, 0)])
def test_rejects_bad_sizes(num_pages, page_size):
    with pytest.raises(ValueError, match="must be >="):
        PageAllocator(num_pages, page_size)


def test_rejects_negative_counts():
    allocator = PageAllocator(num_pages=3, page_size=2)
    with pytest.raises(ValueError, match="num_pages=-1"):
        allocator.allocate(-1)
    with pytest.raises(ValueError, match="num_tokens=-1"):
        allocator.pages_needed(-1)


def test_unallocate_undoes_the_last_allocations_exactly():
    allocator = PageAllocator(num_pages=9, page_size=4)
    allocator.free(allocator.allocate(3))  # pages 1-3 go to the back: the free list is 4..8, 1, 2, 3
    before = list(allocator._free)
    first, second = allocator.allocate(2), allocator.allocate(4)
    allocator.unallocate(second)  # newest first, as a declined plan is taken back
    allocator.unallocate(first)
    assert list(allocator._free) == before and allocator.num_free == 8
    assert allocator.allocate(6) == first + second, "the same pages come out again, in the same order"


def test_unallocate_refuses_pages_that_are_not_fresh_allocations():
    allocator = PageAllocator(num_pages=9, page_size=4)
    page, = allocator.allocate(1)
    allocator.share(page)
    with pytest.raises(PageOwnershipError, match="2 owners"):
        allocator.unallocate([page])
    with pytest.raises(PageOwnershipError):
        allocator.unallocate([5])  # free: never allocated
    other, = allocator.allocate(1)
    with pytest.raises(PageOwnershipError, match="twice"):
        allocator.unallocate([other, other])
    assert allocator.refcount(page) == 2 and allocator.refcount(other) == 1 and allocator.num_free == 6
