// The serving engine on the CPU with a tiny random model saved to a temporary directory (byte
// tokenizer): greedy output equals a LlamaModel::Logits greedy loop for the base model and for
// LoRA adapters of different ranks mixed in one batch; requests joining mid-flight; preemption
// under a tiny pool; cancel frees pages; stop strings; max_tokens; seeded sampling; queue full.
#include "serve/engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include "model/llama.h"
#include "ops/context.h"
#include "peft/adapter_io.h"
#include "peft/adapter_set.h"
#include "peft/lora.h"
#include "peft/s2ft.h"
#include "peft/s2ft_io.h"
#include "tests/common/testing.h"
#include "tests/serve/serve_test_util.h"

namespace tandem::serve {
namespace {

using testing::RandomUniform;
using testing::TempDir;

constexpr int64_t kByteVocab = 259;

model::LlamaConfig TinyConfig() { return test_util::TinyServeConfig(270, 96); }

std::vector<int32_t> Ids(const std::string& text) { return test_util::ByteIds(text); }

// Collects events per request; Wait blocks until every submitted request finished.
class Sink {
 public:
  EventCallback For() {
    return [this](const TokenEvent& e) {
      std::lock_guard<std::mutex> lock(mu_);
      Result& r = results_[e.id];
      if (e.has_token) r.ids.push_back(e.token);
      r.text += e.text;
      if (e.finished) {
        r.done = true;
        r.reason = e.finish_reason;
        r.error = e.error;
        cv_.notify_all();
      }
    };
  }
  struct Result {
    std::vector<int32_t> ids;
    std::string text, reason, error;
    bool done = false;
  };
  Result Wait(RequestId id) {
    std::unique_lock<std::mutex> lock(mu_);
    EXPECT_TRUE(cv_.wait_for(lock, std::chrono::seconds(60), [&] { return results_[id].done; }))
        << "request " << id << " did not finish";
    return results_[id];
  }
  size_t Tokens(RequestId id) {
    std::lock_guard<std::mutex> lock(mu_);
    return results_[id].ids.size();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<RequestId, Result> results_;
};

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model::ModelOptions o;
    o.trainable = false;
    model_ = std::move(model::LlamaModel::Create(*ctx_, TinyConfig(), o)).value();
    TANDEM_CHECK_OK(model_->InitRandom(77, 0.5f));
    TANDEM_CHECK_OK(model_->SaveSafetensors(dir_.Join("model"), DType::kF32));
    MakeAdapter("a", 4, {"all-linear"}, 100);
    MakeAdapter("b", 2, {"q_proj", "v_proj", "down_proj"}, 200);
    options_.model_dir = dir_.Join("model");
    options_.model_name = "base";
    options_.device = "cpu";
    options_.pool_bytes = 1 << 20;
    options_.page_bytes = 1024;
    options_.max_batch_tokens = 16;  // prompts are prefilled in several chunks
    options_.adapters = {{"a", dir_.Join("a")}, {"b", dir_.Join("b")}};
  }

  void MakeAdapter(const std::string& name, int64_t r, std::vector<std::string> targets,
                   uint64_t seed) {
    peft::LoraConfig lc;
    lc.r = r;
    lc.alpha = 2.0 * r;
    lc.target_modules = targets;
    auto adapter = std::move(peft::LoraAdapter::Create(*ctx_, TinyConfig(), lc)).value();
    for (size_t i = 0; i < adapter->parameters().size(); ++i) {  // nonzero B
      TANDEM_CHECK_OK(adapter->SetFromHost(
          i, RandomUniform(adapter->parameters()[i].weight.shape(), seed + i, -0.5f, 0.5f)));
    }
    TANDEM_CHECK_OK(peft::SaveLoraAdapter(*adapter, dir_.Join(name)));
  }

