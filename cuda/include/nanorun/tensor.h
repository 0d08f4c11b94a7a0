// TensorView: a non-owning description of a strided tensor (pointer, dtype, shape, strides).
//
// The kernels' only view of a tensor. Knows nothing of torch or pybind11 and needs no CUDA
// header, so host code, kernels and bindings can all share it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace nanorun {

enum class DType : int32_t { f32, f16, bf16, i32, i64 };

constexpr int kMaxDims = 6;

// Result of a kernel launcher. 0 is success; negative values are nanorun's own errors;
// positive values are cudaError_t codes (see status_from_cuda / cuda_error_of in kernels.h),
// so one int carries either kind without the header needing CUDA.
enum class Status : int32_t {
  kOk = 0,
  kUnsupportedDType = -1,  // the kernel has no instantiation for this dtype
  kInvalidShape = -2,      // sizes the kernel cannot launch with (e.g. over grid limits)
};

inline bool ok(Status s) { return s == Status::kOk; }

constexpr size_t dtype_size(DType d) {
  switch (d) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::i32: return 4;
    case DType::i64: return 8;
  }
  return 0;
}

constexpr bool is_floating(DType d) {
  return d == DType::f32 || d == DType::f16 || d == DType::bf16;
}

constexpr const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
  }
  return "?";
}

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, like torch.Tensor.stride()
  int device = -1;                 // CUDA ordinal; -1 = host memory

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }

  // Size / stride of dimension i; negative i counts from the end, as in Python.
  int64_t size(int i) const { return shape[i < 0 ? i + ndim : i]; }
  int64_t stride(int i) const { return strides[i < 0 ? i + ndim : i]; }

  // A size-1 dimension's stride never matters, so it does not break contiguity.
  bool last_dim_contiguous() const {
    return ndim == 0 || shape[ndim - 1] == 1 || strides[ndim - 1] == 1;
  }

  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

}  // namespace nanorun
