// Gated activations of the MLP.
#include "common.cuh"

namespace nanorun {
namespace kernels {
namespace {

constexpr int kSiluThreads = 256;

// grid = (rows, column blocks): one thread per output element, so a single decode token still
// spreads over many blocks.
template <typename T>
__global__ void silu_and_mul_kernel(T* out, int64_t out_row_stride, const T* x,
                                    int64_t x_row_stride, int64_t inter) {
  const int64_t row = blockIdx.x;
  const int64_t col = int64_t{blockIdx.y} * blockDim.x + threadIdx.x;
  if (col >= inter) return;
  const float gate = detail::to_float(x[row * x_row_stride + col]);
  const float up = detail::to_float(x[row * x_row_stride + inter + col]);
  // expf, not __expf: this kernel is memory-bound, so the accurate version costs nothing.
  const float silu = gate / (1.f + expf(-gate));
  out[row * out_row_stride + col] = detail::from_float<T>(silu * up);
}

}  // namespace

Status silu_and_mul(const TensorView& out, const TensorView& x, cudaStream_t stream) {
  const int64_t rows = out.size(0);
  const int64_t inter = out.size(1);
  if (rows == 0 || inter == 0) return Status::kOk;
  const int64_t col_blocks = detail::ceil_div(inter, kSiluThreads);
  if (rows > INT32_MAX || col_blocks > detail::kMaxGridY) return Status::kInvalidShape;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(col_blocks));

  const Status s = detail::dispatch_floating(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    silu_and_mul_kernel<T><<<grid, kSiluThreads, 0, stream>>>(out.ptr<T>(), out.stride(0),
                                                             x.ptr<const T>(), x.stride(0), inter);
  });
  return ok(s) ? detail::last_launch_status() : s;
}

}  // namespace kernels
}  // namespace nanorun
