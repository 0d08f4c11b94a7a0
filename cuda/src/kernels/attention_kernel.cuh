// Paged attention for mixed decode / chunked-prefill batches, on the tensor cores.
//
// Semantics are those of nanorun/ops/paged_attention.py: token t (sequence seq_ids[t], position
// positions[t]) attends to positions lo..positions[t] of its sequence, lo = 0 or, with a sliding
// window W, max(0, positions[t] - W + 1); position j lives in page block_tables[seq][j / page],
// slot j % page; query head h reads kv head h / group.
//
// Work. The query rows of a kv head are (token, query head) pairs; a CTA works on up to 64 of
// them against one kv head (grouped-query attention packs the group's heads into the rows, so
// every K/V byte loaded serves all of them). A work item is one of:
//   decode item   a token alone in its run (no neighbour of the same sequence at the adjacent
//                 position): rows = its `group` heads; with split-KV its context is cut into
//                 `splits` chunks, one item each, merged afterwards by combine_splits_kernel.
//   prefill tile  up to `tile_tokens` consecutive tokens of one run whose positions fall into
//                 one aligned block of tile_tokens positions: rows = tokens x group, each row
//                 masked causally by its own position.
// Items are found on the device from seq_ids/positions alone, so one launch serves any mix of
// decode tokens and prompt chunks and the host never inspects the batch (graph capture works).
// The item space is tokens x kv_heads x row_blocks x splits; items that are not work (tokens
// inside a prefill tile, splits of a prefill tile) cost a few cached loads. The grid is
// persistent: at most the CTA budget, each CTA striding over the items.
//
// A CTA (4 warps) streams the KV range of its item through shared memory in tiles of 64
// positions (cp.async, 3 stages). Its warps split the rows (16 each) and, when there are fewer
// than 64 rows, the positions of every tile (decode: all four warps share the rows and take a
// quarter of each tile each). Each warp keeps a flash-attention online softmax (m, l, O) in
// registers; S = Q K^T and O += P V are m16n8k16 MMAs with fp32 accumulation; at the end the
// warps that shared rows are merged through shared memory.
//
// Invalid metadata (a sequence id outside block_tables, a negative position, a page id outside
// the cache or a column past block_tables) never causes an out-of-bounds access: the affected
// tokens' outputs are NaN.
#pragma once

#include <cmath>
#include <cstdint>

#include "attention_params.h"
#include "warp_ops.cuh"

namespace nanorun {
namespace attention {

// ---- storage conversion ---------------------------------------------------------------------

template <typename T>
__host__ __device__ inline T to_storage(float v);
template <>
__host__ __device__ inline __half to_storage<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__host__ __device__ inline __nv_bfloat16 to_storage<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- the pieces of one item -------------------------------------------------------------------

// Issues the cp.async of one tile (K and V of positions tile_start .. tile_start + 63) into a
// pipeline stage. Positions outside `range` are zero-filled, so masked scores meet finite V rows.
// Returns true if a position in range has no valid page.
template <typename T, int D>
__device__ inline bool load_tile(const Params& p, int seq, int kv_head, Range range,
                                 int tile_start, T* stage, int tid) {
  using Smem = SmemLayout<D>;
  constexpr int kChunksPerRow = D / 8;  // 16-byte chunks
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int32_t* pages = p.block_tables + seq * p.block_table_stride;
  const int col = tid % kChunksPerRow;
  bool bad = false;
#pragma unroll
  for (int pass = 0; pass < kTileN / kRowsPerPass; ++pass) {
    const int row = tid / kChunksPerRow + pass * kRowsPerPass;
    const int j = tile_start + row;
    int64_t offset = 0;
    bool load = j >= range.lo && j <= range.hi;
    if (load) {
      const int column = j / p.page_size;
      const int page = column < p.max_pages ? pages[column] : -1;
      if (page < 0 || page >= p.num_pages) {
        bad = true;
        load = false;
      } else {
        offset = ((int64_t{page} * p.page_size + j % p.page_size) * p.num_kv_heads + kv_head) *
                     D + col * 8;
      }
    }
    T* dst = stage + row * Smem::kRowStride + col * 8;
    warp::cp_async_16(dst, k_cache + offset, load ? 16 : 0);
    warp::cp_async_16(dst + Smem::kTileElems, v_cache + offset, load ? 16 : 0);
  }
  return bad;
}

// The A fragments of Q for the warp's rows r0 (= 16 w + lane / 4) and r0 + 8, all of D.
template <typename T, int D>
__device__ inline void load_q(const Params& p, const Work& w, int r0, int lane,
                              uint32_t (&qf)[D / 16][4]) {
  const int c = 2 * (lane % 4);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + 8 * half;
    const uint32_t* row = nullptr;
    if (r < w.rows) {
      const T* q = static_cast<const T*>(p.q) + row_token(p, w, r) * p.q_token_stride +
                   row_head(p, w, r) * p.q_head_stride;
      row = reinterpret_cast<const uint32_t*>(q);  // 4-byte aligned: checked on the host
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qf[kk][half] = row ? row[(kk * 16 + c) / 2] : 0u;
      qf[kk][half + 2] = row ? row[(kk * 16 + 8 + c) / 2] : 0u;
    }
  }
}

// Per-warp running softmax state of rows g and g + 8 (g = lane / 4); O as m16n8 fragments.
template <int D>
struct WarpState {
  float o[D / 8][4];
  float m[2];  // running max of the scores (log2 domain); -inf before any position
  float l[2];  // running sum of exp2(score - m), this thread's columns only until finish()
};

// One 16-position step of a warp: S = Q K^T, online softmax, O += P V.
template <typename T, int D>
__device__ inline void attend_sub_block(const T* k_tile, const T* v_tile, int sub_block, int j0,
                                        const Range (&rows)[2], float scale_log2,
                                        const uint32_t (&qf)[D / 16][4], WarpState<D>& st,
                                        int lane) {
  using Smem = SmemLayout<D>;
  const int matrix = lane / 8, matrix_row = lane % 8, c = 2 * (lane % 4);

  // S [16 rows x 16 positions] as two n8 fragments (positions 0-7 and 8-15).
  float s[2][4] = {};
  const T* k_rows =
      k_tile + (sub_block * kSubN + (matrix / 2) * 8 + matrix_row) * Smem::kRowStride +
      (matrix % 2) * 8;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t b[4];
    warp::ldmatrix_x4(b, k_rows + kk * 16);
    warp::mma_16816<T>(s[0], qf[kk], b[0], b[1]);
    warp::mma_16816<T>(s[1], qf[kk], b[2], b[3]);
  }

