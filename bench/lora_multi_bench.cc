// Multi-adapter LoRA benchmark (issue 6, Performance): a batch that mixes 8 adapters of ranks 8,
// 16 and 64 against one adapter of the same total rank work, through the segmented LoRA ops of
// ops/lora.h, on the 1.1B Llama projection shapes. Target: mixed within 10% of single.
//
//   mixed:  adapters of ranks R = {8,8,8,16,16,16,64,64}, the N tokens split equally among them
//           (default: one segment per adapter, 8 x 1024 tokens = halves of 2048-token sequences;
//           --segs-per-adapter K cuts each adapter's tokens into K segments, interleaved).
//   single: one adapter of rank r* = round(sum_i tokens_i r_i / N) over all N tokens (one segment).
//
// Passes: "fwd" (LoraShrink + LoraExpand) and "fwd_bwd" (those plus LoraExpandBackward and
// LoraShrinkBackward with f32 weight gradients and dx). FLOPs counted with W = sum of tokens x rank
// over the batch: fwd 2 W (in + out), fwd_bwd 6 W (in + out).
//
// Prints one JSON object per (projection, case, pass) with the median time and TFLOP/s, one summary
// object per projection with the ratios mixed/single, and one "layer" summary (every projection
// weighted by how often it occurs in a Llama layer). CUDA: bf16, timed with CUDA events per rep.
// CPU: f32 with the reference loops, steady_clock, smaller defaults (N 1024). Not a test.
//
//   tandem-lora_multi_bench [--device cpu|cuda:N] [--tokens N] [--ranks 8,8,8,16,16,16,64,64]
//       [--segs-per-adapter K] [--single-rank R] [--shapes 2048x2048,2048x512,...]
//       [--reps N] [--warmup N] [--dropout P] [--only fwd|fwd_bwd]
#include <algorithm>
#include <climits>
#include <cstdint>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/stream.h"
#include "core/tensor.h"
#include "core/version.h"
#include "ops/lora.h"
#include "ops/ops.h"

namespace {

using tandem::DType;
using tandem::Shape;
using tandem::Tensor;
namespace ops = tandem::ops;

constexpr double kTargetRatio = 1.10;  // issue 6: mixed within 10% of single
constexpr uint64_t kDropoutSeed = 0x10a4;
constexpr float kScale = 2.0f;  // alpha / r with alpha = 2 r

struct Projection {
  std::string name;
  int64_t in, out;
  int per_layer;  // how many projections of a Llama layer have this shape
};

struct Options {
  std::string device = tandem::CudaAvailable() ? "cuda:0" : "cpu";
  int64_t tokens = 0;  // 0: 8192 on CUDA, 1024 on CPU
  std::vector<int32_t> ranks = {8, 8, 8, 16, 16, 16, 64, 64};
  int segs_per_adapter = 1;
  int32_t single_rank = 0;  // 0: r* from the mixed batch
  std::vector<Projection> shapes = {{"q/o", 2048, 2048, 2},
                                    {"k/v", 2048, 512, 2},
                                    {"gate/up", 2048, 8192, 2},
                                    {"down", 8192, 2048, 1}};
  int reps = 0, warmup = -1;  // 0 / -1: 20 and 5 on CUDA, 3 and 1 on CPU
  float dropout = 0.0f;
  std::string only;
};

std::string Today() {
  std::time_t now = std::time(nullptr);
  char buf[16];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d", std::gmtime(&now));
  return buf;
}

// One batch layout: the segments and the adapters' ranks.
struct Batch {
  std::string name;
  std::vector<int32_t> seg_start{0}, seg_adapter, ranks;
  double rank_work = 0.0;  // sum over tokens of the token's adapter rank
};

Batch MixedBatch(int64_t tokens, const std::vector<int32_t>& ranks, int segs_per_adapter) {
  Batch b{"mixed"};
  b.ranks = ranks;
  const int64_t num_segs = static_cast<int64_t>(ranks.size()) * segs_per_adapter;
  for (int64_t s = 0; s < num_segs; ++s) {
    const int64_t len = tokens / num_segs + (s < tokens % num_segs ? 1 : 0);
    const int32_t a = static_cast<int32_t>(s % static_cast<int64_t>(ranks.size()));
    b.seg_start.push_back(b.seg_start.back() + static_cast<int32_t>(len));
    b.seg_adapter.push_back(a);
    b.rank_work += static_cast<double>(len) * ranks[a];
  }
  return b;
}

Batch SingleBatch(int64_t tokens, int32_t rank) {
  Batch b{"single"};
  b.ranks = {rank};
  b.seg_start.push_back(static_cast<int32_t>(tokens));
  b.seg_adapter = {0};
  b.rank_work = static_cast<double>(tokens) * rank;
  return b;
}

class Bench {
 public:
  Bench(ops::Context& ctx, const Options& opt) : ctx_(ctx), opt_(opt) {
    device_name_ = tandem::DeviceName(ctx.device());
    dtype_ = ctx.is_cuda() ? DType::kBF16 : DType::kF32;
    if (ctx.is_cuda()) {
      auto start = tandem::CudaEventOwner::Create(ctx.device().index);
      auto end = tandem::CudaEventOwner::Create(ctx.device().index);
      TANDEM_CHECK_OK(start);
      TANDEM_CHECK_OK(end);
      start_.emplace(std::move(start).value());
      end_.emplace(std::move(end).value());
    }
  }