  // Greedy over LlamaModel::Logits of the whole sequence, optionally with an adapter.
  std::vector<int32_t> Reference(const std::string& adapter, std::vector<int32_t> ids, int steps) {
    std::unique_ptr<peft::AdapterSet> set;
    if (!adapter.empty()) {
      set = std::make_unique<peft::AdapterSet>(*ctx_, TinyConfig());
      TANDEM_CHECK_OK(set->Add(
          std::move(peft::LoadLoraAdapter(*ctx_, TinyConfig(), dir_.Join(adapter))).value()));
      model_->SetAdapter(set.get());
    }
    std::vector<int32_t> out = test_util::GreedyTokens(*model_, std::move(ids), steps, kByteVocab);
    model_->SetAdapter(nullptr);
    return out;
  }

  GenerationRequest Greedy(const std::string& model, const std::string& prompt, int max_tokens) {
    GenerationRequest r;
    r.model = model;
    r.prompt_tokens = Ids(prompt);
    r.sampling.temperature = 0.0f;
    r.sampling.max_tokens = max_tokens;
    r.sampling.ignore_eos = true;
    return r;
  }

  std::unique_ptr<Engine> MakeEngine(const EngineOptions& o) {
    StatusOr<std::unique_ptr<Engine>> e = Engine::Create(o);
    TANDEM_CHECK_OK(e);
    return std::move(e).value();
  }

  TempDir dir_;
  std::unique_ptr<ops::Context> ctx_ = ops::Context::Cpu();
  std::unique_ptr<model::LlamaModel> model_;
  EngineOptions options_;
};

struct Case {
  std::string model, prompt;
};
const std::vector<Case> kCases = {{"base", "The quick brown fox jumps"},
                                  {"a", "Hello there, general"},
                                  {"b", "x"},
                                  {"a", "A much longer prompt that needs several chunks."},
                                  {"base", "ok"},
                                  {"b", "Paged attention"}};

TEST_F(EngineTest, GreedyMatchesLogitsWithMixedAdaptersInOneBatch) {
  auto engine = MakeEngine(options_);
  Sink sink;
  std::vector<RequestId> ids;
  for (const Case& c : kCases)
    ids.push_back(*engine->Submit(Greedy(c.model, c.prompt, 10), sink.For()));
  for (size_t i = 0; i < kCases.size(); ++i) {
    const Sink::Result r = sink.Wait(ids[i]);
    const std::string adapter = kCases[i].model == "base" ? "" : kCases[i].model;
    EXPECT_EQ(r.ids, Reference(adapter, Ids(kCases[i].prompt), 10)) << "case " << i;
    EXPECT_EQ(r.reason, "length");
  }
  ASSERT_NE(Reference("a", Ids(kCases[0].prompt), 10), Reference("", Ids(kCases[0].prompt), 10))
      << "the adapter should change the greedy continuation";
  const EngineStats s = engine->Stats();
  EXPECT_EQ(s.pool_pages_kv, 0);
  EXPECT_GT(s.pool_pages_adapter, 0);
  EXPECT_EQ(s.generated_tokens, 10 * static_cast<int64_t>(kCases.size()));
}

// An S2FT adapter directory (tandem-s2ft) is served beside LoRA adapters, in LoRA form
// (peft::S2ftAsLora): greedy tokens equal LlamaModel with the S2FT blocks merged into its weights
// (checked on logits in tests/peft/s2ft_test.cc) run through the same LoRA form.
TEST_F(EngineTest, ServesAnS2ftAdapterBesideLoraAdapters) {
  test_util::SaveRandomS2ftAdapter(*ctx_, TinyConfig(), dir_.Join("s"), 300);
  EngineOptions o = options_;
  o.adapters.push_back({"s", dir_.Join("s")});
  auto engine = MakeEngine(o);
  auto s2ft = std::move(peft::LoadS2ftAdapter(*ctx_, TinyConfig(), dir_.Join("s"))).value();
  peft::AdapterSet set(*ctx_, TinyConfig());
  TANDEM_CHECK_OK(set.Add(std::move(peft::S2ftAsLora(*ctx_, *s2ft)).value()));
  Sink sink;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"s", "Structured sparse"}, {"a", "Hello there, general"}, {"s", "x"}};
  std::vector<RequestId> ids;
  for (const auto& [model, prompt] : cases) {
    ids.push_back(*engine->Submit(Greedy(model, prompt, 8), sink.For()));
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    const Sink::Result r = sink.Wait(ids[i]);
    std::vector<int32_t> want;
    if (cases[i].first == "s") {
      model_->SetAdapter(&set);
      want = test_util::GreedyTokens(*model_, Ids(cases[i].second), 8, kByteVocab);
      model_->SetAdapter(nullptr);
    } else {
      want = Reference(cases[i].first, Ids(cases[i].second), 8);
    }
    EXPECT_EQ(r.ids, want) << "case " << i;
  }
  EXPECT_NE(sink.Wait(ids[0]).ids, Reference("", Ids(cases[0].second), 8))
      << "the S2FT adapter should change the greedy continuation";
  // A directory that is neither adapter kind is refused, naming it.
  std::filesystem::create_directories(dir_.Join("empty"));
  const Status bad = engine->LoadAdapter("bad", dir_.Join("empty"));
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.ToString().find("empty"), std::string::npos) << bad.ToString();
  // A broken S2FT directory (its config not JSON) is refused, naming the adapter and the file;
  // "s" still serves.
  std::filesystem::create_directories(dir_.Join("broken"));
  std::filesystem::copy_file(dir_.Join("s/s2ft_model.safetensors"),
                             dir_.Join("broken/s2ft_model.safetensors"));
  {
    std::FILE* f = std::fopen(dir_.Join("broken/s2ft_config.json").c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fputs("{not json", f);
    std::fclose(f);
  }
  const Status broken = engine->LoadAdapter("broken", dir_.Join("broken"));
  EXPECT_EQ(broken.code(), StatusCode::kInvalidArgument) << broken.ToString();
  EXPECT_NE(broken.ToString().find("adapter 'broken'"), std::string::npos) << broken.ToString();
  EXPECT_NE(broken.ToString().find("s2ft_config.json"), std::string::npos) << broken.ToString();
  EXPECT_EQ(sink.Wait(*engine->Submit(Greedy("s", "x", 8), sink.For())).ids, sink.Wait(ids[2]).ids);
}

