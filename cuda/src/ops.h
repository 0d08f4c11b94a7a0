// The CUDA ops as Python sees them: validate every argument, make the tensors' device
// current, launch on the given stream, turn failures into exceptions
// (std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError). Shapes and
// semantics are documented on the launchers in nanorun/kernels.h. `stream` is a cudaStream_t
// as an integer (0 = the legacy default stream).
#pragma once

#include <cstdint>

#include "nanorun/tensor.h"

namespace nanorun {
namespace ops {

void kv_append(const TensorView& key, const TensorView& value, const TensorView& k_cache,
               const TensorView& v_cache, const TensorView& slot_mapping, uintptr_t stream);

void rms_norm(const TensorView& out, const TensorView& x, const TensorView& weight, float eps,
              uintptr_t stream);

void fused_add_rms_norm(const TensorView& x, const TensorView& residual,
                        const TensorView& weight, float eps, uintptr_t stream);

void silu_and_mul(const TensorView& out, const TensorView& x, uintptr_t stream);

}  // namespace ops
}  // namespace nanorun