  DType dtype() const { return dtype_; }

  // Median milliseconds of fn over the reps, after the warmup calls.
  double MedianMs(const std::function<void()>& fn) {
    for (int i = 0; i < opt_.warmup; ++i) fn();
    TANDEM_CHECK_OK(ctx_.Synchronize());
    std::vector<double> ms;
    for (int i = 0; i < opt_.reps; ++i) {
      if (ctx_.is_cuda()) {
        TANDEM_CHECK_OK(start_->Record(ctx_.stream()));
        fn();
        TANDEM_CHECK_OK(end_->Record(ctx_.stream()));
        auto elapsed = tandem::CudaEventOwner::ElapsedMs(*start_, *end_);
        TANDEM_CHECK_OK(elapsed);
        ms.push_back(*elapsed);
      } else {
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        TANDEM_CHECK_OK(ctx_.Synchronize());
        ms.push_back(std::chrono::duration<double, std::milli>(
                         std::chrono::steady_clock::now() - t0).count());
      }
    }
    std::sort(ms.begin(), ms.end());
    const size_t n = ms.size();
    return n % 2 == 1 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
  }

  // Uniform in [-scale, scale], in the bench dtype on the context's device.
  Tensor Random(const Shape& shape, float scale, uint64_t seed) {
    Tensor host = Tensor::Cpu(shape, DType::kF32);
    uint64_t s = 0x9e3779b97f4a7c15ull ^ (seed * 0xbf58476d1ce4e5b9ull);
    float* p = host.data<float>();
    for (int64_t i = 0; i < host.numel(); ++i) {
      s ^= s << 13;
      s ^= s >> 7;
      s ^= s << 17;
      p[i] = scale * (static_cast<float>(s >> 40) / static_cast<float>(1 << 24) * 2.0f - 1.0f);
    }
    auto typed = tandem::CastCpu(host, dtype_);
    TANDEM_CHECK_OK(typed);
    auto dev = tandem::CopyToDeviceBlocking(*typed, ctx_.allocator());
    TANDEM_CHECK_OK(dev);
    return *std::move(dev);
  }

  Tensor Zeros(const Shape& shape, DType dtype) {
    auto t = Tensor::Empty(shape, dtype, ctx_.allocator());
    TANDEM_CHECK_OK(t);
    TANDEM_CHECK_OK(ops::Fill(ctx_, *t, 0.0f));
    return *std::move(t);
  }

  void Print(const nlohmann::json& fields) {
    nlohmann::json j = {{"bench", "lora_multi"}, {"device", device_name_},
                        {"dtype", tandem::DTypeName(dtype_)}};
    j.update(fields);
    j["commit"] = tandem::GitCommit();
    j["date"] = Today();
    std::printf("%s\n", j.dump().c_str());
    std::fflush(stdout);
  }

  ops::Context& ctx() { return ctx_; }
  const Options& opt() const { return opt_; }