  // Scale, mask, and the new row maxima (each row's 16 scores sit in the 4 lanes of a quad).
  float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = j0 + nt * 8 + c + (e & 1);
      const Range& r = rows[e / 2];
      s[nt][e] = (j >= r.lo && j <= r.hi) ? s[nt][e] * scale_log2 : -INFINITY;
      row_max[e / 2] = fmaxf(row_max[e / 2], s[nt][e]);
    }
  }
  float base[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_max[i] = fmaxf(row_max[i], warp::shfl_xor(row_max[i], 1));
    row_max[i] = fmaxf(row_max[i], warp::shfl_xor(row_max[i], 2));
    const float m_new = fmaxf(st.m[i], row_max[i]);
    base[i] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet stays at 0
    const float rescale = warp::fast_exp2(st.m[i] - base[i]);
    st.m[i] = m_new;
    st.l[i] *= rescale;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      st.o[dt][2 * i] *= rescale;
      st.o[dt][2 * i + 1] *= rescale;
    }
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = warp::fast_exp2(s[nt][e] - base[e / 2]);
      st.l[e / 2] += s[nt][e];
    }
  }

  // P as the A fragment of P V: the two n8 score fragments are its two k8 halves.
  const uint32_t pa[4] = {warp::pack2<T>(s[0][0], s[0][1]), warp::pack2<T>(s[0][2], s[0][3]),
                          warp::pack2<T>(s[1][0], s[1][1]), warp::pack2<T>(s[1][2], s[1][3])};
  const T* v_rows =
      v_tile + (sub_block * kSubN + (matrix % 2) * 8 + matrix_row) * Smem::kRowStride +
      (matrix / 2) * 8;
#pragma unroll
  for (int dt = 0; dt < D / 16; ++dt) {
    uint32_t b[4];
    warp::ldmatrix_x4_trans(b, v_rows + dt * 16);
    warp::mma_16816<T>(st.o[2 * dt], pa, b[0], b[1]);
    warp::mma_16816<T>(st.o[2 * dt + 1], pa, b[2], b[3]);
  }
}

