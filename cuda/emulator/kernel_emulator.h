// CUDA's built-ins for the plain kernels (rotary, kv_append, RMSNorm, fused add+RMSNorm,
// SiLU-and-mul), compiled as host C++ by tests/test_cuda_kernels_emulated.py.
//
// Those kernels are written against CUDA itself (threadIdx, __syncthreads, __shfl_xor_sync,
// __shared__, <<<...>>> launches), not against warp_ops.cuh as the attention kernel is. So the
// test rewrites each launch `k<<<grid, block, smem, stream>>>(args)` into
// `::nanorun::emulator::launch([&] { k(args); }, grid, block, smem, stream)` (hostify.py, the
// only change to the source) and compiles the .cu file with this header first. A launch then:
//   - checks the configuration as the driver does (block 1..1024 threads, grid.y/z <= 65535,
//     no empty grid) and, if it is bad, sets the error cudaGetLastError() returns and runs
//     nothing, as a real launch would;
//   - runs every CTA in turn, its threads as fibers of warp_emulator.h: a barrier
//     (__syncthreads, and each warp shuffle, which is warp-collective) switches fibers, so a
//     thread that reads shared memory before the barrier that orders it sees what is there at
//     that point of the interleaving, and a barrier some threads skip aborts as a deadlock.
// Static __shared__ arrays become function-local statics: CTAs run one after another, so one
// copy is the CTA's shared memory. Math functions are the host's (glibc expf, sincosf), within
// a few ulp of the device's: the references are fp32 and the tolerances allow for that.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "warp_emulator.h"

namespace nanorun {
namespace emulator {

struct Geometry {
  dim3 grid{1, 1, 1}, block{1, 1, 1}, block_idx{0, 0, 0};
};

inline Geometry& geometry() {
  static Geometry g;
  return g;
}

inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

inline uint3 thread_idx() {
  const dim3& b = geometry().block;
  const unsigned t = static_cast<unsigned>(warp::thread_index());
  return uint3{t % b.x, t / b.x % b.y, t / (b.x * b.y)};
}

inline uint3 block_idx() {
  const dim3& i = geometry().block_idx;
  return uint3{i.x, i.y, i.z};
}

inline dim3 block_dim() { return geometry().block; }
inline dim3 grid_dim() { return geometry().grid; }

// Runs `body` as the kernel launch <<<grid, block, smem, stream>>>.
template <typename F>
void launch(F&& body, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
  (void)stream;  // one host thread: every launch is ordered after the previous one
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  const bool bad = threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 ||
                   grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
                   grid.z > 65535;
  if (bad) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  Geometry& g = geometry();
  g.grid = grid;
  g.block = block;
  const int total = static_cast<int>(uint64_t{grid.x} * grid.y * grid.z);
  int linear = 0;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x, ++linear) {
        g.block_idx = dim3(x, y, z);
        run_cta(linear, total, static_cast<int>(threads), smem, [&] { body(); });
      }
    }
  }
}

}  // namespace emulator
}  // namespace nanorun

// The runtime calls the launchers make. cudaGetLastError returns and clears, as CUDA's does.
extern "C" inline cudaError_t cudaGetLastError(void) {
  const cudaError_t e = nanorun::emulator::last_error();
  nanorun::emulator::last_error() = cudaSuccess;
  return e;
}

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu || width != 32) nanorun::emulator::fail("only full-warp shuffles");
  return nanorun::warp::shfl_xor(v, lane_mask);
}

inline void __syncthreads() { nanorun::warp::sync_block(); }

// After the CUDA headers, which declare these names themselves.
#define threadIdx (::nanorun::emulator::thread_idx())
#define blockIdx (::nanorun::emulator::block_idx())
#define blockDim (::nanorun::emulator::block_dim())
#define gridDim (::nanorun::emulator::grid_dim())
#undef __shared__
#define __shared__ static