 private:
  ops::Context& ctx_;
  const Options& opt_;
  std::string device_name_;
  DType dtype_ = DType::kF32;
  std::optional<tandem::CudaEventOwner> start_, end_;
};

// Median ms of "fwd" and "fwd_bwd" for one batch layout on one projection (0 when skipped).
struct Timing {
  double fwd_ms = 0.0, fwd_bwd_ms = 0.0;
};

Timing RunBatch(Bench& b, const Projection& p, const Batch& batch, int64_t tokens) {
  ops::Context& ctx = b.ctx();
  const Options& opt = b.opt();
  auto segs = ops::LoraSegments::Create(ctx, batch.seg_start, batch.seg_adapter, batch.ranks);
  TANDEM_CHECK_OK(segs);
  std::vector<ops::LoraWeights::Entry> we, ge;
  for (size_t a = 0; a < batch.ranks.size(); ++a) {
    const int64_t r = batch.ranks[a];
    const float a_scale = 1.0f / std::sqrt(static_cast<float>(p.in));
    const float b_scale = 1.0f / std::sqrt(static_cast<float>(r));
    Tensor wa = b.Random({r, p.in}, a_scale, 10 * a + 1);   // [r, in]
    Tensor wb = b.Random({p.out, r}, b_scale, 10 * a + 2);  // [out, r]
    we.push_back({wa, wb, kScale, opt.dropout});
    ge.push_back({b.Zeros({r, p.in}, DType::kF32), b.Zeros({p.out, r}, DType::kF32)});
  }
  auto w = ops::LoraWeights::Create(ctx, p.in, p.out, std::move(we));
  TANDEM_CHECK_OK(w);
  auto grads = ops::LoraWeights::Create(ctx, p.in, p.out, std::move(ge));
  TANDEM_CHECK_OK(grads);

  Tensor x = b.Random({tokens, p.in}, 1.0f, 100);    // [N, in]
  Tensor dy = b.Random({tokens, p.out}, 1.0f, 101);  // [N, out]
  Tensor y = b.Zeros({tokens, p.out}, b.dtype());    // [N, out]
  Tensor dx = b.Zeros({tokens, p.in}, b.dtype());    // [N, in]
  Tensor h = b.Zeros({segs->h_numel()}, b.dtype());  // packed [h_numel]
  Tensor dh = b.Zeros({segs->h_numel()}, b.dtype());
  auto forward = [&] {
    TANDEM_CHECK_OK(ops::LoraShrink(ctx, h, x, *w, *segs, kDropoutSeed));
    TANDEM_CHECK_OK(ops::LoraExpand(ctx, y, h, *w, *segs));
  };
  auto backward = [&] {
    TANDEM_CHECK_OK(ops::LoraExpandBackward(ctx, dh, &*grads, dy, h, *w, *segs));
    TANDEM_CHECK_OK(ops::LoraShrinkBackward(ctx, dx, &*grads, dh, x, *w, *segs, kDropoutSeed));
  };
  Timing t;
  if (opt.only.empty() || opt.only == "fwd") t.fwd_ms = b.MedianMs(forward);
  if (opt.only.empty() || opt.only == "fwd_bwd") {
    t.fwd_bwd_ms = b.MedianMs([&] {
      forward();
      backward();
    });
  }
  return t;
}

double Tflops(double flops, double ms) { return ms > 0.0 ? flops / (ms * 1e-3) / 1e12 : 0.0; }

void ReportBatch(Bench& b, const Projection& p, const Batch& batch, int64_t tokens,
                 const Timing& t) {
  const double io = static_cast<double>(p.in + p.out);
  const struct {
    const char* pass;
    double ms, flops;
  } passes[] = {{"fwd", t.fwd_ms, 2.0 * batch.rank_work * io},
                {"fwd_bwd", t.fwd_bwd_ms, 6.0 * batch.rank_work * io}};
  for (const auto& ps : passes) {
    if (ps.ms <= 0.0) continue;
    b.Print({{"projection", p.name}, {"in", p.in}, {"out", p.out}, {"tokens", tokens},
             {"case", batch.name}, {"pass", ps.pass}, {"ranks", batch.ranks},
             {"segments", batch.seg_adapter.size()}, {"rank_work", batch.rank_work},
             {"ms", ps.ms}, {"tflops", Tflops(ps.flops, ps.ms)}});
  }
}

double Ratio(double mixed, double single) { return single > 0.0 ? mixed / single : 0.0; }

// Adds the ratio fields of one pass (skipped passes leave nothing).
void AddRatio(nlohmann::json& j, const char* pass, double mixed_ms, double single_ms) {
  if (mixed_ms <= 0.0 || single_ms <= 0.0) return;
  const std::string p = pass;
  j["mixed_" + p + "_ms"] = mixed_ms;
  j["single_" + p + "_ms"] = single_ms;
  j["ratio_" + p] = Ratio(mixed_ms, single_ms);
  j["within_target_" + p] = Ratio(mixed_ms, single_ms) <= kTargetRatio;
}

int Run(ops::Context& ctx, const Options& opt) {
  Bench b(ctx, opt);
  const int64_t tokens = opt.tokens;
  const Batch mixed = MixedBatch(tokens, opt.ranks, opt.segs_per_adapter);
  const int32_t r_star =
      opt.single_rank > 0
          ? opt.single_rank
          : static_cast<int32_t>(std::lround(mixed.rank_work / static_cast<double>(tokens)));
  const Batch single = SingleBatch(tokens, r_star);
  Timing layer_mixed, layer_single;
  for (const Projection& p : opt.shapes) {
    const Timing tm = RunBatch(b, p, mixed, tokens);
    ReportBatch(b, p, mixed, tokens, tm);
    const Timing ts = RunBatch(b, p, single, tokens);
    ReportBatch(b, p, single, tokens, ts);
    nlohmann::json j = {{"summary", "projection"}, {"projection", p.name}, {"in", p.in},
                        {"out", p.out}, {"tokens", tokens}, {"mixed_ranks", mixed.ranks},
                        {"single_rank", r_star},
                        {"work_ratio", mixed.rank_work / single.rank_work},
                        {"target_ratio", kTargetRatio}};
    AddRatio(j, "fwd", tm.fwd_ms, ts.fwd_ms);
    AddRatio(j, "fwd_bwd", tm.fwd_bwd_ms, ts.fwd_bwd_ms);
    b.Print(j);
    layer_mixed.fwd_ms += p.per_layer * tm.fwd_ms;
    layer_mixed.fwd_bwd_ms += p.per_layer * tm.fwd_bwd_ms;
    layer_single.fwd_ms += p.per_layer * ts.fwd_ms;
    layer_single.fwd_bwd_ms += p.per_layer * ts.fwd_bwd_ms;
  }
  // All projections of one layer (weighted by per_layer): the number to compare with the target.
  nlohmann::json j = {{"summary", "layer"}, {"tokens", tokens}, {"mixed_ranks", mixed.ranks},
                      {"single_rank", r_star}, {"work_ratio", mixed.rank_work / single.rank_work},
                      {"target_ratio", kTargetRatio}};
  AddRatio(j, "fwd", layer_mixed.fwd_ms, layer_single.fwd_ms);
  AddRatio(j, "fwd_bwd", layer_mixed.fwd_bwd_ms, layer_single.fwd_bwd_ms);
  b.Print(j);
  return 0;
}

bool ParseInts(const std::string& text, std::vector<int32_t>* out) {
  out->clear();
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const long v = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || v <= 0) return false;
    out->push_back(static_cast<int32_t>(v));
  }
  return !out->empty();
}

