// Co-serving: fine-tuning jobs inside the serving engine, on the CPU with a tiny random model
// (byte tokenizer). A LoRA job learns a word-to-word map while 8 clients stream completions: its
// loss falls, the published adapter answers the task better than the base model, and no request
// fails; versions load as name@v; cancel; a job resumes from its snapshot after the engine is
// destroyed (same losses, bit for bit, as an uninterrupted run); the HTTP API and its errors.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "model/llama.h"
#include "model/tokenizer.h"
#include "ops/context.h"
#include "peft/s2ft_io.h"
#include "serve/chat_template.h"
#include "serve/engine.h"
#include "serve/finetune.h"
#include "serve/http_server.h"
#include "serve/internal/finetune_job.h"
#include "serve/internal/http_lib.h"
#include "tests/common/testing.h"
#include "tests/serve/serve_test_util.h"

namespace tandem::serve {
namespace {

using nlohmann::json;
using testing::TempDir;
using Clock = std::chrono::steady_clock;

model::LlamaConfig TinyConfig() { return test_util::TinyServeConfig(270, 96); }

// The task: each word maps to a fixed other word.
const std::vector<std::pair<std::string, std::string>> kPairs = {
    {"red", "sun"}, {"cat", "ink"}, {"map", "owl"}, {"jam", "fig"},
    {"bus", "ice"}, {"hat", "elm"}, {"pen", "yak"}, {"cup", "wax"}};

std::vector<int32_t> Ids(const std::string& text) { return test_util::ByteIds(text); }

// Waits for one request's events; returns its text and finish reason.
struct Outcome {
  std::string text, reason, error;
};

Outcome Generate(Engine& engine, const std::string& model, const std::string& prompt,
                 int max_tokens, bool greedy) {
  std::mutex mu;
  std::condition_variable cv;
  Outcome out;
  bool done = false;
  GenerationRequest r;
  r.model = model;
  r.prompt_tokens = Ids(prompt);
  r.sampling.temperature = greedy ? 0.0f : 1.0f;
  r.sampling.max_tokens = max_tokens;
  StatusOr<RequestId> id = engine.Submit(std::move(r), [&](const TokenEvent& e) {
    std::lock_guard<std::mutex> lock(mu);
    out.text += e.text;
    if (e.finished) {
      out.reason = e.finish_reason;
      out.error = e.error;
      done = true;
      cv.notify_all();
    }
  });
  if (!id.ok()) return {"", "submit", id.status().ToString()};
  std::unique_lock<std::mutex> lock(mu);
  if (!cv.wait_for(lock, std::chrono::seconds(30), [&] { return done; })) {
    return {"", "timeout", ""};
  }
  return out;
}

// Greedy exact-match accuracy of `model` on the task (the answer then EOS).
double Accuracy(Engine& engine, const std::string& model) {
  int right = 0;
  for (const auto& [word, answer] : kPairs) {
    const Outcome o = Generate(engine, model, word + "=", 4, /*greedy=*/true);
    EXPECT_NE(o.reason, "error") << o.error;
    right += o.text == answer;
  }
  return static_cast<double>(right) / kPairs.size();
}

FineTuneJobInfo WaitFinished(Engine& engine, const std::string& id, double seconds = 50) {
  return test_util::WaitJobFinished(engine, id, seconds);
}

FineTuneJobInfo WaitStep(Engine& engine, const std::string& id, int64_t step) {
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while (true) {
    FineTuneJobInfo job = *engine.GetFineTuneJob(id);
    const bool active = job.status == "running" || job.status == "queued";
    if (job.step >= step || !active || Clock::now() > deadline) {
      return job;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

class CoserveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model::ModelOptions o;
    o.trainable = false;
    auto model = std::move(model::LlamaModel::Create(*ctx_, TinyConfig(), o)).value();
    TANDEM_CHECK_OK(model->InitRandom(5, 0.5f));
    TANDEM_CHECK_OK(model->SaveSafetensors(dir_.Join("model"), DType::kF32));
    std::filesystem::create_directories(dir_.Join("data"));
    std::ofstream f(dir_.Join("data/pairs.jsonl"));
    for (int rep = 0; rep < 4; ++rep) {
      for (const auto& [word, answer] : kPairs) {
        f << json{{"prompt", word + "="}, {"completion", answer}}.dump() << "\n";
      }
    }
    f.close();
    options_.model_dir = dir_.Join("model");
    options_.model_name = "base";
    options_.device = "cpu";
    options_.pool_bytes = 1 << 20;
    options_.page_bytes = 1024;
    options_.max_batch_tokens = 64;
    options_.finetune.publish_dir = dir_.Join("adapters");
    options_.finetune.state_dir = dir_.Join("state");
    options_.finetune.micro_batch_tokens = 48;
    options_.finetune.snapshot_every_steps = 2;
  }

  std::unique_ptr<Engine> MakeEngine() {
    StatusOr<std::unique_ptr<Engine>> e = Engine::Create(options_);
    TANDEM_CHECK_OK(e);
    return std::move(e).value();
  }

  FineTuneJobSpec Spec(Engine& engine, const std::string& adapter, int64_t epochs,
                       int64_t batch_size = 8) {
    FineTuneJobSpec spec;
    spec.training_file = dir_.Join("data/pairs.jsonl");
    spec.adapter = adapter;
    spec.hyper.n_epochs = epochs;
    spec.hyper.batch_size = batch_size;
    spec.hyper.learning_rate = 2e-2;
    spec.hyper.lora_r = 8;
    spec.hyper.lora_alpha = 16;
    spec.hyper.target_modules = {"all-linear"};
    spec.hyper.seed = 3;
    spec.examples =
        std::move(ReadFineTuneFile(spec.training_file, engine.tokenizer(), nullptr, 96)).value();
    return spec;
  }

  TempDir dir_;
  std::unique_ptr<ops::Context> ctx_ = ops::Context::Cpu();
  EngineOptions options_;
};

TEST_F(CoserveTest, TrainsWhileEightClientsStreamAndPublishesVersions) {
  auto engine = MakeEngine();
  const double base_accuracy = Accuracy(*engine, "base");
  const std::string base_greedy =
      Generate(*engine, "base", kPairs[0].first + "=", 6, /*greedy=*/true).text;
  FineTuneJobSpec spec = Spec(*engine, "pairs", 6, /*batch_size=*/4);
  // 2e-2 sits at the edge of stability for 48 steps of batch 4: on some CPUs (GEMM summation
  // orders differ) it ended at 5/8 pairs; 1e-2 learns all 8 with margin.
  spec.hyper.learning_rate = 1e-2;
  ASSERT_EQ(spec.examples.size(), 32u);
  StatusOr<FineTuneJobInfo> job = engine->CreateFineTuneJob(spec);
  ASSERT_TRUE(job.ok()) << job.status().ToString();
  EXPECT_EQ(job->total_steps, 8 * 6);

  std::atomic<bool> stop{false};
  std::atomic<int> completed{0}, failed{0}, base_changed{0};
  std::mutex mu;
  std::string first_failure;
  std::vector<std::thread> clients;
  for (int c = 0; c < 8; ++c) {
    clients.emplace_back([&, c] {
      while (!stop.load()) {
        // After the first publication half the clients ask for the newest version; client 0
        // checks that the base model's greedy answer never sees the training adapter.
        const bool adapted = c % 2 == 1 && !engine->GetFineTuneJob(job->id)->published.empty();
        const Outcome o = Generate(*engine, adapted ? "pairs" : "base", kPairs[c].first + "=", 6,
                                   /*greedy=*/c == 0);
        if (c == 0 && o.text != base_greedy) ++base_changed;
        if (o.reason == "stop" || o.reason == "length") {
          ++completed;
        } else {
          ++failed;
          std::lock_guard<std::mutex> lock(mu);
          first_failure = o.reason + ": " + o.error;
        }
      }
    });
  }
  const FineTuneJobInfo done = WaitFinished(*engine, job->id);
  const int completed_while_training = completed.load();
  stop = true;
  for (std::thread& t : clients) t.join();

  EXPECT_EQ(done.status, "succeeded") << done.error;
  EXPECT_EQ(done.step, 48);
  ASSERT_EQ(done.step_losses.size(), 48u);
  EXPECT_LT(done.step_losses.back(), 0.5 * done.step_losses.front())
      << "losses " << json(done.step_losses).dump();
  EXPECT_EQ(failed.load(), 0) << first_failure;
  EXPECT_EQ(base_changed.load(), 0) << "the base model's output changed during training";
  EXPECT_GE(completed_while_training, 8) << "inference should keep running during the job";
  EXPECT_GT(done.trained_tokens, 0);
  ASSERT_EQ(done.published.size(), 6u);  // one version per epoch
  EXPECT_EQ(done.published.front(), "pairs@1");
  EXPECT_EQ(done.published.back(), "pairs@6");

  const double tuned_accuracy = Accuracy(*engine, "pairs");  // the newest version
  EXPECT_GT(tuned_accuracy, base_accuracy);
  EXPECT_GE(tuned_accuracy, 0.75) << "base model " << base_accuracy;  // 1 and 0 when written
  // A specific version, and the listing.
  const Outcome v1 = Generate(*engine, "pairs@1", "red=", 4, true);
  EXPECT_EQ(v1.reason == "stop" || v1.reason == "length", true) << v1.error;
  int listed = 0;
  for (const ModelInfo& m : engine->Models()) listed += m.id.rfind("pairs@", 0) == 0;
  EXPECT_EQ(listed, 6);
  EXPECT_TRUE(std::filesystem::exists(dir_.Join("adapters/pairs-v6/adapter_model.safetensors")));
  const EngineStats s = engine->Stats();
  EXPECT_EQ(s.finetune_steps, 48);
  EXPECT_EQ(s.finetune_tokens, done.trained_tokens);
  EXPECT_EQ(s.finetune_jobs_running, 0);
}

// With requests running, the fine-tuning thread enqueues FineTuneOptions::busy_units units per
// engine iteration (no limit with busy_units = 0); the math is the same, so the job's losses and
// published adapters are equal bit for bit, while clients stream.
TEST_F(CoserveTest, SlicedMicroBatchesTrainBitwiseTheWholeOnes) {
  auto slurp = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  std::vector<std::vector<double>> losses;
  std::vector<std::string> adapters;
  for (int64_t units : {1, 0, 3}) {
    SCOPED_TRACE(StrCat("busy_units ", units));
    options_.finetune.busy_units = units;
    options_.finetune.publish_dir = dir_.Join(StrCat("adapters-", units));
    options_.finetune.state_dir = dir_.Join(StrCat("state-", units));
    auto engine = MakeEngine();
    FineTuneJobSpec spec = Spec(*engine, "pairs", 2, /*batch_size=*/4);
    spec.hyper.learning_rate = 1e-2;
    StatusOr<FineTuneJobInfo> job = engine->CreateFineTuneJob(spec);
    ASSERT_TRUE(job.ok()) << job.status().ToString();
    std::atomic<bool> stop{false};
    std::atomic<int> failed{0};
    std::vector<std::thread> clients;
    for (int c = 0; c < 4; ++c) {
      clients.emplace_back([&, c] {
        while (!stop.load()) {
          const Outcome o = Generate(*engine, "base", kPairs[c].first + "=", 6, c % 2 == 0);
          if (o.reason != "stop" && o.reason != "length") ++failed;
        }
      });
    }
    const FineTuneJobInfo done = WaitFinished(*engine, job->id);
    stop = true;
    for (std::thread& t : clients) t.join();
    EXPECT_EQ(done.status, "succeeded") << done.error;
    EXPECT_EQ(failed.load(), 0);
    ASSERT_EQ(done.step_losses.size(), 16u);
    losses.push_back(done.step_losses);
    adapters.push_back(
        slurp(dir_.Join(StrCat("adapters-", units, "/pairs-v2/adapter_model.safetensors"))));
    EXPECT_FALSE(adapters.back().empty());
  }
  EXPECT_EQ(losses[0], losses[1]);
  EXPECT_EQ(losses[2], losses[1]);
  EXPECT_TRUE(adapters[0] == adapters[1]);
  EXPECT_TRUE(adapters[2] == adapters[1]);
}

// finetune.busy_sms sets SMs apart on a GPU; a CPU engine has none to set apart and runs as
// without it (tests/serve/coserve_gpu_test.cc covers the GPU), and a negative count is refused.
TEST_F(CoserveTest, BusySmsIsRefusedWhenNegativeAndHasNoEffectOnACpu) {
  options_.finetune.busy_sms = -1;
  StatusOr<std::unique_ptr<Engine>> bad = Engine::Create(options_);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("busy_sms"), std::string::npos) << bad.status().ToString();
  options_.finetune.busy_sms = 8;
  auto engine = MakeEngine();
  StatusOr<FineTuneJobInfo> job = engine->CreateFineTuneJob(Spec(*engine, "pairs", 1, 4));
  ASSERT_TRUE(job.ok()) << job.status().ToString();
  const Outcome o = Generate(*engine, "base", kPairs[0].first + "=", 6, true);
  EXPECT_TRUE(o.reason == "stop" || o.reason == "length") << o.error;
  const FineTuneJobInfo done = WaitFinished(*engine, job->id);
  EXPECT_EQ(done.status, "succeeded") << done.error;
}

// An S2FT job trains its blocks in LoRA form beside inference, with the one-hot factors frozen,
// and publishes S2FT adapter directories that the server loads back: the served newest version
// answers the task (so the export carries what was trained) and the base model never changes.
TEST_F(CoserveTest, TrainsAnS2ftJobAndPublishesS2ftVersions) {
  auto engine = MakeEngine();
  const double base_accuracy = Accuracy(*engine, "base");
  const std::string base_greedy =
      Generate(*engine, "base", kPairs[0].first + "=", 6, /*greedy=*/true).text;
  FineTuneJobSpec spec = Spec(*engine, "sparse", 8, /*batch_size=*/4);
  spec.method = "s2ft";
  spec.hyper.heads_fraction = 0.5;
  spec.hyper.ffn_fraction = 0.5;
  spec.hyper.learning_rate = 2e-2;
  StatusOr<FineTuneJobInfo> job = engine->CreateFineTuneJob(spec);
  ASSERT_TRUE(job.ok()) << job.status().ToString();
  const FineTuneJobInfo done = WaitFinished(*engine, job->id, 120);
  EXPECT_EQ(done.status, "succeeded") << done.error;
  ASSERT_EQ(done.step_losses.size(), 64u);
  EXPECT_LT(done.step_losses.back(), 0.5 * done.step_losses.front())
      << "losses " << json(done.step_losses).dump();
  ASSERT_EQ(done.published.size(), 8u);  // one version per epoch
  EXPECT_EQ(done.published.back(), "sparse@8");
  // Published as S2FT directories (indices + dense blocks), not as LoRA files.
  EXPECT_TRUE(std::filesystem::exists(dir_.Join("adapters/sparse-v8/s2ft_config.json")));
  EXPECT_FALSE(std::filesystem::exists(dir_.Join("adapters/sparse-v8/adapter_config.json")));
  const double tuned_accuracy = Accuracy(*engine, "sparse");
  EXPECT_GT(tuned_accuracy, base_accuracy);
  EXPECT_GE(tuned_accuracy, 0.75) << "base model " << base_accuracy;
  EXPECT_EQ(Generate(*engine, "base", kPairs[0].first + "=", 6, /*greedy=*/true).text, base_greedy);
}

bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw_data(), b.raw_data(), a.num_bytes()) == 0;
}

