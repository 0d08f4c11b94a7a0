// Launchers of nanorun's CUDA kernels.
//
// Launchers trust their arguments: validation (dtypes, shapes, devices) is the caller's job
// (see cuda/src/checks.h). Each enqueues work on `stream` and nothing else: no allocation,
// no synchronization, no host<->device copy, so every launcher can be captured in a CUDA
// graph. The caller must have made the tensors' device current.
#pragma once

#include <cuda_runtime_api.h>

#include "nanorun/tensor.h"

namespace nanorun {

inline Status status_from_cuda(cudaError_t e) {
  return e == cudaSuccess ? Status::kOk : static_cast<Status>(static_cast<int32_t>(e));
}

// The cudaError_t a Status carries, or cudaSuccess if it carries none.
inline cudaError_t cuda_error_of(Status s) {
  int32_t v = static_cast<int32_t>(s);
  return v > 0 ? static_cast<cudaError_t>(v) : cudaSuccess;
}

namespace kernels {

// Writes each token's key/value into the paged caches.
//   key, value:       [T, Hkv, D]
//   k_cache, v_cache: [num_pages, page_size, Hkv, D]
//   slot_mapping:     [T] int64; slot = page * page_size + offset. Tokens whose slot is
//                     negative (padding) or past the cache's end are skipped: the kernel never
//                     writes outside the caches.
// Any dtype, as long as key, value and both caches share it (it is a copy).
Status kv_append(const TensorView& key, const TensorView& value, const TensorView& k_cache,
                 const TensorView& v_cache, const TensorView& slot_mapping, cudaStream_t stream);

// out = x / sqrt(mean(x^2) + eps) * weight, row by row, accumulated in fp32.
//   x, out: [T, H] (out may alias x); weight: [H]. f32/f16/bf16, all one dtype.
Status rms_norm(const TensorView& out, const TensorView& x, const TensorView& weight, float eps,
                cudaStream_t stream);

// In place: residual = x + residual (rounded to the dtype); x = rms_norm(residual) * weight.
//   x, residual: [T, H]; weight: [H]. f32/f16/bf16, all one dtype. The norm uses the rounded
//   residual, so the result equals an unfused add followed by rms_norm.
Status fused_add_rms_norm(const TensorView& x, const TensorView& residual,
                          const TensorView& weight, float eps, cudaStream_t stream);

// out = silu(x[:, :I]) * x[:, I:], computed in fp32.
//   x: [T, 2I]; out: [T, I]. f32/f16/bf16, one dtype.
Status silu_and_mul(const TensorView& out, const TensorView& x, cudaStream_t stream);

}  // namespace kernels
}  // namespace nanorun
