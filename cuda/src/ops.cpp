#include "ops.h"

#include <cuda_runtime_api.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "checks.h"
#include "nanorun/kernels.h"

namespace nanorun {
namespace ops {

namespace {

using namespace checks;

// What every tensor argument needs: memory, unit stride in the last dim, and the same CUDA
// device as `ref` (the op's first argument, whose device the launch runs on).
void check_common(const TensorView& t, const char* name, const TensorView& ref,
                  const char* ref_name) {
  check_data(t, name);
  check_last_dim_contiguous(t, name);
  check_cuda_device(t, name, ref, ref_name);
}

void check_eps(float eps) {
  if (!(eps >= 0.f) || !std::isfinite(eps)) {
    throw std::invalid_argument("eps must be finite and >= 0, got " + std::to_string(eps));
  }
}

void throw_cuda(const char* op, cudaError_t e) {
  throw std::runtime_error(std::string(op) + ": CUDA error: " + cudaGetErrorString(e));
}

// Makes `device` current for the launch and restores the caller's device afterwards, so a
// tensor on cuda:1 works whatever torch's current device is. No-op in the common case.
class DeviceGuard {
 public:
  DeviceGuard(const char* op, int device) : device_(device) {
    cudaError_t e = cudaGetDevice(&previous_);
    if (e == cudaSuccess && previous_ != device_) e = cudaSetDevice(device_);
    if (e != cudaSuccess) throw_cuda(op, e);
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = -1;
};

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Status -> exception. Called after validation, so a nanorun error here means the launcher
// met something validation let through.
void raise_if_failed(const char* op, Status s) {
  if (s == Status::kOk) return;
  if (cudaError_t e = cuda_error_of(s); e != cudaSuccess) throw_cuda(op, e);
  if (s == Status::kUnsupportedDType) {
    throw std::invalid_argument(std::string(op) + ": dtype not supported by the kernel");
  }
  throw std::invalid_argument(std::string(op) + ": sizes exceed the kernel's launch limits");
}

}  // namespace

void kv_append(const TensorView& key, const TensorView& value, const TensorView& k_cache,
               const TensorView& v_cache, const TensorView& slot_mapping, uintptr_t stream) {
  check_ndim(key, "key", 3);
  check_ndim(value, "value", 3);
  check_ndim(k_cache, "k_cache", 4);
  check_ndim(v_cache, "v_cache", 4);
  check_ndim(slot_mapping, "slot_mapping", 1);

  check_dtype(value, "value", key.dtype);
  check_dtype(k_cache, "k_cache", key.dtype);
  check_dtype(v_cache, "v_cache", key.dtype);
  check_dtype(slot_mapping, "slot_mapping", DType::i64);

  check_same_shape(value, "value", key, "key");
  check_same_shape(v_cache, "v_cache", k_cache, "k_cache");
  check_size(k_cache, "k_cache", 2, key.size(1), "key.shape[1], the number of KV heads");
  check_size(k_cache, "k_cache", 3, key.size(2), "key.shape[2], the head size");
  check_size(slot_mapping, "slot_mapping", 0, key.size(0), "key.shape[0], the number of tokens");

  check_common(key, "key", key, "key");
  check_common(value, "value", key, "key");
  check_common(k_cache, "k_cache", key, "key");
  check_common(v_cache, "v_cache", key, "key");
  check_common(slot_mapping, "slot_mapping", key, "key");

  DeviceGuard guard("kv_append", key.device);
  raise_if_failed("kv_append", kernels::kv_append(key, value, k_cache, v_cache, slot_mapping,
                                                  as_stream(stream)));
}

namespace {

// Shared by both norms: x/out-like [T, H] tensors and a [H] weight, one floating dtype.
void check_norm_args(const TensorView& x, const char* x_name, const TensorView& other,
                     const char* other_name, const TensorView& weight, float eps) {
  check_ndim(x, x_name, 2);
  check_floating(x, x_name);
  check_same_shape(other, other_name, x, x_name);
  check_dtype(other, other_name, x.dtype);
  check_ndim(weight, "weight", 1);
  check_size(weight, "weight", 0, x.size(1), std::string(x_name) + ".shape[1], the hidden size");
  check_dtype(weight, "weight", x.dtype);
  check_eps(eps);

  check_common(x, x_name, x, x_name);
  check_common(other, other_name, x, x_name);
  check_common(weight, "weight", x, x_name);
}

}  // namespace

void rms_norm(const TensorView& out, const TensorView& x, const TensorView& weight, float eps,
              uintptr_t stream) {
  check_norm_args(x, "x", out, "out", weight, eps);
  DeviceGuard guard("rms_norm", x.device);
  raise_if_failed("rms_norm", kernels::rms_norm(out, x, weight, eps, as_stream(stream)));
}

void fused_add_rms_norm(const TensorView& x, const TensorView& residual,
                        const TensorView& weight, float eps, uintptr_t stream) {
  check_norm_args(x, "x", residual, "residual", weight, eps);
  DeviceGuard guard("fused_add_rms_norm", x.device);
  raise_if_failed("fused_add_rms_norm",
                  kernels::fused_add_rms_norm(x, residual, weight, eps, as_stream(stream)));
}

void silu_and_mul(const TensorView& out, const TensorView& x, uintptr_t stream) {
  check_ndim(x, "x", 2);
  check_floating(x, "x");
  check_ndim(out, "out", 2);
  check_dtype(out, "out", x.dtype);
  if (x.size(1) % 2 != 0) {
    throw std::invalid_argument("x.shape[1] must be even ([gate | up]), got " +
                                std::to_string(x.size(1)));
  }
  check_size(out, "out", 0, x.size(0), "x.shape[0], the number of tokens");
  check_size(out, "out", 1, x.size(1) / 2, "half of x.shape[1]");
  check_common(x, "x", x, "x");
  check_common(out, "out", x, "x");

  DeviceGuard guard("silu_and_mul", x.device);
  raise_if_failed("silu_and_mul", kernels::silu_and_mul(out, x, as_stream(stream)));
}

}  // namespace ops
}  // namespace nanorun