// The S2FT trainer underneath, with and without the coupled row blocks: an optimizer step moves
// only the blocks (B of a column block, A of a row block); the one-hot factors stay bit for bit;
// Save writes the blocks as trained, one LoRA target per block and nothing else.
TEST_F(CoserveTest, S2ftTrainerStepsOnlyTheBlocksAndSavesThem) {
  auto engine = MakeEngine();
  model::ModelOptions o;
  o.trainable = false;
  auto base = std::move(model::LlamaModel::Create(*ctx_, TinyConfig(), o)).value();
  TANDEM_CHECK_OK(base->InitRandom(5, 0.5f));
  for (const bool coupled : {false, true}) {
    SCOPED_TRACE(coupled ? "coupled" : "output projections only");
    FineTuneJobSpec spec = Spec(*engine, "sparse", 1, /*batch_size=*/4);
    spec.method = "s2ft";
    spec.hyper.heads_fraction = 0.5;
    spec.hyper.ffn_fraction = 0.25;
    spec.hyper.coupled = coupled;
    auto trainer = std::move(internal::FineTuneTrainer::Create(*ctx_, *base, spec, "base")).value();
    const size_t n = trainer->adapter().parameters().size();
    std::vector<Tensor> before;
    for (size_t i = 0; i < n; ++i) before.push_back(*trainer->adapter().ToHost(i));
    bool stepped = false;
    for (int i = 0; i < 8 && !stepped; ++i) stepped = trainer->RunMicroBatch(*base, 48)->step_done;
    ASSERT_TRUE(stepped);
    const std::string dir = dir_.Join(coupled ? "saved-coupled" : "saved");
    TANDEM_CHECK_OK(trainer->Save(dir));
    auto loaded = std::move(peft::LoadS2ftAdapter(*ctx_, TinyConfig(), dir)).value();
    ASSERT_EQ(loaded->blocks().size() * 2, n);
    EXPECT_EQ(loaded->config().coupled, coupled);
    int rows = 0;
    for (size_t b = 0; b < loaded->blocks().size(); ++b) {
      const peft::S2ftBlock& block = loaded->blocks()[b];
      const int t = trainer->adapter().Find(block.layer, block.proj);
      ASSERT_GE(t, 0) << block.name;
      const bool columns = block.axis == peft::S2ftAxis::kColumns;
      rows += !columns;
      const size_t trained = 2 * static_cast<size_t>(t) + (columns ? 1 : 0);
      const size_t one_hot = 2 * static_cast<size_t>(t) + (columns ? 0 : 1);
      EXPECT_TRUE(SameBytes(before[one_hot], *trainer->adapter().ToHost(one_hot)))
          << block.name << ": the one-hot factor moved";
      EXPECT_FALSE(SameBytes(before[trained], *trainer->adapter().ToHost(trained)))
          << block.name << ": the block did not move";
      EXPECT_TRUE(SameBytes(*loaded->ToHost(b), *trainer->adapter().ToHost(trained))) << block.name;
    }
    EXPECT_EQ(rows > 0, coupled);
  }
}