// Writes one chunk of 4 values of CTA row r at dims d..d+3: the final output, or a split's
// partial result and its log-sum-exp.
template <typename T, int D>
__device__ inline void store_row_chunk(const Params& p, const Work& w, int r, int d,
                                       const float (&acc)[4], float max, float sum, bool bad) {
  const int t = row_token(p, w, r);
  const int h = row_head(p, w, r);
  if (w.split < 0) {
    T* out = static_cast<T*>(p.out) + t * p.out_token_stride + h * p.out_head_stride + d;
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = to_storage<T>(bad ? NAN : acc[i] / sum);
    return;
  }
  const int64_t slot = (int64_t{w.split} * p.num_tokens + t) * p.num_heads + h;
  float* partial = p.partial_out + slot * D + d;
#pragma unroll
  for (int i = 0; i < 4; ++i) partial[i] = sum > 0.f ? acc[i] / sum : 0.f;
  if (d == 0) p.partial_lse[slot] = bad ? NAN : (sum > 0.f ? max + log2f(sum) : -INFINITY);
}

// Merges the (O, m, l) of the warps that shared rows, then stores every row of the item.
template <typename T, int D>
__device__ inline void merge_and_store(const Params& p, const Work& w, WarpState<D>& st,
                                       int pos_warps, bool bad, float* smem, int tid) {
  using Smem = SmemLayout<D>;
  constexpr int kStride = Smem::kMergeRowStride;
  float* merge_o = smem;                                        // [warp][16][kStride]
  float* merge_m = merge_o + kWarps * kRowsPerWarp * kStride;   // [warp][16]
  float* merge_l = merge_m + kWarps * kRowsPerWarp;             // [warp][16]
  const int lane = tid % 32, warp_id = tid / 32;
  const int g = lane / 4, c = 2 * (lane % 4);

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    st.l[i] += warp::shfl_xor(st.l[i], 1);
    st.l[i] += warp::shfl_xor(st.l[i], 2);
  }
  const int slot0 = warp_id * kRowsPerWarp + g;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      merge_o[(slot0 + 8 * (e / 2)) * kStride + dt * 8 + c + (e & 1)] = st.o[dt][e];
    }
  }
  if (lane % 4 == 0) {
    merge_m[slot0] = st.m[0];
    merge_m[slot0 + 8] = st.m[1];
    merge_l[slot0] = st.l[0];
    merge_l[slot0 + 8] = st.l[1];
  }
  warp::sync_block();

  for (int task = tid; task < w.rows * (D / 4); task += kThreads) {
    const int r = task / (D / 4);
    const int d = (task % (D / 4)) * 4;
    const int first_slot = (r / kRowsPerWarp) * pos_warps * kRowsPerWarp + r % kRowsPerWarp;
    float max = -INFINITY;
    for (int i = 0; i < pos_warps; ++i) max = fmaxf(max, merge_m[first_slot + i * kRowsPerWarp]);
    float sum = 0.f;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < pos_warps; ++i) {
      const int slot = first_slot + i * kRowsPerWarp;
      const float weight = max == -INFINITY ? 0.f : warp::fast_exp2(merge_m[slot] - max);
      sum += weight * merge_l[slot];
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[k] += weight * merge_o[slot * kStride + d + k];
    }
    store_row_chunk<T, D>(p, w, r, d, acc, max, sum, bad);
  }
}

// Invalid metadata: every row of the item is NaN (never an out-of-bounds read).
template <typename T, int D>
__device__ inline void store_nan_rows(const Params& p, const Work& w, int tid) {
  for (int task = tid; task < w.rows * D; task += kThreads) {
    const int r = task / D;
    T* out = static_cast<T*>(p.out) + row_token(p, w, r) * p.out_token_stride +
             row_head(p, w, r) * p.out_head_stride;
    out[task % D] = to_storage<T>(NAN);
  }
}