TEST_F(EngineTest, RequestsJoiningMidFlightGetTheSameTokens) {
  auto engine = MakeEngine(options_);
  Sink sink;
  const RequestId first = *engine->Submit(Greedy("a", kCases[1].prompt, 30), sink.For());
  while (sink.Tokens(first) < 5) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const RequestId second = *engine->Submit(Greedy("b", kCases[5].prompt, 12), sink.For());
  const RequestId third = *engine->Submit(Greedy("base", kCases[0].prompt, 12), sink.For());
  EXPECT_EQ(sink.Wait(first).ids, Reference("a", Ids(kCases[1].prompt), 30));
  EXPECT_EQ(sink.Wait(second).ids, Reference("b", Ids(kCases[5].prompt), 12));
  EXPECT_EQ(sink.Wait(third).ids, Reference("", Ids(kCases[0].prompt), 12));
}

TEST_F(EngineTest, PreemptionUnderATinyPoolGivesTheSameTokens) {
  EngineOptions o = options_;
  // 1 KiB pages of 8 positions per layer: 24 pages hold 2 requests of ~40 positions at most,
  // minus the adapters' pages.
  o.pool_bytes = 24 * 1024;
  o.adapters = {};
  auto engine = MakeEngine(o);
  Sink sink;
  std::vector<RequestId> ids;
  for (int i = 0; i < 4; ++i) {
    ids.push_back(*engine->Submit(Greedy("base", kCases[i].prompt, 24), sink.For()));
  }
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(sink.Wait(ids[i]).ids, Reference("", Ids(kCases[i].prompt), 24)) << "request " << i;
  }
  EXPECT_GT(engine->Stats().preemptions, 0);
  EXPECT_EQ(engine->Stats().pool_pages_kv, 0);
}

