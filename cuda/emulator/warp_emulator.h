// A CPU emulator of the warp-level instructions in cuda/src/kernels/warp_ops.cuh, for testing the
// attention kernel's logic on machines without a GPU.
//
// A CTA's threads run as fibers (ucontext) on one OS thread, deterministically: a fiber runs
// until it reaches a barrier (__syncthreads, or the implicit one of a warp-collective
// instruction), then the next fiber runs. Collectives (shuffle, ldmatrix, mma) exchange operands
// through a per-warp buffer and a warp barrier and compute each lane's result from the layouts
// documented in the PTX ISA (the same ones warp_ops.cuh states). cp.async copies are
// deferred until the thread's cp.async.wait_group retires their group, so a read that is not
// ordered after its wait sees stale data. Shared memory starts as 0xFF bytes (NaN in f16/bf16),
// every shared access is bounds- and alignment-checked, and a deadlock (a barrier some threads
// never reach) aborts with a message instead of hanging.
//
// cp.async sources must lie inside a buffer registered with register_global (when any is), so a
// read outside the KV caches aborts too.
//
// Emulates what the attention kernel uses, nothing more: 1-D grids and blocks, dynamic shared
// memory, f16/bf16 m16n8k16 MMAs with fp32 accumulation.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace nanorun {
namespace emulator {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "warp emulator: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct CopyTask {
  void* dst;
  const void* src;
  int src_bytes;
};

struct Thread {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool done = false;
  std::vector<CopyTask> open_group;            // cp.async issued since the last commit
  std::deque<std::vector<CopyTask>> committed;  // oldest first
};

// Operands of warp collectives, per lane. Collectives alternate between two buffers, so one
// barrier per collective suffices: a buffer is rewritten two collectives later, by a lane that
// has passed the next collective's barrier, which every lane reaches only after reading it.
struct Warp {
  Barrier barrier;
  int next_buffer[32] = {};  // per lane: which buffer its next collective uses
  uint32_t words[2][32][6];
  const void* addresses[2][32];
};

// One CTA in flight. The emulator runs CTAs one after another, so one instance is current.
struct Cta {
  int block_index = 0;
  int grid_size = 1;
  int num_threads = 0;
  int current = 0;  // the running fiber
  uint64_t progress = 0;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  Barrier block_barrier;
  bool any_accumulator = false;
  bool any_result = false;
  std::vector<unsigned char> smem;
  ucontext_t scheduler;
  std::function<void()> body;
};

inline Cta*& current_cta() {
  static Cta* cta = nullptr;
  return cta;
}

inline Cta& cta() { return *current_cta(); }

inline void yield() {
  Cta& c = cta();
  swapcontext(&c.threads[c.current].context, &c.scheduler);
}

inline void arrive_and_wait(Barrier& b) {
  Cta& c = cta();
  ++c.progress;
  const uint64_t generation = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield();
}

inline void fiber_entry() {
  Cta& c = cta();
  c.body();
  c.threads[c.current].done = true;
  ++c.progress;
  // Returning resumes uc_link: the scheduler.
}

// Runs `body` as every thread of one CTA, to completion.
inline void run_cta(int block_index, int grid_size, int num_threads, size_t smem_bytes,
                    std::function<void()> body) {
  constexpr size_t kStackBytes = 256 * 1024;
  if (num_threads % 32 != 0) fail("block size must be a multiple of 32");
  Cta c;
  c.block_index = block_index;
  c.grid_size = grid_size;
  c.num_threads = num_threads;
  c.threads.resize(num_threads);
  c.warps.resize(num_threads / 32);
  for (Warp& w : c.warps) w.barrier.expected = 32;
  c.block_barrier.expected = num_threads;
  c.smem.assign(smem_bytes, 0xFF);
  c.body = std::move(body);
  current_cta() = &c;
  for (Thread& t : c.threads) {
    t.stack.reset(new char[kStackBytes]);
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = t.stack.get();
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &c.scheduler;
    makecontext(&t.context, fiber_entry, 0);
  }
  for (;;) {
    const uint64_t before = c.progress;
    bool all_done = true;
    for (int i = 0; i < num_threads; ++i) {
      if (c.threads[i].done) continue;
      all_done = false;
      c.current = i;
      swapcontext(&c.scheduler, &c.threads[i].context);
    }
    if (all_done) break;
    if (c.progress == before) fail("deadlock: some threads wait at a barrier others never reach");
  }
  current_cta() = nullptr;
}

inline int lane() { return cta().current % 32; }
inline Warp& my_warp() { return cta().warps[cta().current / 32]; }

// The exchange buffer of this lane's next collective.
inline int take_buffer(Warp& w) {
  const int b = w.next_buffer[lane()];
  w.next_buffer[lane()] = 1 - b;
  return b;
}

struct Region {
  const unsigned char* begin;
  size_t bytes;
};

inline std::vector<Region>& global_regions() {
  static std::vector<Region> regions;
  return regions;
}

// Declares [p, p + bytes) readable by cp.async.
inline void register_global(const void* p, size_t bytes) {
  global_regions().push_back({static_cast<const unsigned char*>(p), bytes});
}

inline void check_global(const void* p, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (const Region& r : global_regions()) {
    if (b >= r.begin && b + bytes <= r.begin + r.bytes) return;
  }
  if (!global_regions().empty()) fail("cp.async reads outside every registered buffer");
}

inline void check_smem(const void* p, size_t bytes, size_t alignment) {
  const Cta& c = cta();
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < c.smem.data() || b + bytes > c.smem.data() + c.smem.size()) {
    fail("shared memory access out of bounds");
  }
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0) fail("misaligned shared memory access");
}

