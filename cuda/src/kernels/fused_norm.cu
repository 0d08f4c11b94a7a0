// RMSNorm, plain and fused with the residual add that precedes it in every transformer block.
#include "common.cuh"

namespace nanorun {
namespace kernels {
namespace {

// One block per row. Pass 1 sums squares (and, when fused, forms and stores the new residual);
// pass 2 rescales. Each thread touches the same indices in both passes, so in-place use
// (out == x) is safe: an element is read before the same thread overwrites it.
//
// Fused: residual = round(x + residual) and the norm reads the *rounded* residual, so the
// result is bit-for-bit what an unfused add followed by this file's rms_norm produces.
template <typename T, bool kFused>
__global__ void rms_norm_kernel(T* out, int64_t out_row_stride, const T* x, int64_t x_row_stride,
                                T* residual, int64_t residual_row_stride, const T* weight,
                                int hidden, float eps) {
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * x_row_stride;
  T* out_row = out + row * out_row_stride;
  T* res_row = kFused ? residual + row * residual_row_stride : nullptr;

  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = detail::to_float(x_row[i]);
    if (kFused) {
      const T r = detail::from_float<T>(v + detail::to_float(res_row[i]));
      res_row[i] = r;
      v = detail::to_float(r);
    }
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(detail::block_sum(sum_sq) / hidden + eps);

  // The norm's input: the new residual (fused) or x itself.
  const T* in_row = kFused ? res_row : x_row;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = detail::to_float(in_row[i]) * inv_rms * detail::to_float(weight[i]);
    out_row[i] = detail::from_float<T>(v);
  }
}

template <bool kFused>
Status launch(const TensorView& out, const TensorView& x, const TensorView* residual,
              const TensorView& weight, float eps, cudaStream_t stream) {
  const int64_t rows = x.size(0);
  const int64_t hidden = x.size(1);
  if (rows == 0 || hidden == 0) return Status::kOk;
  if (rows > INT32_MAX || hidden > INT32_MAX) return Status::kInvalidShape;
  const int threads = detail::threads_for(hidden, 1024);

  const Status s = detail::dispatch_floating(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* res_ptr = kFused ? residual->ptr<T>() : nullptr;
    const int64_t res_stride = kFused ? residual->stride(0) : 0;
    rms_norm_kernel<T, kFused><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        out.ptr<T>(), out.stride(0), x.ptr<const T>(), x.stride(0), res_ptr, res_stride,
        weight.ptr<const T>(), static_cast<int>(hidden), eps);
  });
  return ok(s) ? detail::last_launch_status() : s;
}

}  // namespace

Status rms_norm(const TensorView& out, const TensorView& x, const TensorView& weight, float eps,
                cudaStream_t stream) {
  return launch<false>(out, x, nullptr, weight, eps, stream);
}

Status fused_add_rms_norm(const TensorView& x, const TensorView& residual,
                          const TensorView& weight, float eps, cudaStream_t stream) {
  return launch<true>(x, x, &residual, weight, eps, stream);
}

}  // namespace kernels
}  // namespace nanorun