// A job file written before S2FT jobs (no heads_fraction, ffn_fraction, selection, coupled)
// reads back with their defaults; a broken one is refused naming the file.
TEST(FineTuneJobFileTest, OlderJobFilesReadWithTheS2ftDefaults) {
  TempDir dir;
  {
    std::ofstream f(dir.Join("job.json"));
    f << json{{"id", "ftjob-1"},
              {"created_at", 7},
              {"training_file", "t.jsonl"},
              {"adapter", "old"},
              {"method", "lora"},
              {"hyperparameters",
               {{"n_epochs", 2},
                {"batch_size", 4},
                {"learning_rate", 0.01},
                {"lora_r", 4},
                {"lora_alpha", 8.0},
                {"target_modules", {"q_proj"}},
                {"publish_every_steps", 0},
                {"seed", 1}}},
              {"examples", {{{"tokens", {1, 2, 3}}, {"loss_from", 1}}}}}
             .dump();
  }
  FineTuneJobSpec spec;
  FineTuneJobInfo info;
  ASSERT_TRUE(internal::ReadJobFiles(dir.path(), &spec, &info).ok());
  const FineTuneHyperparameters defaults;
  EXPECT_EQ(spec.hyper.lora_r, 4);
  EXPECT_EQ(spec.hyper.heads_fraction, defaults.heads_fraction);
  EXPECT_EQ(spec.hyper.ffn_fraction, defaults.ffn_fraction);
  EXPECT_EQ(spec.hyper.selection, defaults.selection);
  EXPECT_EQ(spec.hyper.coupled, defaults.coupled);
  EXPECT_EQ(info.status, "queued");
  {
    std::ofstream f(dir.Join("job.json"));
    f << json{{"id", "ftjob-1"}, {"hyperparameters", {{"n_epochs", "two"}}}}.dump();
  }
  const Status bad = internal::ReadJobFiles(dir.path(), &spec, &info);
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.ToString().find("job.json"), std::string::npos) << bad.ToString();
  {
    std::ofstream f(dir.Join("job.json"));
    f << json{{"id", "ftjob-1"},
              {"created_at", 7},
              {"training_file", "t.jsonl"},
              {"adapter", "old"},
              {"method", "s2ft"},
              {"hyperparameters", {{"n_epochs", "two"}}},
              {"examples", json::array()}}
             .dump();
  }
  const Status bad_hyper = internal::ReadJobFiles(dir.path(), &spec, &info);
  EXPECT_FALSE(bad_hyper.ok());
  EXPECT_NE(bad_hyper.ToString().find("job.json"), std::string::npos) << bad_hyper.ToString();
  EXPECT_NE(bad_hyper.ToString().find("n_epochs"), std::string::npos) << bad_hyper.ToString();
}

