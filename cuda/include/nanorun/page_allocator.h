// KV-cache page allocator: hands out page ids and reference-counts them.
//
// Plain C++17; knows nothing of Python or torch. The pages themselves (the K/V storage) live
// elsewhere; this class only decides which page ids are in use. Not thread-safe: from Python
// every call runs under the GIL.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace nanorun {

// Raised by PageAllocator::allocate when fewer pages are free than were asked for.
// Distinct from other runtime errors so the scheduler can preempt instead of crashing.
class OutOfPages : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class PageAllocator {
 public:
  // Throws std::invalid_argument if num_pages <= 0.
  explicit PageAllocator(int32_t num_pages);

  // n distinct free pages, each with refcount 1; O(n). All-or-nothing: throws OutOfPages
  // (changing nothing) if fewer than n pages are free. allocate(0) returns {}.
  // Throws std::invalid_argument if n < 0.
  std::vector<int32_t> allocate(int32_t n);

  // Drops one reference per listed id; a page whose refcount reaches 0 becomes free.
  // A page may be listed several times (one reference dropped per listing). If any id is out
  // of range, or would drop below refcount 0, throws std::invalid_argument naming it and
  // changes nothing.
  void free(const std::vector<int32_t>& pages);

  // Adds one reference per listed id (prefix sharing, fork). Every id must be allocated
  // (refcount > 0); otherwise throws std::invalid_argument and changes nothing.
  void incref(const std::vector<int32_t>& pages);

  // Current reference count of `page` (0 = free). Throws std::invalid_argument if out of range.
  int32_t refcount(int32_t page) const;

  int32_t num_free() const { return static_cast<int32_t>(free_list_.size()); }
  int32_t num_pages() const { return static_cast<int32_t>(refcount_.size()); }

  // Frees every page, whatever its refcount, and restores the initial allocation order.
  void reset();

 private:
  // Throws std::invalid_argument if `page` is not a valid id.
  void check_in_range(int32_t page) const;

  std::vector<int32_t> refcount_;   // per page; 0 means free
  std::vector<int32_t> free_list_;  // stack of free ids: the most recently freed is reused
                                    // first, so its memory is likely still in cache
};

}  // namespace nanorun
