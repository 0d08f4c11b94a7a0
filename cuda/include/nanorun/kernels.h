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
// Any dtype, as long as key, value and both caches share it (it is a copy). At most max_ctas
// CTAs (0 = one per token), each striding over the tokens.
Status kv_append(const TensorView& key, const TensorView& value, const TensorView& k_cache,
                 const TensorView& v_cache, const TensorView& slot_mapping, int max_ctas,
                 cudaStream_t stream);

// How paged_attention divides its work; a pure function of shapes and limits, so a call
// captured in a CUDA graph replays with the same launch configuration for any batch contents.
struct AttentionPlan {
  int tile_tokens = 1;             // tokens per prefill tile: max(1, 64 / group)
  int row_blocks = 1;              // CTAs per (tile, kv head) when a group has > 64 heads
  int splits = 1;                  // KV splits per decode token (1 = no split-KV)
  int64_t items = 0;               // work items: tokens x kv_heads x row_blocks x splits
  int grid = 0;                    // CTAs of the attention kernel, <= max_ctas
  int combine_grid = 0;            // CTAs of the split merge; 0 when splits == 1
  int64_t workspace_floats = 0;    // fp32 workspace the splits use
};

// Split-KV is used only when tokens x kv_heads leaves CTAs of the budget idle: then each decode
// token's context is cut into up to 16 chunks of whole 64-position tiles, as many as fill the
// budget, the longest possible context (max_context) allows, and the workspace holds.
AttentionPlan plan_paged_attention(int64_t num_tokens, int num_heads, int num_kv_heads,
                                   int head_dim, int64_t max_context, int max_ctas,
                                   int64_t workspace_floats);

// CTAs of the attention kernel that fit on `device` at once (SMs x resident CTAs per SM) for
// this dtype and head dim. Sets the kernel's shared-memory limit on first use (not a stream
// operation). f16/bf16 and head dims 32, 64, 128 only.
Status attention_device_ctas(int device, DType dtype, int head_dim, int* ctas);

// Attention over the paged KV cache for a batch of decode tokens and prompt chunks in any mix
// (semantics of nanorun/ops/paged_attention.py):
//   q, out:           [T, Hq, D] f16/bf16, unit stride in D (q 4-byte aligned, even strides)
//   k_cache, v_cache: [num_pages, page_size, Hkv, D], contiguous, 16-byte aligned; Hq % Hkv == 0
//   block_tables:     [num_seqs, max_pages] int32, unit stride in dim 1
//   seq_ids:          [T] int32; positions: [T] int64
//   workspace:        [W] f32 scratch for split-KV (may be empty: no split-KV)
// Token t attends to positions lo..positions[t] of sequence seq_ids[t], lo = 0 or, with
// sliding_window W > 0, max(0, positions[t] - W + 1). D is 32, 64 or 128. At most `max_ctas`
// CTAs run (the caller resolves a budget of 0 to attention_device_ctas). Everything per batch
// is read on the device; tokens with out-of-range metadata get NaN outputs.
Status paged_attention(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                       const TensorView& block_tables, const TensorView& seq_ids,
                       const TensorView& positions, const TensorView& out,
                       const TensorView& workspace, float scale, int sliding_window,
                       int max_ctas, cudaStream_t stream);

// In place: rotates every head of qk [T, H, Dh] by its token's position, pairing dims i and
// i + Dh/2 ("rotate half"), in fp32: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.
//   positions: [T] int64
//   cos, sin:  [max_position, Dh/2] f32 tables indexed by position; any rope scaling (linear,
//              Llama 3) is already in them. A position outside the table gives NaN heads.
// f32/f16/bf16; H and T may be strided, Dh has unit stride.
Status rotary_embedding(const TensorView& qk, const TensorView& positions, const TensorView& cos,
                        const TensorView& sin, cudaStream_t stream);

// As rotary_embedding, with angles position * inv_freq[i] computed on the fly from
//   inv_freq:  [Dh/2] f32 (scaling applied), so no table of max_position rows is needed.
// A negative position gives NaN heads.
Status rotary_embedding_inv_freq(const TensorView& qk, const TensorView& positions,
                                 const TensorView& inv_freq, cudaStream_t stream);

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