TEST_F(CoserveTest, CancelEndsRunningAndQueuedJobs) {
  auto engine = MakeEngine();
  FineTuneJobInfo a = *engine->CreateFineTuneJob(Spec(*engine, "long", 1000));
  FineTuneJobInfo b = *engine->CreateFineTuneJob(Spec(*engine, "next", 1000));
  // The same adapter name while a job trains it, and a bad spec.
  EXPECT_EQ(engine->CreateFineTuneJob(Spec(*engine, "long", 1)).status().code(),
            StatusCode::kFailedPrecondition);
  FineTuneJobSpec bad = Spec(*engine, "x", 1);
  bad.method = "dpo";
  EXPECT_EQ(engine->CreateFineTuneJob(bad).status().code(), StatusCode::kInvalidArgument);
  bad.method = "s2ft";
  bad.hyper.heads_fraction = 0;
  bad.hyper.ffn_fraction = 0;
  const Status nothing = engine->CreateFineTuneJob(bad).status();
  EXPECT_NE(nothing.ToString().find("select nothing"), std::string::npos) << nothing.ToString();
  bad.hyper.selection = "best";
  EXPECT_EQ(engine->CreateFineTuneJob(bad).status().code(), StatusCode::kInvalidArgument);
  bad.method = "lora";
  bad.hyper.target_modules = {"nope_proj"};
  EXPECT_FALSE(engine->CreateFineTuneJob(bad).ok());

  ASSERT_GE(WaitStep(*engine, a.id, 2).step, 2);
  EXPECT_EQ(engine->GetFineTuneJob(b.id)->status, "queued");
  EXPECT_EQ(engine->CancelFineTuneJob(b.id)->status, "cancelled");
  EXPECT_EQ(engine->CancelFineTuneJob(a.id)->status, "cancelled");
  EXPECT_EQ(engine->CancelFineTuneJob("ftjob-99").status().code(), StatusCode::kNotFound);
  // The engine thread stops it within an iteration; then no step happens any more.
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (engine->Stats().finetune_jobs_running != 0 && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const int64_t steps = engine->Stats().finetune_steps;
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(engine->Stats().finetune_steps, steps);
  EXPECT_EQ(engine->Stats().finetune_jobs_running, 0);
  EXPECT_EQ(engine->GetFineTuneJob(b.id)->step, 0);
  EXPECT_EQ(engine->ListFineTuneJobs().size(), 2u);
  // Cancelled jobs stay cancelled after a restart.
  engine.reset();
  engine = MakeEngine();
  EXPECT_EQ(engine->GetFineTuneJob(a.id)->status, "cancelled");
  EXPECT_EQ(engine->GetFineTuneJob(b.id)->status, "cancelled");
  EXPECT_EQ(engine->Stats().finetune_jobs_running, 0);
}

TEST_F(CoserveTest, ResumesFromItsSnapshotAfterTheEngineIsDestroyed) {
  // Long jobs (400 steps), so the engine is destroyed mid-job; the first kSteps steps are compared
  // (the data order depends on the epoch, not on n_epochs).
  constexpr int64_t kSteps = 24;
  // Reference: the same job without interruption, in another state directory.
  EngineOptions reference_options = options_;
  reference_options.finetune.state_dir = dir_.Join("state-ref");
  reference_options.finetune.publish_dir = dir_.Join("adapters-ref");
  std::vector<double> reference_losses;
  {
    auto engine = std::move(Engine::Create(reference_options)).value();
    FineTuneJobInfo j = *engine->CreateFineTuneJob(Spec(*engine, "pairs", 100));
    ASSERT_GE(WaitStep(*engine, j.id, kSteps).step, kSteps);
    reference_losses = engine->CancelFineTuneJob(j.id)->step_losses;
  }
  ASSERT_GE(reference_losses.size(), static_cast<size_t>(kSteps));
  reference_losses.resize(kSteps);

  auto engine = MakeEngine();
  const std::string id = engine->CreateFineTuneJob(Spec(*engine, "pairs", 100))->id;
  const FineTuneJobInfo before = WaitStep(*engine, id, 5);  // epoch 1 published, snapshots taken
  ASSERT_EQ(before.status, "running");
  engine.reset();  // as if the server died: the job is not marked finished

  engine = MakeEngine();
  FineTuneJobInfo resumed = *engine->GetFineTuneJob(id);
  EXPECT_TRUE(resumed.resumed);
  EXPECT_GE(resumed.step, 4) << "the snapshot of step 4 (or later) is where it picks up";
  EXPECT_EQ(static_cast<int64_t>(resumed.step_losses.size()), resumed.step);
  ASSERT_FALSE(resumed.published.empty());
  EXPECT_EQ(resumed.published.front(), "pairs@1");
  // The published version is served again right away.
  const Outcome o = Generate(*engine, "pairs@1", "cat=", 3, true);
  EXPECT_TRUE(o.reason == "stop" || o.reason == "length") << o.reason << " " << o.error;
  ASSERT_GE(WaitStep(*engine, id, kSteps).step, kSteps);
  std::vector<double> losses = engine->CancelFineTuneJob(id)->step_losses;
  losses.resize(kSteps);
  EXPECT_EQ(losses, reference_losses) << "a resumed job repeats the same steps, bit for bit";
  // New jobs get fresh ids.
  EXPECT_NE(engine->CreateFineTuneJob(Spec(*engine, "other", 1))->id, id);
}

TEST_F(CoserveTest, FineTuningWaitsWhileInferenceUsesTheWholeBudget) {
  options_.max_batch_tokens = 16;  // 16 decoding requests fill it; a micro-batch needs >= 10
  auto engine = MakeEngine();
  std::mutex mu;
  std::condition_variable cv;
  int finished = 0;
  int64_t ft_tokens_at_first_finish = -1;
  std::vector<RequestId> ids;
  for (int i = 0; i < 16; ++i) {
    GenerationRequest r;
    r.model = "base";
    r.prompt_tokens = Ids("abcd");
    r.sampling.temperature = 0.0f;
    r.sampling.max_tokens = 60;
    r.sampling.ignore_eos = true;
    ids.push_back(*engine->Submit(std::move(r), [&](const TokenEvent& e) {
      if (!e.finished) return;
      // Stats() takes only the API mutex, which the engine never holds during callbacks.
      const int64_t ft_tokens = engine->Stats().finetune_tokens;
      std::lock_guard<std::mutex> lock(mu);
      EXPECT_EQ(e.finish_reason, "length") << e.error;
      if (finished++ == 0) ft_tokens_at_first_finish = ft_tokens;
      cv.notify_all();
    }));
  }
  const FineTuneJobInfo job = *engine->CreateFineTuneJob(Spec(*engine, "pairs", 1000));
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return finished == 16; }));
  }
  // Until the first request ended, every iteration either had requests waiting or spent the whole
  // budget on decodes: fine-tuning did not run.
  EXPECT_EQ(ft_tokens_at_first_finish, 0);
  EXPECT_GE(WaitStep(*engine, job.id, 1).step, 1) << "it runs once inference leaves room";
  EXPECT_EQ(engine->CancelFineTuneJob(job.id)->status, "cancelled");
}

