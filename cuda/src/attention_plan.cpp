// Host side of the paged attention kernel: the work plan and the kernel's parameters. Plain C++
// (no CUDA calls), so the CPU emulator test (cuda/emulator/) links it too.
#include <algorithm>

#include "kernels/attention_params.h"

namespace nanorun {

namespace {
int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

namespace kernels {

using attention::kMaxSplits;
using attention::kRowsPerCta;
using attention::kTileN;
using attention::kWarps;

AttentionPlan plan_paged_attention(int64_t num_tokens, int num_heads, int num_kv_heads,
                                   int head_dim, int64_t max_context, int max_ctas,
                                   int64_t workspace_floats) {
  AttentionPlan plan;
  const int group = num_heads / num_kv_heads;
  plan.tile_tokens = group >= kRowsPerCta ? 1 : kRowsPerCta / group;
  plan.row_blocks =
      static_cast<int>(ceil_div64(int64_t{plan.tile_tokens} * group, kRowsPerCta));
  const int64_t base_items = num_tokens * num_kv_heads * plan.row_blocks;
  const int64_t floats_per_split = num_tokens * num_heads * (head_dim + 1);

  int64_t splits = 1;
  if (base_items < max_ctas) {
    splits = ceil_div64(max_ctas, base_items);
    splits = std::min<int64_t>(splits, kMaxSplits);
    splits = std::min<int64_t>(splits, ceil_div64(max_context, kTileN));
    splits = std::min<int64_t>(splits, workspace_floats / floats_per_split);
    splits = std::max<int64_t>(splits, 1);
  }
  plan.splits = static_cast<int>(splits);
  plan.items = base_items * splits;
  plan.grid = static_cast<int>(std::min<int64_t>(plan.items, max_ctas));
  if (plan.splits > 1) {
    plan.combine_grid = static_cast<int>(
        std::min<int64_t>(ceil_div64(num_tokens * num_heads, kWarps), max_ctas));
    plan.workspace_floats = splits * floats_per_split;
  }
  return plan;
}

}  // namespace kernels

namespace attention {

Params make_params(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                   const TensorView& block_tables, const TensorView& seq_ids,
                   const TensorView& positions, const TensorView& out,
                   const TensorView& workspace, float scale, int sliding_window,
                   const kernels::AttentionPlan& plan) {
  constexpr float kLog2e = 1.4426950408889634f;
  Params p{};
  p.q = q.data;
  p.q_token_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.out = out.data;
  p.out_token_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.k_cache = k_cache.data;
  p.v_cache = v_cache.data;
  p.num_pages = k_cache.size(0);
  p.page_size = static_cast<int>(k_cache.size(1));
  p.num_kv_heads = static_cast<int>(k_cache.size(2));
  p.block_tables = block_tables.ptr<const int32_t>();
  p.block_table_stride = block_tables.stride(0);
  p.max_pages = static_cast<int>(block_tables.size(1));
  p.num_seqs = static_cast<int>(block_tables.size(0));
  p.seq_ids = seq_ids.ptr<const int32_t>();
  p.seq_id_stride = seq_ids.stride(0);
  p.positions = positions.ptr<const int64_t>();
  p.position_stride = positions.stride(0);
  p.num_tokens = static_cast<int>(q.size(0));
  p.num_heads = static_cast<int>(q.size(1));
  p.group = p.num_heads / p.num_kv_heads;
  p.window = sliding_window;
  p.scale_log2 = scale * kLog2e;
  p.tile_tokens = plan.tile_tokens;
  p.row_blocks = plan.row_blocks;
  p.splits = plan.splits;
  if (plan.splits > 1) {
    p.partial_out = workspace.ptr<float>();  // [splits, T, Hq, D], then [splits, T, Hq]
    p.partial_lse =
        p.partial_out + int64_t{plan.splits} * p.num_tokens * p.num_heads * q.size(2);
  }
  return p;
}

}  // namespace attention
}  // namespace nanorun
