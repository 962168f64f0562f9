// Co-serving on the GPU, where fine-tuning runs on a second context (its own stream, at normal
// priority, beside inference's high-priority one; serve/internal/engine_impl.h). A LoRA job over
// a small random bf16 model trains while 4 clients stream greedy completions: its step losses
// and published adapter equal, bit for bit, those of whole micro-batches (busy_units 0, each
// waited for), of whole micro-batches on 16 SMs set apart while requests run (busy_sms; CUDA
// green contexts) and of a run with no requests, so nothing the inference stream does reaches
// the training math; every request finishes with all its tokens.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "model/llama.h"
#include "serve/engine.h"
#include "serve/finetune.h"
#include "tests/common/testing.h"
#include "tests/serve/serve_test_util.h"

namespace tandem::serve {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

const std::vector<std::pair<std::string, std::string>> kPairs = {
    {"red", "sun"}, {"cat", "ink"}, {"map", "owl"}, {"jam", "fig"},
    {"bus", "ice"}, {"hat", "elm"}, {"pen", "yak"}, {"cup", "wax"}};

// Runs one greedy request of `max_tokens` tokens (EOS ignored); returns its finish reason.
std::string Generate(Engine& engine, const std::string& prompt, int max_tokens) {
  std::mutex mu;
  std::condition_variable cv;
  std::string reason;
  size_t tokens = 0;
  GenerationRequest r;
  r.model = "base";
  r.prompt_tokens = test_util::ByteIds(prompt);
  r.sampling.temperature = 0.0f;
  r.sampling.max_tokens = max_tokens;
  r.sampling.ignore_eos = true;
  StatusOr<RequestId> id = engine.Submit(std::move(r), [&](const TokenEvent& e) {
    std::lock_guard<std::mutex> lock(mu);
    tokens += e.has_token;
    if (e.finished) {
      reason = e.finish_reason.empty() ? "?" : e.finish_reason;
      if (!e.error.empty()) reason += ": " + e.error;
      cv.notify_all();
    }
  });
  if (!id.ok()) return "submit: " + id.status().ToString();
  std::unique_lock<std::mutex> lock(mu);
  if (!cv.wait_for(lock, std::chrono::seconds(60), [&] { return !reason.empty(); })) {
    return "timeout";
  }
  if (reason == "length" && tokens != static_cast<size_t>(max_tokens)) {
    return StrCat("length after ", tokens, " tokens");
  }
  return reason;
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(CoserveGpu, FineTuningOnItsOwnStreamTrainsBitwiseBesideInference) {
  TANDEM_SKIP_WITHOUT_GPU();
  testing::TempDir dir;
  const model::LlamaConfig c = test_util::SmallGpuServeConfig();
  test_util::SaveRandomModel(c, dir.Join("model"), 5, 0.2f, DType::kBF16);
  std::filesystem::create_directories(dir.Join("data"));
  {
    std::ofstream f(dir.Join("data/pairs.jsonl"));
    for (int rep = 0; rep < 4; ++rep) {
      for (const auto& [word, answer] : kPairs) {
        f << json{{"prompt", word + "="}, {"completion", answer}}.dump() << "\n";
      }
    }
  }

  struct Run {
    int64_t busy_units;
    int clients;
    int64_t busy_sms = 0;
  };
  std::vector<std::vector<double>> losses;
  std::vector<std::string> adapters;
  for (const Run run : {Run{1, 4}, Run{0, 4}, Run{2, 0}, Run{0, 4, 16}}) {
    SCOPED_TRACE(StrCat("busy_units ", run.busy_units, ", ", run.clients, " clients, busy_sms ",
                        run.busy_sms));
    EngineOptions o;
    o.model_dir = dir.Join("model");
    o.model_name = "base";
    o.device = "cuda:0";
    o.pool_bytes = 64 << 20;
    o.page_bytes = 16 << 10;
    o.max_batch_tokens = 64;
    o.finetune.micro_batch_tokens = 48;
    o.finetune.busy_units = run.busy_units;
    o.finetune.busy_sms = run.busy_sms;
    o.finetune.publish_dir = dir.Join(StrCat("adapters-", losses.size()));
    auto engine = std::move(Engine::Create(o)).value();
    FineTuneJobSpec spec;
    spec.training_file = dir.Join("data/pairs.jsonl");
    spec.adapter = "pairs";
    spec.hyper.n_epochs = 2;
    spec.hyper.batch_size = 4;
    spec.hyper.learning_rate = 1e-2;
    spec.hyper.lora_r = 8;
    spec.hyper.lora_alpha = 16;
    spec.hyper.target_modules = {"all-linear"};
    spec.hyper.seed = 3;
    spec.examples =
        std::move(ReadFineTuneFile(spec.training_file, engine->tokenizer(), nullptr, 96)).value();
    ASSERT_EQ(spec.examples.size(), 32u);

    std::atomic<bool> stop{false};
    std::atomic<int> completed{0}, failed{0};
    std::mutex mu;
    std::string first_failure;
    std::vector<std::thread> clients;
    for (int k = 0; k < run.clients; ++k) {
      clients.emplace_back([&, k] {
        while (!stop.load()) {
          const std::string reason = Generate(*engine, kPairs[k].first + "=", 24);
          if (reason == "length") {
            ++completed;
          } else {
            ++failed;
            std::lock_guard<std::mutex> lock(mu);
            first_failure = reason;
          }
        }
      });
    }
    if (run.clients > 0) {  // the job starts with requests already running
      const auto deadline = Clock::now() + std::chrono::seconds(30);
      while (completed.load() < run.clients && Clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
    StatusOr<FineTuneJobInfo> job = engine->CreateFineTuneJob(spec);
    ASSERT_TRUE(job.ok()) << job.status().ToString();
    const int completed_before = completed.load();
    const FineTuneJobInfo done = test_util::WaitJobFinished(*engine, job->id, 120);
    const int completed_during = completed.load() - completed_before;
    stop = true;
    for (std::thread& t : clients) t.join();

    EXPECT_EQ(done.status, "succeeded") << done.error;
    EXPECT_EQ(failed.load(), 0) << first_failure;
    if (run.clients > 0) {
      EXPECT_GT(completed_during, 0) << "inference should run during the job";
    }
    ASSERT_EQ(done.step_losses.size(), 16u);
    EXPECT_LT(done.step_losses.back(), done.step_losses.front())
        << "losses " << json(done.step_losses).dump();
    losses.push_back(done.step_losses);
    adapters.push_back(Slurp(
        dir.Join(StrCat("adapters-", losses.size() - 1, "/pairs-v2/adapter_model.safetensors"))));
    EXPECT_FALSE(adapters.back().empty());
  }
  ASSERT_EQ(losses.size(), 4u);
  EXPECT_EQ(losses[0], losses[1]);
  EXPECT_EQ(losses[2], losses[1]);
  EXPECT_EQ(losses[3], losses[1]);
  EXPECT_TRUE(adapters[0] == adapters[1]) << "sliced and whole micro-batches differ";
  EXPECT_TRUE(adapters[2] == adapters[1]) << "with and without requests differ";
  EXPECT_TRUE(adapters[3] == adapters[1]) << "on the SMs set apart and on the whole device differ";
}

}  // namespace
}  // namespace tandem::serve