TEST(FineTuneFileTest, ReadsPromptCompletionAndChatRowsWithTheirLossMasks) {
  TempDir dir;
  auto tok = model::MakeByteTokenizer();
  const ChatTemplate chat = ChatTemplate::Fallback();
  {
    std::ofstream f(dir.Join("rows.jsonl"));
    f << R"({"prompt": "red=", "completion": "sun"})"
      << "\n\n";  // blank lines are skipped
    f << R"({"messages": [{"role": "user", "content": "cat"},)"
      << R"( {"role": "assistant", "content": "ink"}]})"
      << "\n";
  }
  const std::vector<FineTuneExample> rows =
      std::move(ReadFineTuneFile(dir.Join("rows.jsonl"), *tok, &chat, 96)).value();
  ASSERT_EQ(rows.size(), 2u);
  std::vector<int32_t> want = Ids("red=sun");
  want.push_back(257);  // <eos>
  EXPECT_EQ(rows[0].tokens, want);
  EXPECT_EQ(rows[0].loss_from, 5);
  const std::vector<int32_t>& t = rows[1].tokens;
  const std::string prefix = tok->Decode(std::span(t.data(), rows[1].loss_from));
  const std::string target =
      tok->Decode(std::span(t.data() + rows[1].loss_from, t.size() - rows[1].loss_from - 1));
  EXPECT_EQ(prefix, *chat.Render({{"user", "cat"}}, true, "<bos>", "<eos>")) << prefix;
  EXPECT_EQ(target.rfind("ink", 0), 0u) << target;
  EXPECT_EQ(t.back(), 257);

  // Errors name the file and line.
  auto error = [&](const std::string& text, const ChatTemplate* tmpl, int64_t max_tokens) {
    std::ofstream(dir.Join("bad.jsonl")) << text;
    StatusOr<std::vector<FineTuneExample>> r =
        ReadFineTuneFile(dir.Join("bad.jsonl"), *tok, tmpl, max_tokens);
    EXPECT_FALSE(r.ok()) << text;
    return r.ok() ? std::string() : r.status().message();
  };
  EXPECT_NE(
      error("{\"prompt\": \"a\", \"completion\": \"b\"}\n[1]\n", &chat, 96).find("bad.jsonl:2"),
      std::string::npos);
  EXPECT_NE(error("{\"prompt\": \"a\"}\n", &chat, 96).find("'completion'"), std::string::npos);
  EXPECT_NE(error("{\"prompt\": \"a\", \"completion\": \"bcdef\"}\n", &chat, 5).find("limit of 5"),
            std::string::npos);
  const std::string chat_row =
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})";
  EXPECT_NE(error(chat_row + "\n", nullptr, 96).find("chat template"), std::string::npos);
  EXPECT_NE(error(R"({"messages": [{"role": "assistant", "content": "a"},)"
                  R"( {"role": "user", "content": "b"}]})"
                  "\n",
                  &chat, 96)
                .find("assistant"),
            std::string::npos);
  EXPECT_NE(error("", &chat, 96).find("no rows"), std::string::npos);
  EXPECT_EQ(ReadFineTuneFile(dir.Join("missing.jsonl"), *tok, &chat, 96).status().code(),
            StatusCode::kNotFound);
}

