// The work decomposition of the paged attention kernel, shared by the host (planning, filling
// Params) and the device (decoding work items). No device-only code: host C++ includes it too.
// The algorithm is described in attention_kernel.cuh.
#pragma once

#include <cstdint>

#include "nanorun/kernels.h"

namespace nanorun {
namespace attention {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = 16;                     // the MMA's M
constexpr int kRowsPerCta = kRowsPerWarp * kWarps;   // 64
constexpr int kTileN = 64;                           // KV positions per pipeline stage
constexpr int kSubN = 16;                            // KV positions per warp step (MMA K of P V)
constexpr int kSubBlocks = kTileN / kSubN;
constexpr int kStages = 3;
constexpr int kMaxSplits = 16;
// Positions are int64 in memory, int in the kernel; a larger one is invalid metadata.
constexpr int64_t kMaxPosition = int64_t{1} << 30;

__host__ __device__ constexpr int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int imax(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Shared memory of one CTA: kStages x (K tile, V tile), each [kTileN][D + 8] elements (the
// 16-byte pad puts the 8 rows an ldmatrix reads on distinct banks); after the main loop the same
// bytes hold the per-warp (O, m, l) for the merge.
template <int D>
struct SmemLayout {
  static constexpr int kRowStride = D + 8;                       // elements
  static constexpr int kTileElems = kTileN * kRowStride;
  static constexpr int kStageElems = 2 * kTileElems;             // K then V
  static constexpr int kPipelineBytes = kStages * kStageElems * 2;
  static constexpr int kMergeRowStride = D + 4;                  // floats
  static constexpr int kMergeFloats = kWarps * kRowsPerWarp * (kMergeRowStride + 2);
  static constexpr int kBytes =
      kPipelineBytes > kMergeFloats * 4 ? kPipelineBytes : kMergeFloats * 4;
};

struct Params {
  // q, out [T, Hq, D]: any token and head strides, unit stride in D.
  const void* q;
  int64_t q_token_stride, q_head_stride;
  void* out;
  int64_t out_token_stride, out_head_stride;
  // k_cache, v_cache [num_pages, page_size, Hkv, D], contiguous.
  const void* k_cache;
  const void* v_cache;
  int64_t num_pages;
  int page_size, num_kv_heads;
  // block_tables [num_seqs, max_pages] int32; seq_ids [T] int32; positions [T] int64.
  const int32_t* block_tables;
  int64_t block_table_stride;
  int max_pages, num_seqs;
  const int32_t* seq_ids;
  int64_t seq_id_stride;
  const int64_t* positions;
  int64_t position_stride;
  int num_tokens, num_heads, group;  // group = Hq / Hkv
  int window;                        // sliding window W; 0 = none
  float scale_log2;                  // softmax scale * log2(e): scores live in the log2 domain
  int tile_tokens;                   // tokens per prefill tile: max(1, 64 / group)
  int row_blocks;                    // CTAs per (tile, kv head): ceil(tile_tokens * group / 64)
  int splits;                        // KV splits per decode token
  // Split-KV partial results when splits > 1: [splits, T, Hq, D] (normalised) and
  // [splits, T, Hq] (log2-sum-exp; -inf for an empty split, NaN for invalid metadata).
  float* partial_out;
  float* partial_lse;
};

// ---- the batch's structure, read from the device ----------------------------------------------

__host__ __device__ inline int seq_of(const Params& p, int t) {
  return p.seq_ids[t * p.seq_id_stride];
}
__host__ __device__ inline int64_t pos_of(const Params& p, int t) {
  return p.positions[t * p.position_stride];
}

// Token t directly follows token t - 1 of the same sequence (the two are one run).
__host__ __device__ inline bool continues_run(const Params& p, int t) {
  return t > 0 && seq_of(p, t) == seq_of(p, t - 1) && pos_of(p, t) == pos_of(p, t - 1) + 1;
}

// A decode token: alone in its run.
__host__ __device__ inline bool is_single(const Params& p, int t) {
  return !continues_run(p, t) && !(t + 1 < p.num_tokens && continues_run(p, t + 1));
}

__host__ __device__ inline bool token_valid(const Params& p, int t) {
  const int seq = seq_of(p, t);
  const int64_t pos = pos_of(p, t);
  return seq >= 0 && seq < p.num_seqs && pos >= 0 && pos < kMaxPosition;
}

// Number of tokens of the prefill tile starting at token t, or 0 if t starts none: t is in a
// run of 2+ tokens and is its first token or the first one of an aligned position block.
__host__ __device__ inline int prefill_tile_tokens(const Params& p, int t) {
  if (is_single(p, t)) return 0;
  if (continues_run(p, t) && pos_of(p, t) % p.tile_tokens != 0) return 0;
  int n = 1;
  while (n < p.tile_tokens && t + n < p.num_tokens && continues_run(p, t + n) &&
         pos_of(p, t + n) % p.tile_tokens != 0) {
    ++n;
  }
  return n;
}

// Positions lo..hi (inclusive) of the KV cache; empty when hi < lo.
struct Range {
  int lo, hi;
};

// One work item: `rows` query rows of the tile starting at `first_token`, against kv_head.
struct Work {
  int first_token;
  int row0;     // the CTA's first row among the tile's tokens x group rows
  int rows;     // <= kRowsPerCta
  int kv_head;
  int split;    // -1: write `out`; else write the partial result of this split
  Range kv;     // positions the item reads (the split's share for a decode item)
  bool valid;   // metadata in range
};

__host__ __device__ inline int row_token(const Params& p, const Work& w, int r) {
  return w.first_token + (w.row0 + r) / p.group;
}

__host__ __device__ inline int row_head(const Params& p, const Work& w, int r) {
  return w.kv_head * p.group + (w.row0 + r) % p.group;
}

// The causal (and sliding-window) range of one token, clipped to the item's range.
__host__ __device__ inline Range token_range(const Params& p, const Work& w, int t) {
  const int pos = static_cast<int>(pos_of(p, t));
  const int lo = p.window > 0 ? imax(0, pos - p.window + 1) : 0;
  return Range{imax(lo, w.kv.lo), imin(pos, w.kv.hi)};
}

// The range of CTA row r; padding rows (r >= rows) read nothing.
__host__ __device__ inline Range row_range(const Params& p, const Work& w, int r) {
  if (r >= w.rows) return Range{1, 0};
  return token_range(p, w, row_token(p, w, r));
}

// Rows r0..r1 (inclusive) cover tokens in increasing order, so their union of ranges runs from
// the first row's lo to the last real row's hi.
__host__ __device__ inline Range rows_range(const Params& p, const Work& w, int r0, int r1) {
  r1 = imin(r1, w.rows - 1);
  if (r0 > r1) return Range{1, 0};
  return Range{row_range(p, w, r0).lo, row_range(p, w, r1).hi};
}

// Decodes item index -> work; false when the index is not a unit of work.
__host__ __device__ inline bool decode_item(const Params& p, int64_t item, Work& w) {
  const int split = static_cast<int>(item % p.splits);
  item /= p.splits;
  const int row_block = static_cast<int>(item % p.row_blocks);
  item /= p.row_blocks;
  w.kv_head = static_cast<int>(item % p.num_kv_heads);
  w.first_token = static_cast<int>(item / p.num_kv_heads);

  int tokens = 1;
  w.split = -1;
  if (is_single(p, w.first_token)) {
    if (p.splits > 1) w.split = split;
  } else {
    if (split != 0) return false;
    tokens = prefill_tile_tokens(p, w.first_token);
    if (tokens == 0) return false;
  }
  w.row0 = row_block * kRowsPerCta;
  w.rows = imin(tokens * p.group - w.row0, kRowsPerCta);
  if (w.rows <= 0) return false;

  const int last_token = w.first_token + tokens - 1;
  w.valid = token_valid(p, w.first_token) && token_valid(p, last_token);
  if (!w.valid) return w.split <= 0;  // one item per token reports it (NaN rows)

  w.kv = Range{0, static_cast<int>(kMaxPosition)};
  const int first = row_token(p, w, 0);
  const int last = row_token(p, w, w.rows - 1);
  w.kv = Range{token_range(p, w, first).lo, token_range(p, w, last).hi};
  if (w.split >= 0) {
    // Chunks are whole tiles; trailing splits of a short context are empty (and say so).
    const int64_t n = int64_t{w.kv.hi} - w.kv.lo + 1;
    const int64_t chunk = (n + p.splits - 1) / p.splits;
    const int64_t tiled = (chunk + kTileN - 1) / kTileN * kTileN;
    const int64_t lo = w.kv.lo + w.split * tiled;
    const int64_t hi = lo + tiled - 1 < w.kv.hi ? lo + tiled - 1 : w.kv.hi;
    w.kv = lo > w.kv.hi ? Range{1, 0} : Range{static_cast<int>(lo), static_cast<int>(hi)};
  }
  return true;
}

// Params of one call. The split-KV workspace pointers are set when plan.splits > 1.
Params make_params(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                   const TensorView& block_tables, const TensorView& seq_ids,
                   const TensorView& positions, const TensorView& out,
                   const TensorView& workspace, float scale, int sliding_window,
                   const kernels::AttentionPlan& plan);

}  // namespace attention
}  // namespace nanorun