TEST_F(EngineTest, AdaptersReloadFromDiskAndEvictUnderPagePressure) {
  EngineOptions o = options_;
  o.host_adapter_cache = 0;  // adapters not in use go back to the disk tier
  // 28 pages of 1 KiB: adapter "a" takes 22, "b" 5 (the fused q/k/v and gate/up sites' B blocks
  // included), a 7-token request's KV 4 (2 layers x 2 blocks of 8 positions), so "b" plus its KV
  // evicts "a", and "a" plus its KV evicts "b".
  o.pool_bytes = 28 * 1024;
  auto engine = MakeEngine(o);
  Sink sink;
  for (int round = 0; round < 2; ++round) {
    for (const char* name : {"a", "b"}) {
      const Sink::Result r = sink.Wait(*engine->Submit(Greedy(name, "reload", 8), sink.For()));
      EXPECT_EQ(r.ids, Reference(name, Ids("reload"), 8)) << name << " round " << round;
    }
  }
  EXPECT_EQ(engine->Stats().adapter_loads, 4);  // each use had to load: the pool holds one
  // Beyond the host tier an adapter is registered from its config and tensor headers (weights
  // read on first use), so a truncated weights file is still refused, naming the adapter.
  std::filesystem::create_directories(dir_.Join("trunc"));
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors"}) {
    std::filesystem::copy_file(dir_.Join(std::string("a/") + f),
                               dir_.Join(std::string("trunc/") + f));
  }
  const std::string weights = dir_.Join("trunc/adapter_model.safetensors");
  std::filesystem::resize_file(weights, std::filesystem::file_size(weights) / 2);
  const Status trunc = engine->LoadAdapter("trunc", dir_.Join("trunc"));
  EXPECT_EQ(trunc.code(), StatusCode::kInvalidArgument) << trunc.ToString();
  EXPECT_NE(trunc.ToString().find("adapter 'trunc'"), std::string::npos) << trunc.ToString();
  ASSERT_TRUE(engine->LoadAdapter("a2", dir_.Join("a")).ok());
  const Sink::Result r = sink.Wait(*engine->Submit(Greedy("a2", "reload", 8), sink.For()));
  EXPECT_EQ(r.ids, Reference("a", Ids("reload"), 8));
}

TEST_F(EngineTest, RequestsThatCanNeverFitFailInsteadOfWaitingForever) {
  EngineOptions o = options_;
  o.pool_bytes = 12 * 1024;  // adapter "a" alone needs 22 pages
  auto engine = MakeEngine(o);
  Sink sink;
  const Sink::Result too_big = sink.Wait(*engine->Submit(Greedy("a", "x", 4), sink.For()));
  EXPECT_EQ(too_big.reason, "error");
  EXPECT_NE(too_big.error.find("pages"), std::string::npos) << too_big.error;
  // A prompt whose KV needs more than the pool (12 pages = 6 blocks of 8 positions per layer).
  const Sink::Result too_long =
      sink.Wait(*engine->Submit(Greedy("base", std::string(60, 'z'), 4), sink.For()));
  EXPECT_EQ(too_long.reason, "error");
  // The engine still serves what fits.
  const Sink::Result ok = sink.Wait(*engine->Submit(Greedy("b", "fits", 4), sink.For()));
  EXPECT_EQ(ok.ids, Reference("b", Ids("fits"), 4));
}

TEST_F(EngineTest, CancelFreesPages) {
  // The callback holds the engine thread after the second token until Cancel was called, so the
  // cancel lands mid-generation however fast the engine runs.
  std::mutex mu;
  std::condition_variable cv;
  bool cancelled = false;
  Sink sink;
  auto engine = MakeEngine(options_);
  EventCallback record = sink.For();
  auto hold_after_two = [&](const TokenEvent& e) {
    record(e);
    if (!e.has_token || e.completion_tokens != 2) return;
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return cancelled; });
  };
  const RequestId id = *engine->Submit(Greedy("a", kCases[3].prompt, 40), hold_after_two);
  while (sink.Tokens(id) < 2) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  engine->Cancel(id);
  {
    std::lock_guard<std::mutex> lock(mu);
    cancelled = true;
    cv.notify_all();
  }
  const Sink::Result r = sink.Wait(id);
  EXPECT_EQ(r.reason, "cancelled");
  EXPECT_LT(r.ids.size(), 40u);
  for (int i = 0; i < 1000 && engine->Stats().pool_pages_kv != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(engine->Stats().pool_pages_kv, 0);
  engine->Cancel(12345);  // unknown: ignored
}

