// Runs the paged attention kernels (cuda/src/kernels/attention_kernel.cuh) on the CPU through the
// warp emulator, on inputs written by tests/test_cuda_emulated.py.
//
//   attention_emulator DIR
//
// DIR/meta.txt holds `name value` lines (see read_meta); DIR/{q,k_cache,v_cache,block_tables,
// seq_ids,positions,out}.bin hold the tensors' storage (out: its initial, poisoned contents).
// Writes DIR/out.bin back and DIR/plan.txt (`splits grid items`). Built and run by the test only.
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "attention_kernel.cuh"

namespace {

using nanorun::DType;
using nanorun::TensorView;
using namespace nanorun::attention;

std::map<std::string, double> read_meta(const std::string& path) {
  std::ifstream in(path);
  if (!in) nanorun::emulator::fail("cannot read meta.txt");
  std::map<std::string, double> meta;
  std::string name;
  double value;
  while (in >> name >> value) meta[name] = value;
  return meta;
}

// A file's bytes in 16-byte-aligned memory (cp.async sources must be aligned).
struct Buffer {
  std::vector<uint64_t> words;
  size_t bytes = 0;
  void* data() { return words.data(); }
};

Buffer read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) nanorun::emulator::fail(("cannot read " + path).c_str());
  Buffer b;
  b.bytes = static_cast<size_t>(in.tellg());
  b.words.resize(b.bytes / 8 + 2);
  in.seekg(0);
  in.read(static_cast<char*>(b.data()), static_cast<std::streamsize>(b.bytes));
  return b;
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
}

TensorView view(void* data, DType dtype, std::vector<int64_t> shape,
                std::vector<int64_t> strides) {
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.ndim = static_cast<int>(shape.size());
  t.device = 0;
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = shape[i];
    t.strides[i] = strides[i];
  }
  return t;
}

std::vector<int64_t> contiguous(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size(), 1);
  for (int i = static_cast<int>(shape.size()) - 2; i >= 0; --i) {
    strides[i] = strides[i + 1] * shape[i + 1];
  }
  return strides;
}

template <typename T, int D>
void run(const Params& p, const nanorun::kernels::AttentionPlan& plan) {
  for (int b = 0; b < plan.grid; ++b) {
    nanorun::emulator::run_cta(b, plan.grid, kThreads, SmemLayout<D>::kBytes,
                               [&] { paged_attention_kernel<T, D>(p, plan.items); });
  }
  for (int b = 0; b < plan.combine_grid; ++b) {
    nanorun::emulator::run_cta(b, plan.combine_grid, kThreads, 0,
                               [&] { combine_splits_kernel<T, D>(p); });
  }
}

template <typename T>
void run_dim(int head_dim, const Params& p, const nanorun::kernels::AttentionPlan& plan) {
  switch (head_dim) {
    case 32: return run<T, 32>(p, plan);
    case 64: return run<T, 64>(p, plan);
    case 128: return run<T, 128>(p, plan);
    default: nanorun::emulator::fail("head_dim must be 32, 64 or 128");
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) nanorun::emulator::fail("usage: attention_emulator DIR");
  const std::string dir = argv[1];
  auto meta = read_meta(dir + "/meta.txt");
  auto get = [&](const char* name) { return static_cast<int64_t>(meta.at(name)); };
  const DType dtype = get("bf16") ? DType::bf16 : DType::f16;
  const int64_t T = get("tokens"), Hq = get("heads"), Hkv = get("kv_heads"), D = get("head_dim");
  const int64_t P = get("num_pages"), page = get("page_size");
  const int64_t S = get("num_seqs"), max_pages = get("max_pages");

  Buffer q = read_file(dir + "/q.bin"), k = read_file(dir + "/k_cache.bin"),
         v = read_file(dir + "/v_cache.bin"), bt = read_file(dir + "/block_tables.bin"),
         seq = read_file(dir + "/seq_ids.bin"), pos = read_file(dir + "/positions.bin"),
         out = read_file(dir + "/out.bin");
  std::vector<float> workspace(static_cast<size_t>(get("workspace_floats")), NAN);
  nanorun::emulator::register_global(k.data(), k.bytes);
  nanorun::emulator::register_global(v.data(), v.bytes);

  const TensorView qv = view(q.data(), dtype, {T, Hq, D},
                             {get("q_token_stride"), get("q_head_stride"), 1});
  const TensorView outv = view(out.data(), dtype, {T, Hq, D},
                               {get("out_token_stride"), get("out_head_stride"), 1});
  const TensorView kv = view(k.data(), dtype, {P, page, Hkv, D}, contiguous({P, page, Hkv, D}));
  const TensorView vv = view(v.data(), dtype, {P, page, Hkv, D}, contiguous({P, page, Hkv, D}));
  const TensorView btv =
      view(bt.data(), DType::i32, {S, max_pages}, {get("block_table_stride"), 1});
  const TensorView seqv = view(seq.data(), DType::i32, {T}, {1});
  const TensorView posv = view(pos.data(), DType::i64, {T}, {1});
  const TensorView wsv = view(workspace.data(), DType::f32,
                              {static_cast<int64_t>(workspace.size())}, {1});

  const auto plan = nanorun::kernels::plan_paged_attention(
      T, static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(D), max_pages * page,
      static_cast<int>(get("max_ctas")), static_cast<int64_t>(workspace.size()));
  const Params p = make_params(qv, kv, vv, btv, seqv, posv, outv, wsv,
                               static_cast<float>(meta.at("scale")),
                               static_cast<int>(get("sliding_window")), plan);
  if (dtype == DType::bf16) {
    run_dim<__nv_bfloat16>(static_cast<int>(D), p, plan);
  } else {
    run_dim<__half>(static_cast<int>(D), p, plan);
  }

  write_file(dir + "/out.bin", out.data(), out.bytes);
  std::ofstream(dir + "/plan.txt") << plan.splits << " " << plan.grid << " " << plan.items
                                   << "\n";
  return 0;
}
