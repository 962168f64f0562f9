// The serving forward alone (serve::InferModel), without the engine: one decode step of B
// sequences (one token each, at position --context) and one prefill chunk per sequence, with no
// adapter and with B sequences spread over --adapters rank --rank LoRA adapters on q/k/v/o (all
// seven projections with --all-linear 1).
//
//   tandem-infer_bench [--device cuda:0] [--batch 32] [--context 128] [--prefill 128]
//                      [--adapters 8] [--rank 16] [--iters 20] [--graphs 1] [--all-linear 0]
//                      [--sms 0]
//                      [--layers 22 --hidden 2048 --inter 5632 --vocab 32000 --heads 32
//                       --kv-heads 4]
//
// Prints one JSON line per case (decode / prefill, base / lora): ms per forward (mean of --iters
// after 3 warm-up calls, each call waited for; decode as CUDA graph replays unless --graphs 0,
// and ms_eager launched op by op), and the ops profile of one eager call by category
// (ops/profiler.h), so that a slow case shows where its time goes. The decode floor is the bytes
// one step must read (the weights, plus every sequence's K/V) over the device's copy bandwidth,
// which the bench measures with a device-to-device copy of the weights' size.
// --sms N runs the forwards on N streaming multiprocessors only (an SM partition,
// ops::Context::CreateSmPartition; the copy still on the whole device): how a decode step slows
// when other work holds the rest of the SMs.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/version.h"
#include "model/llama.h"
#include "ops/ops.h"
#include "ops/profiler.h"
#include "peft/lora.h"
#include "serve/infer_model.h"
#include "serve/kv_pool.h"

namespace {

using namespace tandem;
using Clock = std::chrono::steady_clock;

void Check(const Status& s, const char* what) {
  if (s.ok()) return;
  std::fprintf(stderr, "infer_bench: %s: %s\n", what, s.ToString().c_str());
  std::exit(1);
}

template <typename T>
T Take(StatusOr<T> v, const char* what) {
  Check(v.status(), what);
  return std::move(v).value();
}

int64_t Flag(const std::map<std::string, std::string>& kv, const std::string& k, int64_t d) {
  auto it = kv.find(k);
  return it == kv.end() ? d : std::stoll(it->second);
}

// A random rank-r adapter on q/k/v/o, or every linear projection (nonzero B, so its kernels do
// real work), on the host.
std::unique_ptr<peft::LoraAdapter> RandomAdapter(ops::Context& host, const model::LlamaConfig& c,
                                                 int64_t r, uint64_t seed, bool all_linear) {
  peft::LoraConfig lc;
  lc.r = r;
  lc.alpha = 2.0 * r;
  lc.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  if (all_linear) lc.target_modules = {"all-linear"};
  auto a = Take(peft::LoraAdapter::Create(host, c, lc), "LoraAdapter::Create");
  for (size_t i = 0; i < a->parameters().size(); ++i) {
    Tensor t = Tensor::Cpu(a->parameters()[i].weight.shape(), DType::kF32);
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + i;
    for (int64_t j = 0; j < t.numel(); ++j) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      t.data<float>()[j] = 0.02f * (static_cast<float>(x % 2001) / 1000.0f - 1.0f);
    }
    Check(a->SetFromHost(i, t), "SetFromHost");
  }
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> kv;
  for (int i = 1; i + 1 < argc; i += 2) kv[std::string(argv[i]).substr(2)] = argv[i + 1];
  const Device device = Take(ParseDevice(kv.count("device") ? kv["device"] : "cuda:0"), "--device");
  const int64_t B = Flag(kv, "batch", 32), context = Flag(kv, "context", 128);
  const int64_t prefill = Flag(kv, "prefill", 128), A = Flag(kv, "adapters", 8);
  const int64_t rank = Flag(kv, "rank", 16), iters = std::max<int64_t>(1, Flag(kv, "iters", 20));
  const bool graphs = Flag(kv, "graphs", 1) != 0;          // decode as CUDA graph replays
  const bool all_linear = Flag(kv, "all-linear", 0) != 0;  // adapters on all seven projections
  model::LlamaConfig c;
  c.num_hidden_layers = Flag(kv, "layers", 22);
  c.hidden_size = Flag(kv, "hidden", 2048);
  c.intermediate_size = Flag(kv, "inter", 5632);
  c.vocab_size = Flag(kv, "vocab", 32000);
  c.num_attention_heads = Flag(kv, "heads", 32);
  c.num_key_value_heads = Flag(kv, "kv-heads", 4);
  c.head_dim = c.hidden_size / c.num_attention_heads;
  c.max_position_embeddings = std::max<int64_t>(4096, context + prefill + 1);

  auto ctx = Take(ops::Context::ForDevice(device), "context");
  model::ModelOptions mo;
  mo.trainable = false;
  auto m = Take(model::LlamaModel::Create(*ctx, c, mo), "LlamaModel::Create");
  Check(m->InitRandom(1, 0.02f), "InitRandom");
  constexpr int64_t kBlock = 16;
  auto infer = Take(serve::InferModel::Create(*ctx, *m, kBlock), "InferModel::Create");
  const int64_t L = c.num_hidden_layers;
  const int64_t positions = std::max(context + 1, prefill);
  const int64_t blocks_per_seq = (positions + kBlock - 1) / kBlock;
  const int64_t page_bytes = (infer->kv_block_bytes() + 255) / 256 * 256;
  serve::PagePool pool =
      Take(serve::PagePool::Create(ctx->allocator(), page_bytes, B * L * blocks_per_seq + 1), "pool");
  Tensor pages = pool.PagesAs(infer->compute_dtype());
  std::vector<std::vector<std::vector<int32_t>>> blocks(B, std::vector<std::vector<int32_t>>(L));
  for (int64_t s = 0; s < B; ++s) {
    for (int64_t l = 0; l < L; ++l) {
      if (!pool.Allocate(serve::PageUse::kKv, blocks_per_seq, &blocks[s][l])) {
        std::fprintf(stderr, "infer_bench: the KV pool is too small\n");
        return 1;
      }
    }
  }
  auto host = ops::Context::Cpu();
  std::vector<serve::AdapterWeights> weights;
  for (int64_t a = 0; a < A; ++a) {
    auto lora = RandomAdapter(*host, c, rank, 100 + a, all_linear);
    weights.push_back(Take(serve::AdapterWeights::FromLora(*ctx, *lora, m->compute_dtype()), "FromLora"));
  }
  std::vector<const serve::AdapterWeights*> ptrs;
  for (const auto& w : weights) ptrs.push_back(&w);

