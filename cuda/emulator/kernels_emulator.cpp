// Calls one of nanorun's plain kernel launchers (cuda/include/nanorun/kernels.h) on tensors
// written by tests/test_cuda_kernels_emulated.py; the launchers' .cu files are compiled beside
// this through hostify.py and kernel_emulator.h.
//
//   kernels_emulator DIR
//
// DIR/spec.txt:
//   kernel NAME                       rms_norm | fused_add_rms_norm | silu_and_mul |
//                                     rotary_embedding | rotary_embedding_inv_freq | kv_append
//   scalar NAME VALUE                 eps, max_ctas
//   storage NAME BYTES                DIR/NAME.bin holds its bytes
//   tensor NAME STORAGE DTYPE OFFSET NDIM SHAPE... STRIDES...   (elements, as torch's)
// Each storage sits between guard bands of 0xA5 bytes; after the launch the storages are
// written back to their files, and a guard byte changed (a write outside every tensor) aborts.
// Prints `status N` (the launcher's Status; 0 = ok).
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "nanorun/kernels.h"
#include "nanorun/tensor.h"
#include "warp_emulator.h"

namespace {

using nanorun::DType;
using nanorun::Status;
using nanorun::TensorView;
namespace kernels = nanorun::kernels;

constexpr size_t kGuard = 4096;
constexpr unsigned char kGuardByte = 0xA5;

struct Storage {
  std::vector<uint64_t> words;  // 8-byte aligned, with a guard band on each side
  size_t bytes = 0;
  unsigned char* data() { return reinterpret_cast<unsigned char*>(words.data()) + kGuard; }
  unsigned char* raw() { return reinterpret_cast<unsigned char*>(words.data()); }
};

DType dtype_of(const std::string& name) {
  static const std::map<std::string, DType> names = {
      {"f32", DType::f32}, {"f16", DType::f16}, {"bf16", DType::bf16}, {"i32", DType::i32},
      {"i64", DType::i64}};
  auto it = names.find(name);
  if (it == names.end()) nanorun::emulator::fail("unknown dtype in spec.txt");
  return it->second;
}

void read_into(const std::string& path, unsigned char* dst, size_t bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in.read(reinterpret_cast<char*>(dst), static_cast<std::streamsize>(bytes))) {
    nanorun::emulator::fail(("cannot read " + path).c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) nanorun::emulator::fail("usage: kernels_emulator DIR");
  const std::string dir = argv[1];
  std::ifstream spec(dir + "/spec.txt");
  if (!spec) nanorun::emulator::fail("cannot read spec.txt");
  std::string kernel, line;
  std::map<std::string, double> scalars;
  std::map<std::string, Storage> storages;
  std::map<std::string, TensorView> tensors;
  while (std::getline(spec, line)) {
    std::istringstream in(line);
    std::string what, name;
    in >> what >> name;
    if (what == "kernel") {
      kernel = name;
    } else if (what == "scalar") {
      in >> scalars[name];
    } else if (what == "storage") {
      Storage& s = storages[name];
      in >> s.bytes;
      s.words.assign((s.bytes + 2 * kGuard) / 8 + 1, 0);
      std::memset(s.raw(), kGuardByte, s.words.size() * 8);
      read_into(dir + "/" + name + ".bin", s.data(), s.bytes);
    } else if (what == "tensor") {
      std::string storage, dtype;
      int64_t offset;
      TensorView t;
      in >> storage >> dtype >> offset >> t.ndim;
      t.dtype = dtype_of(dtype);
      t.device = 0;
      for (int i = 0; i < t.ndim; ++i) in >> t.shape[i];
      for (int i = 0; i < t.ndim; ++i) in >> t.strides[i];
      auto it = storages.find(storage);
      if (it == storages.end()) nanorun::emulator::fail("a tensor names an unknown storage");
      t.data = it->second.data() + offset * static_cast<int64_t>(nanorun::dtype_size(t.dtype));
      tensors[name] = t;
    } else if (!what.empty()) {
      nanorun::emulator::fail(("unknown spec line: " + line).c_str());
    }
  }
  auto T = [&](const char* name) -> const TensorView& {
    auto it = tensors.find(name);
    if (it == tensors.end()) nanorun::emulator::fail(("missing tensor " + std::string(name)).c_str());
    return it->second;
  };
  auto scalar = [&](const char* name) { return scalars.at(name); };
  cudaStream_t stream = nullptr;

  Status status;
  if (kernel == "rms_norm") {
    status = kernels::rms_norm(T("out"), T("x"), T("weight"), static_cast<float>(scalar("eps")),
                               stream);
  } else if (kernel == "fused_add_rms_norm") {
    status = kernels::fused_add_rms_norm(T("x"), T("residual"), T("weight"),
                                         static_cast<float>(scalar("eps")), stream);
  } else if (kernel == "silu_and_mul") {
    status = kernels::silu_and_mul(T("out"), T("x"), stream);
  } else if (kernel == "rotary_embedding") {
    status = kernels::rotary_embedding(T("qk"), T("positions"), T("cos"), T("sin"), stream);
  } else if (kernel == "rotary_embedding_inv_freq") {
    status = kernels::rotary_embedding_inv_freq(T("qk"), T("positions"), T("inv_freq"), stream);
  } else if (kernel == "kv_append") {
    status = kernels::kv_append(T("key"), T("value"), T("k_cache"), T("v_cache"),
                                T("slot_mapping"), static_cast<int>(scalar("max_ctas")), stream);
  } else {
    nanorun::emulator::fail("unknown kernel in spec.txt");
  }

  for (auto& [name, s] : storages) {
    for (size_t i = 0; i < kGuard; ++i) {
      if (s.raw()[i] != kGuardByte || s.data()[s.bytes + i] != kGuardByte) {
        nanorun::emulator::fail(("a write outside storage " + name).c_str());
      }
    }
    std::ofstream out(dir + "/" + name + ".bin", std::ios::binary);
    out.write(reinterpret_cast<const char*>(s.data()), static_cast<std::streamsize>(s.bytes));
  }
  std::printf("status %d\n", static_cast<int>(status));
  return 0;
}
