// The engine on CUDA (bf16 weights and KV pages, adapters copied to the device and charged in
// the pool): mixed-adapter requests all finish with the requested number of tokens, their pages
// come back, a seeded request run alone twice gives the same tokens, and greedy decoding with an
// adapter (a LoRA one, and an S2FT one served in LoRA form) differs from the base model, and
// decode steps replay CUDA graphs. Numerical parity is engine_infer_gpu_test's job.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>

#include "model/llama.h"
#include "peft/adapter_io.h"
#include "peft/lora.h"
#include "serve/engine.h"
#include "tests/common/testing.h"
#include "tests/serve/serve_test_util.h"

namespace tandem::serve {
namespace {

struct Done {
  std::vector<int32_t> ids;
  std::string reason;
};

class Collector {
 public:
  EventCallback For() {
    return [this](const TokenEvent& e) {
      std::lock_guard<std::mutex> lock(mu_);
      if (e.has_token) out_[e.id].ids.push_back(e.token);
      if (e.finished) {
        out_[e.id].reason = e.finish_reason;
        cv_.notify_all();
      }
    };
  }
  Done Wait(RequestId id) {
    std::unique_lock<std::mutex> lock(mu_);
    EXPECT_TRUE(
        cv_.wait_for(lock, std::chrono::seconds(120), [&] { return !out_[id].reason.empty(); }));
    return out_[id];
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<RequestId, Done> out_;
};

TEST(EngineGpu, ServesMixedAdapters) {
  TANDEM_SKIP_WITHOUT_GPU();
  testing::TempDir dir;
  auto cpu = ops::Context::Cpu();
  const model::LlamaConfig c = test_util::SmallGpuServeConfig();
  test_util::SaveRandomModel(c, dir.Join("model"), 5, 0.2f, DType::kBF16);
  for (int a = 0; a < 2; ++a) {
    peft::LoraConfig lc;
    lc.r = a == 0 ? 8 : 4;
    lc.alpha = 16;
    lc.target_modules = {a == 0 ? "all-linear" : "q_proj"};
    auto ad = std::move(peft::LoraAdapter::Create(*cpu, c, lc)).value();
    for (size_t i = 0; i < ad->parameters().size(); ++i) {
      TANDEM_CHECK_OK(ad->SetFromHost(
          i, testing::RandomUniform(ad->parameters()[i].weight.shape(), 10 * a + i, -0.5f, 0.5f)));
    }
    TANDEM_CHECK_OK(peft::SaveLoraAdapter(*ad, dir.Join("a" + std::to_string(a))));
  }
  // An S2FT adapter (coupled: row and column blocks), served in LoRA form.
  test_util::SaveRandomS2ftAdapter(*cpu, c, dir.Join("s"), 50);
  EngineOptions o;
  o.model_dir = dir.Join("model");
  o.model_name = "base";
  o.device = "cuda:0";
  o.pool_bytes = 64 << 20;
  o.page_bytes = 16 << 10;
  o.max_batch_tokens = 64;
  o.adapters = {{"a0", dir.Join("a0")}, {"a1", dir.Join("a1")}, {"s", dir.Join("s")}};
  auto engine = std::move(Engine::Create(o)).value();
  Collector col;
  auto request = [](const std::string& model, int n, int max_tokens) {
    GenerationRequest r;
    r.model = model;
    for (int i = 0; i < n; ++i) r.prompt_tokens.push_back((i * 37 + 11) % 256);
    r.sampling.temperature = 0.0f;
    r.sampling.max_tokens = max_tokens;
    r.sampling.ignore_eos = true;
    return r;
  };
  std::vector<RequestId> ids;
  const char* models[] = {"base", "a0", "a1", "a0", "base", "a1", "s"};
  for (int i = 0; i < 7; ++i)
    ids.push_back(*engine->Submit(request(models[i], 20 + 30 * i, 12), col.For()));
  for (RequestId id : ids) {
    const Done d = col.Wait(id);
    EXPECT_EQ(d.reason, "length");
    EXPECT_EQ(d.ids.size(), 12u);
  }
  EXPECT_EQ(engine->Stats().pool_pages_kv, 0);
  EXPECT_GT(engine->Stats().pool_pages_adapter, 0);
  // Alone, twice: identical (same batch shapes); the adapter changes the continuation.
  GenerationRequest seeded = request("a0", 40, 16);
  seeded.sampling.temperature = 0.8f;
  seeded.sampling.has_seed = true;
  seeded.sampling.seed = 9;
  const Done s1 = col.Wait(*engine->Submit(seeded, col.For()));
  const Done s2 = col.Wait(*engine->Submit(seeded, col.For()));
  EXPECT_EQ(s1.ids, s2.ids);
  const Done base = col.Wait(*engine->Submit(request("base", 40, 16), col.For()));
  const Done adapted = col.Wait(*engine->Submit(request("a0", 40, 16), col.For()));
  EXPECT_NE(base.ids, adapted.ids);
  const Done s2ft = col.Wait(*engine->Submit(request("s", 40, 16), col.For()));
  EXPECT_NE(base.ids, s2ft.ids);
  // Decode steps of repeated shapes ran as CUDA graph replays.
  EXPECT_GT(engine->Stats().decode_graph_captures, 0);
  EXPECT_GT(engine->Stats().decode_graph_replays, 0);
}

}  // namespace
}  // namespace tandem::serve