inline float bits_to_float(uint16_t bits, __half) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

inline float bits_to_float(uint16_t bits, __nv_bfloat16) {
  const uint32_t f = uint32_t{bits} << 16;
  float v;
  std::memcpy(&v, &f, 4);
  return v;
}

inline uint16_t half_of(uint32_t word, int index) {
  return static_cast<uint16_t>(index == 0 ? word & 0xFFFF : word >> 16);
}

}  // namespace emulator

namespace warp {

inline int thread_index() { return emulator::cta().current; }
inline int block_index() { return emulator::cta().block_index; }
inline int grid_size() { return emulator::cta().grid_size; }
inline unsigned char* dynamic_smem() { return emulator::cta().smem.data(); }

inline void sync_block() { emulator::arrive_and_wait(emulator::cta().block_barrier); }

inline bool sync_block_any(bool pred) {
  emulator::Cta& c = emulator::cta();
  c.any_accumulator = c.any_accumulator || pred;
  if (c.block_barrier.arrived + 1 == c.block_barrier.expected) {
    // The last to arrive publishes; nobody reads any_result before everyone has arrived, and
    // nobody can overwrite it before everyone has read it (that needs another full barrier).
    c.any_result = c.any_accumulator;
    c.any_accumulator = false;
  }
  emulator::arrive_and_wait(c.block_barrier);
  return c.any_result;
}

inline float exchange(float v, int src_lane) {
  emulator::Warp& w = emulator::my_warp();
  const int me = emulator::lane(), b = emulator::take_buffer(w);
  std::memcpy(&w.words[b][me][0], &v, 4);
  emulator::arrive_and_wait(w.barrier);
  float r;
  std::memcpy(&r, &w.words[b][src_lane][0], 4);
  return r;
}

inline float shfl_xor(float v, int lane_mask) { return exchange(v, emulator::lane() ^ lane_mask); }
inline float shfl(float v, int src_lane) { return exchange(v, src_lane); }

inline float fast_exp2(float x) { return std::exp2(x); }

inline void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  emulator::check_smem(smem, 16, 16);
  if (src_bytes != 0 && src_bytes != 16) emulator::fail("cp.async src_bytes must be 0 or 16");
  if (src_bytes == 16) {
    if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0) emulator::fail("misaligned cp.async source");
    emulator::check_global(gmem, 16);
  }
  emulator::cta().threads[thread_index()].open_group.push_back({smem, gmem, src_bytes});
}

inline void cp_async_commit() {
  emulator::Thread& t = emulator::cta().threads[thread_index()];
  t.committed.push_back(std::move(t.open_group));
  t.open_group.clear();
}

template <int kPending>
inline void cp_async_wait() {
  emulator::Thread& t = emulator::cta().threads[thread_index()];
  while (t.committed.size() > static_cast<size_t>(kPending)) {
    for (const emulator::CopyTask& task : t.committed.front()) {
      if (task.src_bytes == 16) {
        std::memcpy(task.dst, task.src, 16);
      } else {
        std::memset(task.dst, 0, 16);
      }
    }
    t.committed.pop_front();
  }
}

inline void load_matrices(uint32_t (&r)[4], const void* row_address, bool transpose) {
  emulator::check_smem(row_address, 16, 16);
  emulator::Warp& w = emulator::my_warp();
  const int me = emulator::lane(), b = emulator::take_buffer(w);
  w.addresses[b][me] = row_address;
  emulator::arrive_and_wait(w.barrier);
  for (int i = 0; i < 4; ++i) {
    uint16_t element[2];
    for (int k = 0; k < 2; ++k) {
      // Element (row, col) of matrix i is column `col` of the row lane 8 i + row points at.
      const int row = transpose ? 2 * (me % 4) + k : me / 4;
      const int col = transpose ? me / 4 : 2 * (me % 4) + k;
      std::memcpy(&element[k], static_cast<const uint16_t*>(w.addresses[b][8 * i + row]) + col,
                  2);
    }
    r[i] = uint32_t{element[0]} | (uint32_t{element[1]} << 16);
  }
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
  load_matrices(r, row_address, false);
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
  load_matrices(r, row_address, true);
}

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulator::Warp& w = emulator::my_warp();
  const int me = emulator::lane(), b = emulator::take_buffer(w);
  for (int i = 0; i < 4; ++i) w.words[b][me][i] = a[i];
  w.words[b][me][4] = b0;
  w.words[b][me][5] = b1;
  emulator::arrive_and_wait(w.barrier);
  // A[row][k] sits in lane (row % 8) * 4 + (k % 8) / 2, register (row / 8) + 2 (k / 8), half k % 2;
  // B[k][n] in lane n * 4 + (k % 8) / 2, register 4 + k / 8, half k % 2.
  auto a_at = [&](int row, int k) {
    const uint32_t word = w.words[b][(row % 8) * 4 + (k % 8) / 2][row / 8 + 2 * (k / 8)];
    return emulator::bits_to_float(emulator::half_of(word, k % 2), T{});
  };
  auto b_at = [&](int k, int n) {
    const uint32_t word = w.words[b][n * 4 + (k % 8) / 2][4 + k / 8];
    return emulator::bits_to_float(emulator::half_of(word, k % 2), T{});
  };
  for (int e = 0; e < 4; ++e) {
    const int row = me / 4 + 8 * (e / 2);
    const int col = 2 * (me % 4) + (e % 2);
    for (int k = 0; k < 16; ++k) d[e] += a_at(row, k) * b_at(k, col);
  }
}

}  // namespace warp
}  // namespace nanorun
