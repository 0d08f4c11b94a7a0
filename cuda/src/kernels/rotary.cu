// Rotary position embedding, in place on the query and key heads of the fused QKV output.
//
// The angles come from the caller: cos/sin tables indexed by position (the model's own tables,
// so any rope scaling, Llama 3's included, is already in them), or inv_freq with the angle
// position * inv_freq[i] computed here in fp32, exactly as the tables are built (one fp32
// product, then accurate sincosf rather than the fast intrinsic).
#include "common.cuh"

namespace nanorun {
namespace kernels {
namespace {

constexpr int kRotaryThreads = 256;
constexpr int64_t kMaxGrid = 65535;

struct RotaryArgs {
  int64_t num_tokens;
  int64_t token_stride, head_stride;  // of qk, in elements
  int heads, half;                    // half = Dh / 2
  const int64_t* positions;
  int64_t position_stride;
  // Table mode: cos/sin [table_rows, half] with row stride table_stride. inv_freq mode: [half].
  const float* cos;
  const float* sin;
  int64_t table_stride, table_rows;
  const float* inv_freq;
};

// One block per token (striding when there are more tokens than blocks); the block's threads
// walk the (head, i) pairs, so the token's cos/sin row is read once per head from L1.
template <typename T, bool kFromTable>
__global__ void rotary_kernel(T* qk, RotaryArgs a) {
  for (int64_t t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    const int64_t pos = a.positions[t * a.position_stride];
    const bool valid = pos >= 0 && (!kFromTable || pos < a.table_rows);
    T* row = qk + t * a.token_stride;
    for (int idx = threadIdx.x; idx < a.heads * a.half; idx += blockDim.x) {
      const int h = idx / a.half;
      const int i = idx % a.half;
      float c = NAN, s = NAN;  // an out-of-range position poisons its token
      if (valid && kFromTable) {
        c = a.cos[pos * a.table_stride + i];
        s = a.sin[pos * a.table_stride + i];
      } else if (valid) {
        sincosf(static_cast<float>(pos) * a.inv_freq[i], &s, &c);
      }
      T* x = row + h * a.head_stride;
      const float x1 = detail::to_float(x[i]);
      const float x2 = detail::to_float(x[i + a.half]);
      x[i] = detail::from_float<T>(x1 * c - x2 * s);
      x[i + a.half] = detail::from_float<T>(x2 * c + x1 * s);
    }
  }
}

template <bool kFromTable>
Status launch(const TensorView& qk, RotaryArgs a, cudaStream_t stream) {
  if (a.num_tokens == 0 || a.heads == 0 || a.half == 0) return Status::kOk;
  if (int64_t{a.heads} * a.half > INT32_MAX) return Status::kInvalidShape;
  const unsigned grid = static_cast<unsigned>(a.num_tokens < kMaxGrid ? a.num_tokens : kMaxGrid);
  const int threads = detail::threads_for(int64_t{a.heads} * a.half, kRotaryThreads);
  const Status s = detail::dispatch_floating(qk.dtype, [&](auto tag) {
    using T = decltype(tag);
    rotary_kernel<T, kFromTable><<<grid, threads, 0, stream>>>(qk.ptr<T>(), a);
  });
  return ok(s) ? detail::last_launch_status() : s;
}

RotaryArgs args_of(const TensorView& qk, const TensorView& positions) {
  RotaryArgs a{};
  a.num_tokens = qk.size(0);
  a.token_stride = qk.stride(0);
  a.head_stride = qk.stride(1);
  a.heads = static_cast<int>(qk.size(1));
  a.half = static_cast<int>(qk.size(2) / 2);
  a.positions = positions.ptr<const int64_t>();
  a.position_stride = positions.stride(0);
  return a;
}

}  // namespace

Status rotary_embedding(const TensorView& qk, const TensorView& positions, const TensorView& cos,
                        const TensorView& sin, cudaStream_t stream) {
  RotaryArgs a = args_of(qk, positions);
  a.cos = cos.ptr<const float>();
  a.sin = sin.ptr<const float>();
  a.table_stride = cos.stride(0);
  a.table_rows = cos.size(0);  // sin has cos's strides: checked by the caller
  return launch<true>(qk, a, stream);
}

Status rotary_embedding_inv_freq(const TensorView& qk, const TensorView& positions,
                                 const TensorView& inv_freq, cudaStream_t stream) {
  RotaryArgs a = args_of(qk, positions);
  a.inv_freq = inv_freq.ptr<const float>();
  return launch<false>(qk, a, stream);
}

}  // namespace kernels
}  // namespace nanorun