template <typename T, int D>
__device__ inline void run_item(const Params& p, const Work& w, unsigned char* smem_raw) {
  using Smem = SmemLayout<D>;
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = warp::thread_index(), lane = tid % 32, warp_id = tid / 32;
  const int seq = seq_of(p, w.first_token);

  // Warps split the rows 16 at a time; warps that share rows split each tile's sub-blocks.
  const int row_warps = w.rows <= 16 ? 1 : (w.rows <= 32 ? 2 : 4);
  const int pos_warps = kWarps / row_warps;
  const int warp_row0 = (warp_id / pos_warps) * kRowsPerWarp;
  const int first_sub_block = warp_id % pos_warps;

  const Range item_range = rows_range(p, w, 0, w.rows - 1);
  const int num_tiles =
      item_range.hi >= item_range.lo ? ceil_div(item_range.hi - item_range.lo + 1, kTileN) : 0;

  bool bad = false;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) {
      bad |= load_tile<T, D>(p, seq, w.kv_head, item_range, item_range.lo + s * kTileN,
                             smem + s * Smem::kStageElems, tid);
    }
    warp::cp_async_commit();
  }

  uint32_t qf[D / 16][4];
  load_q<T, D>(p, w, warp_row0 + lane / 4, lane, qf);
  const Range rows[2] = {row_range(p, w, warp_row0 + lane / 4),
                         row_range(p, w, warp_row0 + lane / 4 + 8)};
  const Range warp_range = rows_range(p, w, warp_row0, warp_row0 + kRowsPerWarp - 1);
  WarpState<D> st;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) st.o[dt][e] = 0.f;
  }
  st.m[0] = st.m[1] = -INFINITY;
  st.l[0] = st.l[1] = 0.f;

  for (int k = 0; k < num_tiles; ++k) {
    warp::cp_async_wait<kStages - 2>();  // this thread's copies of tile k have landed
    warp::sync_block();                  // everyone's have; stage (k - 1) % kStages is free
    const int next = k + kStages - 1;
    if (next < num_tiles) {
      bad |= load_tile<T, D>(p, seq, w.kv_head, item_range, item_range.lo + next * kTileN,
                             smem + (next % kStages) * Smem::kStageElems, tid);
    }
    warp::cp_async_commit();

    const T* k_tile = smem + (k % kStages) * Smem::kStageElems;
    const int tile_start = item_range.lo + k * kTileN;
    for (int sb = first_sub_block; sb < kSubBlocks; sb += pos_warps) {
      const int j0 = tile_start + sb * kSubN;
      const bool overlaps = warp_range.lo <= warp_range.hi && j0 <= warp_range.hi &&
                            j0 + kSubN - 1 >= warp_range.lo;
      if (!overlaps) continue;  // warp-uniform
      attend_sub_block<T, D>(k_tile, k_tile + Smem::kTileElems, sb, j0, rows, p.scale_log2, qf,
                             st, lane);
    }
  }
  warp::cp_async_wait<0>();
  bad = warp::sync_block_any(bad);  // also: all reads of the stages are done
  merge_and_store<T, D>(p, w, st, pos_warps, bad, reinterpret_cast<float*>(smem_raw), tid);
  warp::sync_block();  // the next item may overwrite the merge area
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2)
    paged_attention_kernel(const Params p, int64_t num_items) {
  unsigned char* smem = warp::dynamic_smem();
  for (int64_t item = warp::block_index(); item < num_items; item += warp::grid_size()) {
    Work w;
    if (!decode_item(p, item, w)) continue;  // the same answer on every thread
    if (!w.valid) {
      store_nan_rows<T, D>(p, w, warp::thread_index());
      continue;
    }
    run_item<T, D>(p, w, smem);
  }
}

// out = the splits' partial results weighted by their share of the softmax mass: one warp per
// (decode token, query head), persistent over the pairs.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) combine_splits_kernel(const Params p) {
  const int tid = warp::thread_index(), lane = tid % 32;
  const int64_t pairs = int64_t{p.num_tokens} * p.num_heads;
  const int64_t stride = int64_t{warp::grid_size()} * kWarps;
  for (int64_t pair = int64_t{warp::block_index()} * kWarps + tid / 32; pair < pairs;
       pair += stride) {
    const int t = static_cast<int>(pair / p.num_heads);
    const int h = static_cast<int>(pair % p.num_heads);
    if (!is_single(p, t) || !token_valid(p, t)) continue;  // written by the attention kernel

    const int64_t split_stride = int64_t{p.num_tokens} * p.num_heads;
    const float lse = lane < p.splits ? p.partial_lse[lane * split_stride + pair] : -INFINITY;
    const bool is_nan = lse != lse;
    float bad = is_nan ? 1.f : 0.f;
    float max = is_nan ? -INFINITY : lse;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      bad = fmaxf(bad, warp::shfl_xor(bad, offset));
      max = fmaxf(max, warp::shfl_xor(max, offset));
    }
    float weight = (max == -INFINITY || bad > 0.f) ? 0.f : warp::fast_exp2(lse - max);
    float total = weight;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) total += warp::shfl_xor(total, offset);

    T* out = static_cast<T*>(p.out) + t * p.out_token_stride + h * p.out_head_stride;
#pragma unroll
    for (int d0 = 0; d0 < D; d0 += 32) {
      float acc = 0.f;
      for (int s = 0; s < p.splits; ++s) {
        acc += warp::shfl(weight, s) * p.partial_out[(s * split_stride + pair) * D + d0 + lane];
      }
      out[d0 + lane] = to_storage<T>(bad > 0.f ? NAN : acc / total);
    }
  }
}

}  // namespace attention
}  // namespace nanorun
