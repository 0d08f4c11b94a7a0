// kv_append: scatter this step's keys and values into the paged KV caches.
#include "common.cuh"

namespace nanorun {
namespace kernels {
namespace {

// Strides (in elements) of a [T, H, D] input and a [P, S, H, D] cache; D has unit stride.
// Passing them lets key/value be views into a fused QKV projection without a copy.
struct TokenStrides {
  int64_t token, head;
};
struct CacheStrides {
  int64_t page, offset, head;
};

// One block per token (at most max_ctas blocks, each striding over the tokens); the block's
// threads copy that token's H*D elements (coalesced along D). The copy is dtype-agnostic, so E
// is just an integer of the element's width.
template <typename E>
__global__ void kv_append_kernel(const E* key, TokenStrides key_s, const E* value,
                                 TokenStrides value_s, E* k_cache, CacheStrides k_s,
                                 E* v_cache, CacheStrides v_s, const int64_t* slot_mapping,
                                 int64_t num_tokens, int64_t page_size, int64_t num_slots,
                                 int num_heads, int head_dim) {
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const int64_t slot = slot_mapping[t];
    // Negative = padding token. Past the end can only be a caller bug; skipping it keeps the
    // kernel from corrupting memory it does not own (a host-side check would need a sync).
    if (slot < 0 || slot >= num_slots) continue;

    const int64_t page = slot / page_size;
    const int64_t offset = slot % page_size;
    const E* k_src = key + t * key_s.token;
    const E* v_src = value + t * value_s.token;
    E* k_dst = k_cache + page * k_s.page + offset * k_s.offset;
    E* v_dst = v_cache + page * v_s.page + offset * v_s.offset;

    for (int i = threadIdx.x; i < num_heads * head_dim; i += blockDim.x) {
      const int h = i / head_dim;
      const int d = i % head_dim;
      k_dst[h * k_s.head + d] = k_src[h * key_s.head + d];
      v_dst[h * v_s.head + d] = v_src[h * value_s.head + d];
    }
  }
}

template <typename E>
Status launch(const TensorView& key, const TensorView& value, const TensorView& k_cache,
              const TensorView& v_cache, const TensorView& slot_mapping, int64_t grid,
              cudaStream_t stream) {
  const int64_t num_tokens = key.size(0);
  const int num_heads = static_cast<int>(key.size(1));
  const int head_dim = static_cast<int>(key.size(2));
  const int threads = detail::threads_for(int64_t{num_heads} * head_dim, 512);

  kv_append_kernel<E><<<static_cast<unsigned>(grid), threads, 0, stream>>>(
      key.ptr<const E>(), TokenStrides{key.stride(0), key.stride(1)},
      value.ptr<const E>(), TokenStrides{value.stride(0), value.stride(1)},
      k_cache.ptr<E>(), CacheStrides{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)},
      v_cache.ptr<E>(), CacheStrides{v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)},
      slot_mapping.ptr<const int64_t>(), num_tokens, k_cache.size(1),
      k_cache.size(0) * k_cache.size(1), num_heads, head_dim);
  return detail::last_launch_status();
}

}  // namespace

Status kv_append(const TensorView& key, const TensorView& value, const TensorView& k_cache,
                 const TensorView& v_cache, const TensorView& slot_mapping, int max_ctas,
                 cudaStream_t stream) {
  const int64_t num_tokens = key.size(0);
  if (num_tokens == 0 || key.size(1) * key.size(2) == 0) return Status::kOk;
  const int64_t grid = max_ctas > 0 && max_ctas < num_tokens ? max_ctas : num_tokens;
  if (grid > INT32_MAX) return Status::kInvalidShape;

  switch (dtype_size(key.dtype)) {
    case 2: return launch<uint16_t>(key, value, k_cache, v_cache, slot_mapping, grid, stream);
    case 4: return launch<uint32_t>(key, value, k_cache, v_cache, slot_mapping, grid, stream);
    case 8: return launch<uint64_t>(key, value, k_cache, v_cache, slot_mapping, grid, stream);
    default: return Status::kUnsupportedDType;
  }
}

}  // namespace kernels
}  // namespace nanorun