TEST_F(EngineTest, StopStringsAndMaxTokens) {
  auto engine = MakeEngine(options_);
  Sink sink;
  const Sink::Result full = sink.Wait(*engine->Submit(Greedy("base", "Stop here", 20), sink.For()));
  ASSERT_EQ(full.ids.size(), 20u);
  const std::string text = model::MakeByteTokenizer()->Decode(full.ids, true);
  EXPECT_EQ(full.text, text);
  ASSERT_GE(text.size(), 8u);
  GenerationRequest req = Greedy("base", "Stop here", 20);
  req.sampling.stop = {"\x01\x02 never", text.substr(4, 3)};
  const size_t at = text.find(text.substr(4, 3));
  const Sink::Result stopped = sink.Wait(*engine->Submit(req, sink.For()));
  EXPECT_EQ(stopped.reason, "stop");
  EXPECT_EQ(stopped.text, text.substr(0, at));
  req = Greedy("base", "Stop here", 5);
  const Sink::Result short_run = sink.Wait(*engine->Submit(req, sink.For()));
  EXPECT_EQ(short_run.reason, "length");
  EXPECT_EQ(short_run.ids, std::vector<int32_t>(full.ids.begin(), full.ids.begin() + 5));
}

TEST_F(EngineTest, SeededSamplingIsReproducible) {
  auto engine = MakeEngine(options_);
  Sink sink;
  auto run = [&](uint64_t seed) {
    GenerationRequest r = Greedy("a", "Sample me", 16);
    r.sampling.temperature = 1.0f;
    r.sampling.top_p = 0.9f;
    r.sampling.has_seed = true;
    r.sampling.seed = seed;
    r.sampling.logprobs = 3;
    return sink.Wait(*engine->Submit(r, sink.For())).ids;
  };
  const std::vector<int32_t> a = run(5);
  EXPECT_EQ(run(5), a);
  EXPECT_NE(run(6), a);
}

TEST_F(EngineTest, RejectsBadRequestsAndAFullQueue) {
  EngineOptions o = options_;
  o.max_running = 1;
  o.max_waiting = 1;
  auto engine = MakeEngine(o);
  Sink sink;
  EXPECT_EQ(engine->Submit(Greedy("nope", "x", 4), sink.For()).status().code(),
            StatusCode::kNotFound);
  GenerationRequest empty = Greedy("base", "", 4);
  empty.prompt_tokens.clear();
  EXPECT_EQ(engine->Submit(empty, sink.For()).status().code(), StatusCode::kInvalidArgument);
  GenerationRequest bad = Greedy("base", "x", 4);
  bad.sampling.top_p = 0.0f;
  EXPECT_EQ(engine->Submit(bad, sink.For()).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->Submit(Greedy("base", "x", 1000), sink.For()).status().code(),
            StatusCode::kInvalidArgument);
  int unavailable = 0;
  std::vector<RequestId> accepted;
  for (int i = 0; i < 5; ++i) {
    StatusOr<RequestId> id = engine->Submit(Greedy("base", "queue", 40), sink.For());
    if (id.ok())
      accepted.push_back(*id);
    else
      unavailable += id.status().code() == StatusCode::kUnavailable;
  }
  EXPECT_GE(unavailable, 3);
  for (RequestId id : accepted) EXPECT_EQ(sink.Wait(id).reason, "length");
  ASSERT_TRUE(engine->UnloadAdapter("b").ok());
  EXPECT_EQ(engine->UnloadAdapter("b").code(), StatusCode::kNotFound);
  EXPECT_EQ(engine->Models().size(), 2u);
  ASSERT_TRUE(engine->LoadAdapter("b@2", dir_.Join("b")).ok());
  EXPECT_FALSE(engine->LoadAdapter("b@2", dir_.Join("b")).ok());
  const Sink::Result r = sink.Wait(*engine->Submit(Greedy("b", "v", 6), sink.For()));
  EXPECT_EQ(r.ids, Reference("b", Ids("v"), 6));
}

}  // namespace
}  // namespace tandem::serve
