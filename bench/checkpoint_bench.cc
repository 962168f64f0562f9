// Universal checkpoint benchmark: save and load time and GB/s of a Llama-shaped state (f32
// master + two Adam moments per parameter; default TinyLlama 1.1B shapes) on one rank, and the
// trainer's stall per background save (the host copy CheckpointWriter needs), for three saves in
// a row: from host memory, and with --state-on cuda from GPU memory as the trainer's state is
// (CheckpointWriter::CopyToHost into its cached pinned buffers: the first save pins them).
//
//   tandem-checkpoint_bench [--dir /mnt/nvme/ckpt] [--layers 22] [--hidden 2048] [--inter 5632]
//                           [--vocab 32000] [--heads 32] [--kv-heads 4] [--state-on cpu|cuda]
//
// Prints one JSON object per measurement. Before the load, the file's pages are dropped from the
// page cache (posix_fadvise DONTNEED after fsync) so the load reads the disk. Compare with
// `dd if=/dev/zero of=DIR/x bs=64M count=64 oflag=direct` on the same disk.
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "checkpoint/universal.h"
#include "checkpoint/universal_hf.h"
#include "checkpoint/universal_writer.h"
#include "core/cuda_allocator.h"
#include "core/version.h"

namespace {

using namespace tandem;
using namespace tandem::checkpoint;

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

Tensor Filled(const Shape& shape, uint32_t seed) {
  Tensor t = Tensor::Cpu(shape, DType::kF32);
  float* p = t.data<float>();
  uint32_t x = seed * 2654435761u + 1;
  for (int64_t i = 0; i < t.numel(); ++i) {
    x = x * 1664525u + 1013904223u;
    p[i] = static_cast<float>(static_cast<int32_t>(x >> 8)) * 1e-9f;
  }
  return t;
}

std::vector<std::pair<std::string, Shape>> LlamaShapes(int64_t layers, int64_t c, int64_t f,
                                                       int64_t v, int64_t hq, int64_t hkv) {
  const int64_t d = c / hq;
  std::vector<std::pair<std::string, Shape>> out = {{"model.embed_tokens.weight", {v, c}}};
  for (int64_t l = 0; l < layers; ++l) {
    const std::string p = StrCat("model.layers.", l, ".");
    out.push_back({p + "input_layernorm.weight", {c}});
    out.push_back({p + "self_attn.q_proj.weight", {hq * d, c}});
    out.push_back({p + "self_attn.k_proj.weight", {hkv * d, c}});
    out.push_back({p + "self_attn.v_proj.weight", {hkv * d, c}});
    out.push_back({p + "self_attn.o_proj.weight", {c, hq * d}});
    out.push_back({p + "post_attention_layernorm.weight", {c}});
    out.push_back({p + "mlp.gate_proj.weight", {f, c}});
    out.push_back({p + "mlp.up_proj.weight", {f, c}});
    out.push_back({p + "mlp.down_proj.weight", {c, f}});
  }
  out.push_back({"model.norm.weight", {c}});
  out.push_back({"lm_head.weight", {v, c}});
  return out;
}

void Emit(nlohmann::json j) {
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  j["device"] = "host";
  j["commit"] = GitCommit();
  j["date"] = date;
  std::printf("%s\n", j.dump().c_str());
  std::fflush(stdout);
}

void DropCache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "/tmp/tandem_ckpt_bench";
  std::string state_on = "cpu";
  int64_t layers = 22, hidden = 2048, inter = 5632, vocab = 32000, heads = 32, kv = 4;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const std::string v = argv[i + 1];
    if (k == "--dir")
      dir = v;
    else if (k == "--layers")
      layers = std::stoll(v);
    else if (k == "--hidden")
      hidden = std::stoll(v);
    else if (k == "--inter")
      inter = std::stoll(v);
    else if (k == "--vocab")
      vocab = std::stoll(v);
    else if (k == "--heads")
      heads = std::stoll(v);
    else if (k == "--kv-heads")
      kv = std::stoll(v);
    else if (k == "--state-on")
      state_on = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  std::filesystem::remove_all(dir);
  std::vector<TensorShard> shards;
  int64_t numel = 0;
  uint32_t seed = 1;
  for (const auto& [name, shape] : LlamaShapes(layers, hidden, inter, vocab, heads, kv)) {
    TensorShard s;
    s.name = name;
    s.logical_shape = shape;
    s.split = LlamaSplitSpec(name);
    s.slab = Hyperslab{Shape(shape.size(), 0), shape};
    s.master = Filled(shape, seed++);
    s.exp_avg = Filled(shape, seed++);
    s.exp_avg_sq = Filled(shape, seed++);
    s.step = 1;
    numel += s.master.numel();
    shards.push_back(std::move(s));
  }
  const double bytes = static_cast<double>(numel) * 12;
  const nlohmann::json sizes = {{"params", numel},  {"bytes", bytes}, {"layers", layers},
                                {"hidden", hidden}, {"dtype", "f32"}, {"dir", dir}};
  UniversalMeta meta;
  meta.step = 1;
  auto t0 = std::chrono::steady_clock::now();
  auto path = SaveUniversal(dir, meta, shards, nullptr, {.keep_last = 2});
  const double save_s = Since(t0);
  if (!path.ok()) {
    std::fprintf(stderr, "save failed: %s\n", path.status().ToString().c_str());
    return 1;
  }
  Emit({{"bench", "universal_save"},
        {"sizes", sizes},
        {"seconds", save_s},
        {"gb_per_s", bytes / save_s / 1e9}});
  DropCache(*path);
  t0 = std::chrono::steady_clock::now();
  auto reader = UniversalReader::Open(*path);
  if (!reader.ok()) return 1;
  for (const TensorInfo& t : reader->tensors()) {
    auto s = reader->ReadAll(t.name);
    if (!s.ok()) {
      std::fprintf(stderr, "load failed: %s\n", s.status().ToString().c_str());
      return 1;
    }
  }
  const double load_s = Since(t0);
  Emit({{"bench", "universal_load_verified"},
        {"sizes", sizes},
        {"seconds", load_s},
        {"gb_per_s", bytes / load_s / 1e9}});
  // Background saves: the stall is the wait for the previous save plus the host copy; the write
  // overlaps whatever follows (here: nothing, so each save is waited for before the next).
  std::unique_ptr<CachingAllocator> gpu;
  if (state_on == "cuda") {
    auto made = CreateCudaCachingAllocator(0);
    if (!made.ok()) {
      std::fprintf(stderr, "--state-on cuda: %s\n", made.status().ToString().c_str());
      return 1;
    }
    gpu = std::move(made).value();
    for (TensorShard& s : shards) {
      for (Tensor* t : {&s.master, &s.exp_avg, &s.exp_avg_sq}) {
        auto d = CopyToDeviceBlocking(*t, *gpu);
        if (!d.ok()) return 1;
        *t = std::move(d).value();
      }
    }
  }
  {
    CheckpointWriter writer(dir, nullptr, {.keep_last = 2});
    for (int save = 1; save <= 3; ++save) {
      t0 = std::chrono::steady_clock::now();
      if (!writer.Wait().ok()) return 1;
      auto copies = writer.CopyToHost(shards);
      if (!copies.ok()) {
        std::fprintf(stderr, "copy failed: %s\n", copies.status().ToString().c_str());
        return 1;
      }
      meta.step = 1 + save;
      if (!writer.Submit(meta, std::move(*copies)).ok()) return 1;
      const double stall_s = Since(t0);
      const Status done = writer.Wait();
      const double total_s = Since(t0);
      if (!done.ok()) return 1;
      Emit({{"bench", "background_save"},
            {"sizes", sizes},
            {"save", save},
            {"state_on", state_on},
            {"stall_seconds", stall_s},
            {"total_seconds", total_s},
            {"note", state_on == "cuda" ? "stall = device-to-pinned-host copy (save 1 pins the buffers)"
                                        : "stall = host-to-host copy of the state"}});
    }
  }
  shards.clear();
  std::filesystem::remove_all(dir);
  return 0;
}
