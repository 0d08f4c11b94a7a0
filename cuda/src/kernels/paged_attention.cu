// Launchers of the paged attention kernels (attention_kernel.cuh): plan, dispatch, launch.
#include <algorithm>
#include <map>
#include <mutex>
#include <type_traits>

#include "attention_kernel.cuh"
#include "attention_params.h"
#include "common.cuh"

namespace nanorun {
namespace kernels {

using attention::kThreads;

namespace {

// Calls f(T{}, std::integral_constant<int, D>{}) for a supported (dtype, head dim).
template <typename F>
Status dispatch_attention(DType dtype, int head_dim, F&& f) {
  auto with_dim = [&](auto tag) {
    switch (head_dim) {
      case 32: f(tag, std::integral_constant<int, 32>{}); return Status::kOk;
      case 64: f(tag, std::integral_constant<int, 64>{}); return Status::kOk;
      case 128: f(tag, std::integral_constant<int, 128>{}); return Status::kOk;
      default: return Status::kInvalidShape;
    }
  };
  switch (dtype) {
    case DType::f16: return with_dim(__half{});
    case DType::bf16: return with_dim(__nv_bfloat16{});
    default: return Status::kUnsupportedDType;
  }
}

// Resident CTAs of paged_attention_kernel<T, D> on a device, computed once per device.
template <typename T, int D>
cudaError_t device_ctas(int device, int* ctas) {
  static std::mutex mutex;
  static std::map<int, int> known;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = known.find(device); it != known.end()) {
    *ctas = it->second;
    return cudaSuccess;
  }
  constexpr int kSmem = attention::SmemLayout<D>::kBytes;
  const auto kernel = attention::paged_attention_kernel<T, D>;
  int sms = 0, per_sm = 0;
  cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  }
  if (e == cudaSuccess) {
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, kSmem);
  }
  if (e != cudaSuccess) return e;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;  // the tile does not fit an SM
  *ctas = known[device] = sms * per_sm;
  return cudaSuccess;
}

template <typename T, int D>
Status launch(const attention::Params& p, const AttentionPlan& plan, cudaStream_t stream) {
  attention::paged_attention_kernel<T, D>
      <<<plan.grid, kThreads, attention::SmemLayout<D>::kBytes, stream>>>(p, plan.items);
  if (Status s = detail::last_launch_status(); !ok(s) || plan.splits == 1) return s;
  attention::combine_splits_kernel<T, D><<<plan.combine_grid, kThreads, 0, stream>>>(p);
  return detail::last_launch_status();
}

}  // namespace

Status attention_device_ctas(int device, DType dtype, int head_dim, int* ctas) {
  cudaError_t e = cudaSuccess;
  const Status s = dispatch_attention(dtype, head_dim, [&](auto tag, auto dim) {
    e = device_ctas<decltype(tag), decltype(dim)::value>(device, ctas);
  });
  return ok(s) ? status_from_cuda(e) : s;
}

Status paged_attention(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                       const TensorView& block_tables, const TensorView& seq_ids,
                       const TensorView& positions, const TensorView& out,
                       const TensorView& workspace, float scale, int sliding_window,
                       int max_ctas, cudaStream_t stream) {
  const int64_t num_tokens = q.size(0);
  if (num_tokens == 0) return Status::kOk;
  if (num_tokens > INT32_MAX / 2 || max_ctas < 1) return Status::kInvalidShape;
  const AttentionPlan plan = plan_paged_attention(
      num_tokens, static_cast<int>(q.size(1)), static_cast<int>(k_cache.size(2)),
      static_cast<int>(q.size(2)), block_tables.size(1) * k_cache.size(1), max_ctas,
      workspace.numel());
  const attention::Params p =
      attention::make_params(q, k_cache, v_cache, block_tables, seq_ids, positions, out,
                             workspace, scale, sliding_window, plan);
  Status launched = Status::kOk;
  const Status s = dispatch_attention(q.dtype, static_cast<int>(q.size(2)), [&](auto tag,
                                                                               auto dim) {
    launched = launch<decltype(tag), decltype(dim)::value>(p, plan, stream);
  });
  return ok(s) ? launched : s;
}

}  // namespace kernels
}  // namespace nanorun