  // Weight bytes and the measured device copy bandwidth (for the decode floor).
  int64_t weight_bytes = 0;
  for (const model::Parameter& p : m->parameters()) weight_bytes += p.weight.num_bytes();
  double copy_gbps = 0;
  if (device.is_cuda()) {
    Tensor src = Take(Tensor::Empty({weight_bytes / 2}, DType::kBF16, ctx->allocator()), "copy src");
    Tensor dst = Take(Tensor::Empty({weight_bytes / 2}, DType::kBF16, ctx->allocator()), "copy dst");
    Check(CopyTensor(dst, src, ctx->stream()), "copy");
    Check(ctx->Synchronize(), "sync");
    const auto t0 = Clock::now();
    for (int i = 0; i < 5; ++i) Check(CopyTensor(dst, src, ctx->stream()), "copy");
    Check(ctx->Synchronize(), "sync");
    const double s = std::chrono::duration<double>(Clock::now() - t0).count() / 5;
    copy_gbps = 2.0 * static_cast<double>(weight_bytes) / s / 1e9;  // read + write
  }
  const int64_t kv_token_bytes = infer->kv_block_bytes() / kBlock * L;  // K and V, every layer
  const int64_t sms = Flag(kv, "sms", 0);
  if (sms > 0) {
    const int got = Take(ctx->CreateSmPartition(static_cast<int>(sms)), "CreateSmPartition");
    Check(ctx->UseSmPartition(true), "UseSmPartition");
    std::fprintf(stderr, "forwards on an SM partition of %d SMs\n", got);
  }

  auto batch = [&](bool decode, bool lora) {
    std::vector<serve::SeqChunk> seqs(B);
    for (int64_t s = 0; s < B; ++s) {
      serve::SeqChunk& ch = seqs[s];
      ch.start = decode ? context : 0;
      ch.tokens.assign(decode ? 1 : prefill, static_cast<int32_t>((s * 7 + 3) % c.vocab_size));
      // Sequences of one adapter adjacent, as the engine sorts them.
      ch.adapter = lora && A > 0 ? static_cast<int32_t>(s * A / B) : -1;
      ch.blocks = &blocks[s];
    }
    return seqs;
  };
  for (const bool decode : {true, false}) {
    for (const bool lora : {false, true}) {
      if (lora && A == 0) continue;
      const auto seqs = batch(decode, lora);
      const std::vector<const serve::AdapterWeights*> adapters = lora ? ptrs : std::vector<const serve::AdapterWeights*>{};
      auto once = [&] {
        Tensor logits = Take(infer->ForwardLogits(pages, seqs, adapters), "ForwardLogits");
        Check(ctx->Synchronize(), "sync");
      };
      auto time_ms = [&] {
        for (int i = 0; i < 3; ++i) once();  // warm-up; with graphs: eager, capture, replay
        const auto t0 = Clock::now();
        for (int64_t i = 0; i < iters; ++i) once();
        return 1e3 * std::chrono::duration<double>(Clock::now() - t0).count() / iters;
      };
      // Decode: launched op by op, then as CUDA graph replays (InferModel's default).
      infer->set_cuda_graphs(false);
      const double ms_eager = decode ? time_ms() : 0.0;
      infer->set_cuda_graphs(graphs);
      const double ms = time_ms();
      ops::Profiler prof;
      Check(prof.Begin(*ctx), "profiler");
      once();
      Check(prof.End(), "profiler");
      const ops::ProfileReport report = Take(prof.Collect(), "profile");
      nlohmann::json j = {{"bench", "infer"},
                          {"commit", GitCommit()},
                          {"device", device.ToString()},
                          {"case", decode ? "decode" : "prefill"},
                          {"lora", lora},
                          {"batch", B},
                          {"tokens", decode ? B : B * prefill},
                          {"context", decode ? context : 0},
                          {"adapters", lora ? A : 0},
                          {"rank", rank},
                          {"all_linear", all_linear},
                          {"ms", ms},
                          {"sms", sms},
                          {"cuda_graphs", graphs && decode && device.is_cuda()}};
      if (decode) j["ms_eager"] = ms_eager;
      if (decode && copy_gbps > 0) {
        const double bytes = static_cast<double>(weight_bytes) +
                             static_cast<double>(B) * static_cast<double>(context + 1) *
                                 static_cast<double>(kv_token_bytes);
        j["floor_ms"] = 1e3 * bytes / (copy_gbps * 1e9);
        j["copy_gb_per_s"] = copy_gbps;
      }
      std::printf("%s\n", j.dump().c_str());
      std::fprintf(stderr, "%s %s:\n%s", decode ? "decode" : "prefill", lora ? "lora" : "base",
                   report.ToTable().c_str());
      std::fflush(stdout);
    }
  }
  return 0;
}
