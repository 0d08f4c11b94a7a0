#include "ops.h"

#include <cuda_runtime_api.h>

#include <algorithm>
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

void check_cta_budget(int cta_budget) {
  if (cta_budget < 0) {
    throw std::invalid_argument("cta_budget must be None or >= 1, got " +
                                std::to_string(cta_budget));
  }
}

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
               const TensorView& v_cache, const TensorView& slot_mapping, int cta_budget,
               uintptr_t stream) {
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
  check_cta_budget(cta_budget);

  DeviceGuard guard("kv_append", key.device);
  raise_if_failed("kv_append", kernels::kv_append(key, value, k_cache, v_cache, slot_mapping,
                                                  cta_budget, as_stream(stream)));
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

namespace {

void check_attention_args(const TensorView& q, const TensorView& k_cache,
                          const TensorView& v_cache, const TensorView& block_tables,
                          const TensorView& seq_ids, const TensorView& positions,
                          const TensorView& out, const TensorView& workspace, float scale,
                          int sliding_window, int cta_budget) {
  check_ndim(q, "q", 3);
  check_half_precision(q, "q");
  const int64_t tokens = q.size(0), heads = q.size(1), head_dim = q.size(2);
  if (head_dim != 32 && head_dim != 64 && head_dim != 128) {
    throw std::invalid_argument("q.shape[2] (head_dim) must be 32, 64 or 128, got " +
                                std::to_string(head_dim));
  }
  check_ndim(k_cache, "k_cache", 4);
  check_dtype(k_cache, "k_cache", q.dtype);
  check_dtype(v_cache, "v_cache", q.dtype);
  check_same_shape(v_cache, "v_cache", k_cache, "k_cache");
  check_size(k_cache, "k_cache", 3, head_dim, "q.shape[2], the head size");
  const int64_t kv_heads = k_cache.size(2);
  if (kv_heads < 1 || heads % kv_heads != 0) {
    throw std::invalid_argument("q.shape[1] (num_heads, " + std::to_string(heads) +
                                ") must be a multiple of k_cache.shape[2] (num_kv_heads, " +
                                std::to_string(kv_heads) + ")");
  }
  if (k_cache.size(1) < 1) throw std::invalid_argument("k_cache.shape[1] (page_size) must be >= 1");
  check_contiguous(k_cache, "k_cache");
  check_contiguous(v_cache, "v_cache");
  check_aligned(k_cache, "k_cache", 16);  // read 16 bytes at a time (cp.async)
  check_aligned(v_cache, "v_cache", 16);
  check_aligned(q, "q", 4);  // read 4 bytes (2 elements) at a time
  if (q.stride(0) % 2 != 0 || q.stride(1) % 2 != 0) {
    throw std::invalid_argument("q's token and head strides must be even (it is read two "
                                "elements at a time), got " + describe(q));
  }
  check_ndim(block_tables, "block_tables", 2);
  check_dtype(block_tables, "block_tables", DType::i32);
  check_ndim(seq_ids, "seq_ids", 1);
  check_dtype(seq_ids, "seq_ids", DType::i32);
  check_size(seq_ids, "seq_ids", 0, tokens, "q.shape[0], the number of tokens");
  check_ndim(positions, "positions", 1);
  check_dtype(positions, "positions", DType::i64);
  check_size(positions, "positions", 0, tokens, "q.shape[0], the number of tokens");
  check_dtype(out, "out", q.dtype);
  check_same_shape(out, "out", q, "q");
  check_ndim(workspace, "workspace", 1);
  check_dtype(workspace, "workspace", DType::f32);
  if (!std::isfinite(scale)) throw std::invalid_argument("scale must be finite");
  if (sliding_window < 0) {
    throw std::invalid_argument("sliding_window must be None or >= 1, got " +
                                std::to_string(sliding_window));
  }
  check_cta_budget(cta_budget);
  constexpr int64_t kMaxInt = INT32_MAX / 2;
  if (tokens > kMaxInt || heads > kMaxInt || block_tables.size(0) > kMaxInt ||
      block_tables.size(1) > kMaxInt || k_cache.size(1) > kMaxInt) {
    throw std::invalid_argument("paged_attention: sizes must stay below 2^30");
  }

  check_common(q, "q", q, "q");
  check_common(k_cache, "k_cache", q, "q");
  check_common(v_cache, "v_cache", q, "q");
  check_common(block_tables, "block_tables", q, "q");
  check_common(seq_ids, "seq_ids", q, "q");
  check_common(positions, "positions", q, "q");
  check_common(out, "out", q, "q");
  check_common(workspace, "workspace", q, "q");
}

// The budget in CTAs: cta_budget, at most what fits on the device (0 = all of that).
int attention_ctas(const TensorView& q, int cta_budget) {
  int capacity = 0;
  raise_if_failed("paged_attention",
                  kernels::attention_device_ctas(q.device, q.dtype, static_cast<int>(q.size(2)),
                                                 &capacity));
  return cta_budget > 0 ? std::min(cta_budget, capacity) : capacity;
}

void check_rotary_args(const TensorView& qk, const TensorView& positions) {
  check_ndim(qk, "qk", 3);
  check_floating(qk, "qk");
  if (qk.size(2) % 2 != 0) {
    throw std::invalid_argument("qk.shape[2] (head_dim) must be even, got " +
                                std::to_string(qk.size(2)));
  }
  check_ndim(positions, "positions", 1);
  check_dtype(positions, "positions", DType::i64);
  check_size(positions, "positions", 0, qk.size(0), "qk.shape[0], the number of tokens");
  check_common(qk, "qk", qk, "qk");
  check_common(positions, "positions", qk, "qk");
}

// A [rows, Dh/2] float32 table (rows = 1 for inv_freq, given as [Dh/2]).
void check_rotary_table(const TensorView& t, const char* name, const TensorView& qk, int ndim) {
  check_ndim(t, name, ndim);
  check_dtype(t, name, DType::f32);
  check_size(t, name, ndim - 1, qk.size(2) / 2, "half of qk.shape[2]");
  check_common(t, name, qk, "qk");
}

}  // namespace

void paged_attention(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                     const TensorView& block_tables, const TensorView& seq_ids,
                     const TensorView& positions, const TensorView& out,
                     const TensorView& workspace, float scale, int sliding_window, int cta_budget,
                     uintptr_t stream) {
  check_attention_args(q, k_cache, v_cache, block_tables, seq_ids, positions, out, workspace,
                       scale, sliding_window, cta_budget);
  if (q.size(0) == 0) return;
  DeviceGuard guard("paged_attention", q.device);
  raise_if_failed("paged_attention",
                  kernels::paged_attention(q, k_cache, v_cache, block_tables, seq_ids, positions,
                                           out, workspace, scale, sliding_window,
                                           attention_ctas(q, cta_budget), as_stream(stream)));
}

int paged_attention_capacity(const TensorView& q) {
  check_ndim(q, "q", 3);
  check_half_precision(q, "q");
  const int64_t head_dim = q.size(2);
  if (head_dim != 32 && head_dim != 64 && head_dim != 128) {
    throw std::invalid_argument("q.shape[2] (head_dim) must be 32, 64 or 128, got " +
                                std::to_string(head_dim));
  }
  DeviceGuard guard("paged_attention_capacity", q.device);
  return attention_ctas(q, 0);
}

kernels::AttentionPlan paged_attention_plan(const TensorView& q, const TensorView& k_cache,
                                            const TensorView& v_cache,
                                            const TensorView& block_tables,
                                            const TensorView& seq_ids,
                                            const TensorView& positions, const TensorView& out,
                                            const TensorView& workspace, float scale,
                                            int sliding_window, int cta_budget) {
  check_attention_args(q, k_cache, v_cache, block_tables, seq_ids, positions, out, workspace,
                       scale, sliding_window, cta_budget);
  DeviceGuard guard("paged_attention_plan", q.device);
  return kernels::plan_paged_attention(
      q.size(0), static_cast<int>(q.size(1)), static_cast<int>(k_cache.size(2)),
      static_cast<int>(q.size(2)), block_tables.size(1) * k_cache.size(1),
      attention_ctas(q, cta_budget), workspace.numel());
}

void rotary_embedding(const TensorView& qk, const TensorView& positions, const TensorView& cos,
                      const TensorView& sin, uintptr_t stream) {
  check_rotary_args(qk, positions);
  check_rotary_table(cos, "cos", qk, 2);
  check_rotary_table(sin, "sin", qk, 2);
  check_same_shape(sin, "sin", cos, "cos");
  if (sin.stride(0) != cos.stride(0)) {
    throw std::invalid_argument("sin must have the row stride of cos, got " + describe(sin) +
                                " and " + describe(cos));
  }
  DeviceGuard guard("rotary_embedding", qk.device);
  raise_if_failed("rotary_embedding",
                  kernels::rotary_embedding(qk, positions, cos, sin, as_stream(stream)));
}

void rotary_embedding_inv_freq(const TensorView& qk, const TensorView& positions,
                               const TensorView& inv_freq, uintptr_t stream) {
  check_rotary_args(qk, positions);
  check_rotary_table(inv_freq, "inv_freq", qk, 1);
  DeviceGuard guard("rotary_embedding", qk.device);
  raise_if_failed("rotary_embedding", kernels::rotary_embedding_inv_freq(
                                          qk, positions, inv_freq, as_stream(stream)));
}

}  // namespace ops
}  // namespace nanorun