// ---- HTTP ----

class CoserveHttpTest : public CoserveTest {
 protected:
  void StartServer() {
    engine_ = MakeEngine();
    HttpServerOptions o;
    o.port = 0;
    o.finetune_dirs = {dir_.Join("data")};
    o.num_threads = 8;
    server_ = std::move(HttpServer::Create(engine_.get(), o)).value();
    TANDEM_CHECK_OK(server_->Start());
  }
  void TearDown() override {
    if (server_) server_->Stop();
  }
  httplib::Result Post(const std::string& path, const std::string& body) {
    httplib::Client c("127.0.0.1", server_->port());
    return c.Post(path.c_str(), body, "application/json");
  }
  httplib::Result Get(const std::string& path) {
    httplib::Client c("127.0.0.1", server_->port());
    return c.Get(path.c_str());
  }
  // POSTs a create body; expects `status` and (for errors) `param`; returns the body.
  json Create(const json& body, int status, const std::string& param = "") {
    httplib::Result r = Post("/v1/fine_tuning/jobs", body.dump());
    EXPECT_TRUE(r) << "no response";
    if (!r) return {};
    EXPECT_EQ(r->status, status) << body.dump() << " -> " << r->body;
    json j = json::parse(r->body);
    if (status != 200) {
      EXPECT_TRUE(j.contains("error")) << r->body;
      if (!param.empty()) {
        EXPECT_EQ(j["error"]["param"], param) << r->body;
      }
    }
    return j;
  }

