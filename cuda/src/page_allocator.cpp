#include "nanorun/page_allocator.h"

#include <algorithm>
#include <limits>

namespace nanorun {

namespace {

std::string page_error(const std::string& what, int32_t page) {
  return what + ": page " + std::to_string(page);
}

}  // namespace

PageAllocator::PageAllocator(int32_t num_pages) {
  if (num_pages <= 0) {
    throw std::invalid_argument("PageAllocator: num_pages must be positive, got " +
                                std::to_string(num_pages));
  }
  refcount_.assign(static_cast<size_t>(num_pages), 0);
  reset();
}

void PageAllocator::reset() {
  std::fill(refcount_.begin(), refcount_.end(), 0);
  // Pushed highest-first so that a fresh allocator hands out 0, 1, 2, ... (easy to read in logs).
  free_list_.clear();
  free_list_.reserve(refcount_.size());
  for (int32_t page = num_pages() - 1; page >= 0; --page) free_list_.push_back(page);
}

void PageAllocator::check_in_range(int32_t page) const {
  if (page < 0 || page >= num_pages()) {
    throw std::invalid_argument(page_error(
        "PageAllocator: page id out of range [0, " + std::to_string(num_pages()) + ")", page));
  }
}

std::vector<int32_t> PageAllocator::allocate(int32_t n) {
  if (n < 0) {
    throw std::invalid_argument("PageAllocator.allocate: n must be >= 0, got " +
                                std::to_string(n));
  }
  if (n > num_free()) {
    throw OutOfPages("PageAllocator.allocate: asked for " + std::to_string(n) + " pages, " +
                     std::to_string(num_free()) + " of " + std::to_string(num_pages()) +
                     " free");
  }
  // Pop n from the top of the stack, most recently freed first.
  std::vector<int32_t> pages(free_list_.rbegin(), free_list_.rbegin() + n);
  free_list_.resize(free_list_.size() - static_cast<size_t>(n));
  for (int32_t page : pages) refcount_[page] = 1;
  return pages;
}

void PageAllocator::free(const std::vector<int32_t>& pages) {
  // Range-check everything before touching any state.
  for (int32_t page : pages) check_in_range(page);

  // Decrement in order; a page listed more often than it has references hits 0 before its last
  // listing. On that error, undo exactly what was done: re-add the references already dropped
  // and pop the pages already pushed to the free list (they are on top of the stack), so the
  // allocator, free-list order included, is as before the call. No scratch memory: O(len).
  const size_t free_list_size = free_list_.size();
  for (size_t i = 0; i < pages.size(); ++i) {
    int32_t page = pages[i];
    if (refcount_[page] == 0) {
      for (size_t j = 0; j < i; ++j) ++refcount_[pages[j]];
      free_list_.resize(free_list_size);
      throw std::invalid_argument(page_error(
          "PageAllocator.free: page freed more times than it is referenced (double free?)",
          page));
    }
    if (--refcount_[page] == 0) free_list_.push_back(page);
  }
}

void PageAllocator::incref(const std::vector<int32_t>& pages) {
  // Validate the whole list first so a bad id changes nothing. Duplicates are fine: each
  // listing adds one reference.
  for (int32_t page : pages) {
    check_in_range(page);
    if (refcount_[page] == 0) {
      throw std::invalid_argument(
          page_error("PageAllocator.incref: page is not allocated", page));
    }
    // Conservative (assumes every listing is this page); only matters near 2^31 sharers.
    if (pages.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max() - refcount_[page])) {
      throw std::overflow_error(page_error("PageAllocator.incref: refcount overflow", page));
    }
  }
  for (int32_t page : pages) ++refcount_[page];
}

int32_t PageAllocator::refcount(int32_t page) const {
  check_in_range(page);
  return refcount_[page];
}

}  // namespace nanorun