// "INxOUT,INxOUT,...": custom shapes, each counted once per layer.
bool ParseShapes(const std::string& text, std::vector<Projection>* out) {
  out->clear();
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    long in = 0, o = 0;
    char tail = 0;
    if (std::sscanf(item.c_str(), "%ldx%ld%c", &in, &o, &tail) != 2 || in <= 0 || o <= 0) {
      return false;
    }
    out->push_back({item, in, o, 1});
  }
  return !out->empty();
}

int Usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--device cpu|cuda:N] [--tokens N] [--ranks 8,8,8,16,16,16,64,64]\n"
               "    [--segs-per-adapter K] [--single-rank R] [--shapes INxOUT,...] [--reps N]\n"
               "    [--warmup N] [--dropout P] [--only fwd|fwd_bwd]\n",
               argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has = i + 1 < argc;
    const std::string v = has ? argv[i + 1] : "";
    bool ok = has;
    if (a == "--device") opt.device = v;
    else if (a == "--tokens") ok = ok && (opt.tokens = std::atoll(v.c_str())) > 0;
    else if (a == "--ranks") ok = ok && ParseInts(v, &opt.ranks);
    else if (a == "--segs-per-adapter") ok = ok &&
                                        (opt.segs_per_adapter = std::atoi(v.c_str())) > 0;
    else if (a == "--single-rank") ok = ok && (opt.single_rank = std::atoi(v.c_str())) > 0;
    else if (a == "--shapes") ok = ok && ParseShapes(v, &opt.shapes);
    else if (a == "--reps") ok = ok && (opt.reps = std::atoi(v.c_str())) > 0;
    else if (a == "--warmup") ok = ok && (opt.warmup = std::atoi(v.c_str())) >= 0;
    else if (a == "--dropout") ok = ok && (opt.dropout = std::strtof(v.c_str(), nullptr)) >= 0.0f &&
                                    opt.dropout < 1.0f;
    else if (a == "--only") ok = ok && ((opt.only = v) == "fwd" || v == "fwd_bwd");
    else ok = false;
    if (!ok) return Usage(argv[0]);
    ++i;
  }
  auto dev = tandem::ParseDevice(opt.device);
  TANDEM_CHECK_OK(dev);
  auto made = ops::Context::ForDevice(*dev);
  TANDEM_CHECK_OK(made);
  std::unique_ptr<ops::Context> ctx = std::move(made).value();
  const bool cuda = ctx->is_cuda();
  if (opt.tokens == 0) opt.tokens = cuda ? 8192 : 1024;
  if (opt.reps == 0) opt.reps = cuda ? 20 : 3;
  if (opt.warmup < 0) opt.warmup = cuda ? 5 : 1;
  const int64_t num_segs = static_cast<int64_t>(opt.ranks.size()) * opt.segs_per_adapter;
  if (opt.tokens < num_segs || opt.tokens > INT32_MAX) {
    std::fprintf(stderr, "--tokens: expected %ld..%d (segments %ld), found %ld\n",
                 static_cast<long>(num_segs), INT32_MAX, static_cast<long>(num_segs),
                 static_cast<long>(opt.tokens));
    return 2;
  }
  return Run(*ctx, opt);
}
