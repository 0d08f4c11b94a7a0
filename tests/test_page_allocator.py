"""nanorun._core.PageAllocator: unit tests plus a model-based property test.

The model is a dict {page: refcount} of allocated pages. A "twin" allocator receives only the
operations that succeeded, so comparing the two (free-list order included) proves that every
failed operation changed nothing.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from nanorun._core import OutOfPagesError, PageAllocator


def state(a: PageAllocator) -> tuple[int, list[int]]:
    return a.num_free, [a.refcount(p) for p in range(a.num_pages)]


# ---------------------------------------------------------------------------------------------
# Unit tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, -(2**31)])
def test_constructor_rejects_non_positive(n):
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(n)


def test_fresh_allocator():
    a = PageAllocator(8)
    assert (a.num_pages, a.num_free) == (8, 8)
    assert all(a.refcount(p) == 0 for p in range(8))
    assert repr(a) == "PageAllocator(num_pages=8, num_free=8)"


def test_allocate_zero_and_negative():
    a = PageAllocator(4)
    assert a.allocate(0) == []
    assert a.num_free == 4
    with pytest.raises(ValueError):
        a.allocate(-1)
    assert state(a) == (4, [0, 0, 0, 0])


def test_allocate_returns_distinct_pages_with_refcount_one():
    a = PageAllocator(5)
    pages = a.allocate(5)
    assert sorted(pages) == [0, 1, 2, 3, 4]
    assert all(a.refcount(p) == 1 for p in pages)
    assert a.num_free == 0
    assert a.allocate(0) == []


def test_lifo_reuses_most_recently_freed():
    a = PageAllocator(8)
    a.allocate(4)
    a.free([2])
    a.free([0])
    assert a.allocate(2) == [0, 2]


def test_out_of_pages_is_runtime_error_and_changes_nothing():
    a = PageAllocator(4)
    a.allocate(3)
    before = state(a)
    with pytest.raises(OutOfPagesError, match="asked for 2"):
        a.allocate(2)
    assert issubclass(OutOfPagesError, RuntimeError)
    assert state(a) == before
    assert len(a.allocate(1)) == 1


def test_double_free_raises_and_changes_nothing():
    a = PageAllocator(4)
    p, q = a.allocate(2)
    a.free([p])
    before = state(a)
    with pytest.raises(ValueError, match=f"page {p}"):
        a.free([q, p])  # q is fine, p is already free: q must not be freed either
    assert state(a) == before
    assert a.refcount(q) == 1


def test_duplicate_in_one_call_rolls_back_everything():
    a = PageAllocator(6)
    pages = a.allocate(4)
    twin = PageAllocator(6)
    twin.allocate(4)
    a.incref([pages[1]])
    twin.incref([pages[1]])
    # pages[0] drops to 0 (and is pushed to the free list), pages[1] drops twice to 0,
    # then pages[0] again: below zero, so all of it must be undone.
    with pytest.raises(ValueError, match=f"page {pages[0]}"):
        a.free([pages[0], pages[1], pages[1], pages[0]])
    assert state(a) == state(twin)
    assert a.allocate(a.num_free) == twin.allocate(twin.num_free)  # same free-list order


@pytest.mark.parametrize("bad", [-1, 4, 2**31 - 1, -(2**31)])
def test_out_of_range_ids_raise_value_error(bad):
    a = PageAllocator(4)
    pages = a.allocate(2)
    before = state(a)
    for op in (a.free, a.incref):
        with pytest.raises(ValueError, match=f"page {bad}"):
            op(pages + [bad])
        assert state(a) == before
    with pytest.raises(ValueError, match=f"page {bad}"):
        a.refcount(bad)


def test_incref_requires_allocated_page_and_changes_nothing():
    a = PageAllocator(4)
    p, q = a.allocate(2)
    free_page = next(x for x in range(4) if x not in (p, q))
    before = state(a)
    with pytest.raises(ValueError, match=f"page {free_page}"):
        a.incref([p, free_page])
    assert state(a) == before


def test_shared_page_freed_only_when_last_reference_drops():
    a = PageAllocator(4)
    prefix = a.allocate(2)
    a.incref(prefix)  # a forked sequence shares the prefix
    a.incref(prefix[:1] * 2)  # duplicates: one reference per listing
    assert [a.refcount(p) for p in prefix] == [4, 2]
    a.free(prefix)
    assert a.num_free == 2
    a.free(prefix)
    assert [a.refcount(p) for p in prefix] == [2, 0]
    assert a.num_free == 3
    a.free(prefix[:1] * 2)
    assert a.num_free == 4


def test_reset_frees_everything_and_restores_order():
    a = PageAllocator(5)
    pages = a.allocate(3)
    a.incref(pages)
    a.free([pages[2]])
    a.reset()
    assert state(a) == (5, [0] * 5)
    assert a.allocate(5) == PageAllocator(5).allocate(5)


def test_accepts_tuples_and_rejects_non_ints():
    a = PageAllocator(4)
    pages = a.allocate(2)
    a.incref(tuple(pages))
    a.free(tuple(pages))
    with pytest.raises(TypeError):
        a.free(["0"])


def test_random_sequences_never_hand_out_an_allocated_page():
    """Long random workload (allocate / fork / free) against a refcount model."""
    rng = random.Random(1234)
    num_pages = 257
    a = PageAllocator(num_pages)
    model: Counter[int] = Counter()
    seqs: list[list[int]] = []  # each sequence holds one reference to each of its pages
    for _ in range(20_000):
        op = rng.random()
        if op < 0.45:
            n = rng.randint(0, 40)
            if n > a.num_free:
                with pytest.raises(OutOfPagesError):
                    a.allocate(n)
                continue
            pages = a.allocate(n)
            assert len(set(pages)) == n
            assert not any(model[p] for p in pages), "handed out an allocated page"
            model.update(pages)
            seqs.append(pages)
        elif op < 0.6 and seqs:
            src = rng.choice(seqs)
            shared = src[: rng.randint(0, len(src))]
            a.incref(shared)
            model.update(shared)
            seqs.append(list(shared))
        elif seqs:
            pages = seqs.pop(rng.randrange(len(seqs)))
            a.free(pages)
            model.subtract(pages)
        assert a.num_free == num_pages - sum(1 for c in model.values() if c > 0)
    for pages in seqs:
        a.free(pages)
    assert state(a) == (num_pages, [0] * num_pages)


# ---------------------------------------------------------------------------------------------
# Model-based stateful test
# ---------------------------------------------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.alloc: PageAllocator | None = None
        self.twin: PageAllocator | None = None  # gets only the operations that succeeded
        self.model: dict[int, int] = {}  # allocated page -> refcount

    @initialize(num_pages=st.integers(1, 24))
    def create(self, num_pages: int) -> None:
        self.n = num_pages
        self.alloc = PageAllocator(num_pages)
        self.twin = PageAllocator(num_pages)

    # -- helpers --

    def expect_unchanged(self, exc: type[Exception], op, pages, match: str | None = None):
        before = state(self.alloc)
        with pytest.raises(exc, match=match):
            op(pages)
        assert state(self.alloc) == before

    def draw_allocated(self, data, max_size: int = 8) -> list[int]:
        return data.draw(st.lists(st.sampled_from(sorted(self.model)), max_size=max_size))

    def draw_bad_id(self, data) -> int:
        free = [p for p in range(self.n) if p not in self.model]
        out_of_range = st.one_of(st.integers(-(2**31), -1), st.integers(self.n, 2**31 - 1))
        return data.draw(st.sampled_from(free) | out_of_range if free else out_of_range)

    def with_inserted(self, data, pages: list[int], bad: int) -> list[int]:
        i = data.draw(st.integers(0, len(pages)))
        return pages[:i] + [bad] + pages[i:]

    # -- rules --

    @rule(n=st.integers(0, 30))
    def allocate(self, n: int) -> None:
        if n > self.alloc.num_free:
            self.expect_unchanged(OutOfPagesError, self.alloc.allocate, n)
            return
        pages = self.alloc.allocate(n)
        assert len(pages) == n and len(set(pages)) == n
        assert not set(pages) & set(self.model), "handed out an allocated page"
        assert all(0 <= p < self.n for p in pages)
        assert self.twin.allocate(n) == pages
        self.model.update({p: 1 for p in pages})

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data) -> None:
        pages = self.draw_allocated(data)
        counts = Counter(pages)
        if any(c > self.model[p] for p, c in counts.items()):  # duplicates past the refcount
            self.expect_unchanged(ValueError, self.alloc.free, pages, match="double free")
            return
        self.alloc.free(pages)
        self.twin.free(pages)
        for p, c in counts.items():
            self.model[p] -= c
            if self.model[p] == 0:
                del self.model[p]

    @rule(data=st.data())
    def free_bad_id(self, data) -> None:
        bad = self.draw_bad_id(data)
        good = self.draw_allocated(data) if self.model else []
        pages = self.with_inserted(data, good, bad)
        self.expect_unchanged(ValueError, self.alloc.free, pages)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def incref(self, data) -> None:
        pages = self.draw_allocated(data)
        self.alloc.incref(pages)
        self.twin.incref(pages)
        for p in pages:
            self.model[p] += 1

    @rule(data=st.data())
    def incref_bad_id(self, data) -> None:
        bad = self.draw_bad_id(data)
        good = self.draw_allocated(data) if self.model else []
        pages = self.with_inserted(data, good, bad)
        self.expect_unchanged(ValueError, self.alloc.incref, pages, match=f"page {bad}")

    # -- invariants --

    @invariant()
    def bookkeeping_matches_model(self) -> None:
        if self.alloc is None:
            return
        assert self.alloc.num_free == self.n - len(self.model)
        assert [self.alloc.refcount(p) for p in range(self.n)] == [
            self.model.get(p, 0) for p in range(self.n)
        ]

    def teardown(self) -> None:
        if self.alloc is None:
            return
        # Failed operations left no trace: the free list is in the twin's order.
        rest = self.alloc.allocate(self.alloc.num_free)
        assert rest == self.twin.allocate(self.twin.num_free)
        # Freeing every reference returns every page.
        self.alloc.free(rest + [p for p, c in self.model.items() for _ in range(c)])
        assert state(self.alloc) == (self.n, [0] * self.n)


AllocatorMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_allocator_state_machine = AllocatorMachine.TestCase
