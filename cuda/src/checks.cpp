#include "checks.h"

#include <stdexcept>

namespace nanorun {
namespace checks {

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string list_str(const int64_t* v, int n) {
  std::string s = "[";
  for (int i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

std::string shape_str(const TensorView& t) { return list_str(t.shape, t.ndim); }

}  // namespace

DType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "f32") return DType::f32;
  if (name == "float16" || name == "f16") return DType::f16;
  if (name == "bfloat16" || name == "bf16") return DType::bf16;
  if (name == "int32" || name == "i32") return DType::i32;
  if (name == "int64" || name == "i64") return DType::i64;
  fail("TensorArg: unsupported dtype '" + name +
       "' (expected float32, float16, bfloat16, int32 or int64)");
}

TensorView make_tensor_view(uintptr_t data_ptr, const std::string& dtype,
                            const std::vector<int64_t>& shape,
                            const std::vector<int64_t>& strides, int device) {
  if (shape.size() != strides.size()) {
    fail("TensorArg: shape has " + std::to_string(shape.size()) + " dims but strides has " +
         std::to_string(strides.size()));
  }
  if (shape.size() > static_cast<size_t>(kMaxDims)) {
    fail("TensorArg: at most " + std::to_string(kMaxDims) + " dims are supported, got " +
         std::to_string(shape.size()));
  }
  if (device < -1) fail("TensorArg: device must be -1 (host) or a CUDA ordinal");

  TensorView t;
  t.data = reinterpret_cast<void*>(data_ptr);
  t.dtype = parse_dtype(dtype);
  t.ndim = static_cast<int>(shape.size());
  t.device = device;
  for (int i = 0; i < t.ndim; ++i) {
    if (shape[i] < 0) fail("TensorArg: negative size in shape " + list_str(shape.data(), t.ndim));
    t.shape[i] = shape[i];
    t.strides[i] = strides[i];
  }
  return t;
}

std::string describe(const TensorView& t) {
  return std::string("TensorArg(") + dtype_name(t.dtype) + ", shape=" + shape_str(t) +
         ", strides=" + list_str(t.strides, t.ndim) + ", device=" + std::to_string(t.device) +
         ")";
}

void check_ndim(const TensorView& t, const char* name, int ndim) {
  if (t.ndim != ndim) {
    fail(std::string(name) + " must have " + std::to_string(ndim) + " dims, got shape " +
         shape_str(t));
  }
}

void check_dtype(const TensorView& t, const char* name, DType dtype) {
  if (t.dtype != dtype) {
    fail(std::string(name) + " must be " + dtype_name(dtype) + ", got " + dtype_name(t.dtype));
  }
}

void check_floating(const TensorView& t, const char* name) {
  if (!is_floating(t.dtype)) {
    fail(std::string(name) + " must be float32, float16 or bfloat16, got " +
         dtype_name(t.dtype));
  }
}

void check_size(const TensorView& t, const char* name, int dim, int64_t expected,
                const std::string& expected_what) {
  if (t.shape[dim] != expected) {
    fail(std::string(name) + ".shape[" + std::to_string(dim) + "] must be " +
         std::to_string(expected) + " (" + expected_what + "), got shape " + shape_str(t));
  }
}

void check_same_shape(const TensorView& t, const char* name, const TensorView& ref,
                      const char* ref_name) {
  bool same = t.ndim == ref.ndim;
  for (int i = 0; same && i < t.ndim; ++i) same = t.shape[i] == ref.shape[i];
  if (!same) {
    fail(std::string(name) + " must have the shape of " + ref_name + " " + shape_str(ref) +
         ", got " + shape_str(t));
  }
}

void check_last_dim_contiguous(const TensorView& t, const char* name) {
  if (!t.last_dim_contiguous()) {
    fail(std::string(name) + " must have unit stride in its last dim, got strides " +
         list_str(t.strides, t.ndim));
  }
}

void check_contiguous(const TensorView& t, const char* name) {
  int64_t expected = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    if (t.shape[i] != 1 && t.strides[i] != expected) {
      fail(std::string(name) + " must be contiguous, got shape " + shape_str(t) + " and strides " +
           list_str(t.strides, t.ndim));
    }
    expected *= t.shape[i];
  }
}

void check_aligned(const TensorView& t, const char* name, int bytes) {
  if (reinterpret_cast<uintptr_t>(t.data) % bytes != 0) {
    fail(std::string(name) + "'s data must be " + std::to_string(bytes) +
         "-byte aligned (a view starting at an odd offset is not)");
  }
}

void check_half_precision(const TensorView& t, const char* name) {
  if (t.dtype != DType::f16 && t.dtype != DType::bf16) {
    fail(std::string(name) + " must be float16 or bfloat16, got " + dtype_name(t.dtype));
  }
}

void check_cuda_device(const TensorView& t, const char* name, const TensorView& ref,
                       const char* ref_name) {
  if (t.device < 0) fail(std::string(name) + " must be a CUDA tensor, got host memory");
  if (t.device != ref.device) {
    fail(std::string(name) + " is on cuda:" + std::to_string(t.device) + " but " + ref_name +
         " is on cuda:" + std::to_string(ref.device));
  }
}

void check_data(const TensorView& t, const char* name) {
  if (t.data == nullptr && t.numel() > 0) fail(std::string(name) + " has a null data pointer");
}

}  // namespace checks
}  // namespace nanorun
