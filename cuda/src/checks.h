// Argument validation for the CUDA ops: builds TensorViews from what Python passes and checks
// them before any launch. Host-only C++; knows neither torch nor pybind11. Every check throws
// std::invalid_argument (ValueError in Python) with a message that names the argument.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "nanorun/tensor.h"

namespace nanorun {
namespace checks {

// "float32"/"f32", "float16"/"f16", "bfloat16"/"bf16", "int32"/"i32", "int64"/"i64".
DType parse_dtype(const std::string& name);

// A TensorView over caller-owned memory; validates the description (not the memory).
TensorView make_tensor_view(uintptr_t data_ptr, const std::string& dtype,
                            const std::vector<int64_t>& shape,
                            const std::vector<int64_t>& strides, int device);

// "TensorArg(float16, shape=[7, 4096], strides=[4096, 1], device=0)"
std::string describe(const TensorView& t);

void check_ndim(const TensorView& t, const char* name, int ndim);
void check_dtype(const TensorView& t, const char* name, DType dtype);
void check_floating(const TensorView& t, const char* name);
// t.shape[dim] == expected, where `expected_what` says where `expected` came from.
void check_size(const TensorView& t, const char* name, int dim, int64_t expected,
                const std::string& expected_what);
void check_same_shape(const TensorView& t, const char* name, const TensorView& ref,
                      const char* ref_name);
void check_last_dim_contiguous(const TensorView& t, const char* name);
// Row-major contiguous (size-1 dims excepted).
void check_contiguous(const TensorView& t, const char* name);
// The data pointer is a multiple of `bytes`.
void check_aligned(const TensorView& t, const char* name, int bytes);
// float16 or bfloat16: what the tensor-core kernels take.
void check_half_precision(const TensorView& t, const char* name);
// On a CUDA device (not host memory), and on the same one as `ref`.
void check_cuda_device(const TensorView& t, const char* name, const TensorView& ref,
                       const char* ref_name);
// A non-empty tensor needs a non-null pointer.
void check_data(const TensorView& t, const char* name);

}  // namespace checks
}  // namespace nanorun
