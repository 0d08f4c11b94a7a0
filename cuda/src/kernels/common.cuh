// Helpers shared by the kernels (included by the .cu files only; not globbed as a source).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "nanorun/kernels.h"
#include "nanorun/tensor.h"

namespace nanorun {
namespace detail {

// ---- fp32 <-> storage type. All arithmetic is done in fp32; these are the only roundings. ----
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- dtype dispatch: calls f(T{}) with T the storage type of a floating dtype. ----
template <typename F>
Status dispatch_floating(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(float{}); return Status::kOk;
    case DType::f16: f(__half{}); return Status::kOk;
    case DType::bf16: f(__nv_bfloat16{}); return Status::kOk;
    default: return Status::kUnsupportedDType;
  }
}

// ---- launch geometry ----
constexpr int kWarpSize = 32;
constexpr int kMaxGridY = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One thread per element up to kMaxThreads, whole warps, at least one warp.
inline int threads_for(int64_t n, int max_threads = 1024) {
  int64_t t = ceil_div(n, kWarpSize) * kWarpSize;
  if (t < kWarpSize) t = kWarpSize;
  return static_cast<int>(t < max_threads ? t : max_threads);
}

// Launch errors (bad configuration, no kernel image for this GPU) are reported right away;
// errors while the kernel runs surface at the caller's next synchronization, as usual.
inline Status last_launch_status() { return status_from_cuda(cudaGetLastError()); }

// ---- reductions ----
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum of v over the block, returned to every thread. blockDim.x must be a multiple of 32 (at
// most 1024). Contains __syncthreads(), so every thread of the block must call it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;

  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < num_warps ? warp_sums[lane] : 0.f;
  v = warp_sum(v);  // every warp reduces the partial sums, so no second broadcast is needed
  __syncthreads();  // warp_sums may be rewritten by a later call only once all have read it
  return v;
}

}  // namespace detail
}  // namespace nanorun
