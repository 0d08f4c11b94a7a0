// The CUDA ops as Python sees them: validate every argument, make the tensors' device
// current, launch on the given stream, turn failures into exceptions
// (std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError). Shapes and
// semantics are documented on the launchers in nanorun/kernels.h. `stream` is a cudaStream_t
// as an integer (0 = the legacy default stream).
#pragma once

#include <cstdint>

#include "nanorun/kernels.h"
#include "nanorun/tensor.h"

namespace nanorun {
namespace ops {

void kv_append(const TensorView& key, const TensorView& value, const TensorView& k_cache,
               const TensorView& v_cache, const TensorView& slot_mapping, int cta_budget,
               uintptr_t stream);

// cta_budget: the most CTAs the kernel may occupy; 0 = as many as fit on the device.
void paged_attention(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                     const TensorView& block_tables, const TensorView& seq_ids,
                     const TensorView& positions, const TensorView& out,
                     const TensorView& workspace, float scale, int sliding_window, int cta_budget,
                     uintptr_t stream);

// CTAs of paged_attention that fit on q's device at once (SMs x resident CTAs per SM) for q's
// dtype and head dim: the budget a cta_budget of None means.
int paged_attention_capacity(const TensorView& q);

// The plan paged_attention would use for these arguments (validated the same way).
kernels::AttentionPlan paged_attention_plan(const TensorView& q, const TensorView& k_cache,
                                            const TensorView& v_cache,
                                            const TensorView& block_tables,
                                            const TensorView& seq_ids,
                                            const TensorView& positions, const TensorView& out,
                                            const TensorView& workspace, float scale,
                                            int sliding_window, int cta_budget);

void rotary_embedding(const TensorView& qk, const TensorView& positions, const TensorView& cos,
                      const TensorView& sin, uintptr_t stream);

void rotary_embedding_inv_freq(const TensorView& qk, const TensorView& positions,
                               const TensorView& inv_freq, uintptr_t stream);

void rms_norm(const TensorView& out, const TensorView& x, const TensorView& weight, float eps,
              uintptr_t stream);

void fused_add_rms_norm(const TensorView& x, const TensorView& residual,
                        const TensorView& weight, float eps, uintptr_t stream);

void silu_and_mul(const TensorView& out, const TensorView& x, uintptr_t stream);

}  // namespace ops
}  // namespace nanorun