  std::unique_ptr<Engine> engine_;
  std::unique_ptr<HttpServer> server_;
};

TEST_F(CoserveHttpTest, JobsOverHttpAndTheirErrors) {
  {
    std::ofstream bad(dir_.Join("data/bad.jsonl"));
    bad << R"({"prompt": "a", "completion": "b"})"
        << "\n"
        << "not json\n";
    std::ofstream outside(dir_.Join("outside.jsonl"));
    outside << R"({"prompt": "a", "completion": "b"})"
            << "\n";
    std::ofstream chat(dir_.Join("data/chat.jsonl"));
    chat << R"({"messages": [{"role": "user", "content": "red"},)"
         << R"( {"role": "assistant", "content": "sun"}]})"
         << "\n";
  }
  StartServer();
  const std::string file = dir_.Join("data/pairs.jsonl");
  httplib::Result r = Post("/v1/fine_tuning/jobs", "{not json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400);
  Create(json::object(), 400, "training_file");
  Create({{"training_file", file}}, 400, "suffix");
  Create({{"training_file", 3}, {"suffix", "p"}}, 400, "training_file");
  Create({{"training_file", dir_.Join("outside.jsonl")}, {"suffix", "p"}}, 400, "training_file");
  Create({{"training_file", dir_.Join("data/../outside.jsonl")}, {"suffix", "p"}}, 400,
         "training_file");
  Create({{"training_file", dir_.Join("data/missing.jsonl")}, {"suffix", "p"}}, 400,
         "training_file");
  const json bad_line = Create({{"training_file", dir_.Join("data/bad.jsonl")}, {"suffix", "p"}},
                               400, "training_file");
  EXPECT_NE(bad_line["error"]["message"].get<std::string>().find("bad.jsonl:2"), std::string::npos);
  Create({{"training_file", file},
          {"suffix", "p"},
          {"method", {{"type", "s2ft"}, {"s2ft", {{"hyperparameters", {{"heads_fraction", 2}}}}}}}},
         400, "heads_fraction");
  Create({{"training_file", file},
          {"suffix", "p"},
          {"method", {{"type", "s2ft"}, {"s2ft", {{"hyperparameters", {{"selection", "x"}}}}}}}},
         400, "selection");
  Create({{"training_file", file}, {"suffix", "p"}, {"coupled", "yes"}}, 400, "coupled");
  Create({{"training_file", file}, {"suffix", "p"}, {"method", {{"type", "dpo"}}}}, 400, "method");
  Create({{"training_file", file}, {"suffix", "p"}, {"n_epochs", 0}}, 400, "n_epochs");
  Create({{"training_file", file}, {"suffix", "p"}, {"learning_rate", -1}}, 400, "learning_rate");
  Create({{"training_file", file}, {"suffix", "p"}, {"colour", "blue"}}, 400, "colour");
  Create({{"training_file", file}, {"suffix", "bad name!"}}, 400);
  Create({{"training_file", file}, {"suffix", "p"}, {"target_modules", {"nope_proj"}}}, 400);
  Create({{"training_file", file}, {"suffix", "p"}, {"model", "other"}}, 404, "model");
  EXPECT_EQ(Get("/v1/fine_tuning/jobs/ftjob-404")->status, 404);
  EXPECT_EQ(Post("/v1/fine_tuning/jobs/ftjob-404/cancel", "")->status, 404);
  EXPECT_EQ(Get("/v1/fine_tuning/jobs")->body, R"({"data":[],"has_more":false,"object":"list"})");

  // A chat-format file goes through the chat template; cancel it.
  const json chat = Create(
      {{"training_file", dir_.Join("data/chat.jsonl")}, {"suffix", "chat"}, {"n_epochs", 1000}},
      200);
  const json cancelled = json::parse(
      Post("/v1/fine_tuning/jobs/" + chat["id"].get<std::string>() + "/cancel", "")->body);
  EXPECT_EQ(cancelled["status"], "cancelled");
  // An S2FT job is accepted with its own hyperparameters; cancel it too.
  const json sparse = Create({{"training_file", file},
                              {"suffix", "sparse"},
                              {"method",
                               {{"type", "s2ft"},
                                {"s2ft",
                                 {{"hyperparameters",
                                   {{"heads_fraction", 0.5},
                                    {"selection", "weight"},
                                    {"coupled", true},
                                    {"n_epochs", 1000}}}}}}}},
                             200);
  EXPECT_EQ(sparse["method"]["type"], "s2ft");
  EXPECT_EQ(sparse["hyperparameters"]["heads_fraction"], 0.5);
  EXPECT_EQ(sparse["hyperparameters"]["selection"], "weight");
  EXPECT_EQ(sparse["hyperparameters"]["coupled"], true);
  EXPECT_EQ(
      json::parse(Post("/v1/fine_tuning/jobs/" + sparse["id"].get<std::string>() + "/cancel", "")
                      ->body)["status"],
      "cancelled");

  const json job = Create({{"training_file", file},
                           {"suffix", "pairs"},
                           {"model", "base"},
                           {"method",
                            {{"type", "lora"},
                             {"lora",
                              {{"hyperparameters",
                                {{"n_epochs", 1},
                                 {"batch_size", 8},
                                 {"learning_rate", 0.02},
                                 {"lora_r", 4},
                                 {"target_modules", "all-linear"}}}}}}}},
                          200);
  EXPECT_EQ(job["object"], "fine_tuning.job");
  EXPECT_EQ(job["hyperparameters"]["lora_r"], 4);
  EXPECT_EQ(job["total_steps"], 4);
  const std::string id = job["id"];
  json now;
  for (int i = 0; i < 3000; ++i) {
    now = json::parse(Get("/v1/fine_tuning/jobs/" + id)->body);
    if (now["status"] != "queued" && now["status"] != "running") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(now["status"], "succeeded") << now.dump();
  EXPECT_EQ(now["fine_tuned_model"], "pairs@1");
  const json chat_now =
      json::parse(Get("/v1/fine_tuning/jobs/" + chat["id"].get<std::string>())->body);
  const json sparse_now =
      json::parse(Get("/v1/fine_tuning/jobs/" + sparse["id"].get<std::string>())->body);
  EXPECT_EQ(now["trained_tokens"].get<int64_t>() + chat_now["trained_tokens"].get<int64_t>() +
                sparse_now["trained_tokens"].get<int64_t>(),
            engine_->Stats().finetune_tokens);
  const json list = json::parse(Get("/v1/fine_tuning/jobs")->body);
  ASSERT_EQ(list["data"].size(), 3u);
  EXPECT_EQ(list["data"][0]["id"], id);  // newest first
  EXPECT_NE(Get("/v1/models")->body.find("\"pairs@1\""), std::string::npos);
  httplib::Result c = Post(
      "/v1/completions", json{{"model", "pairs@1"}, {"prompt", "red="}, {"max_tokens", 3}}.dump());
  ASSERT_TRUE(c);
  EXPECT_EQ(c->status, 200) << c->body;
  const std::string metrics = Get("/metrics")->body;
  EXPECT_NE(metrics.find("tandem_finetune_steps_total "), std::string::npos);
  EXPECT_NE(metrics.find("tandem_finetune_tokens_total "), std::string::npos);
  EXPECT_NE(metrics.find("tandem_finetune_jobs_running 0"), std::string::npos);
  EXPECT_NE(metrics.find("tandem_finetune_loss "), std::string::npos);
}

}  // namespace
}  // namespace tandem::serve
