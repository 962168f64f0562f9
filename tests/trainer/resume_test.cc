// Universal checkpoints in the training loop, one process: a run resumed from its step-3
// checkpoint continues exactly (losses and the step-6 checkpoint bitwise equal to the run that
// never stopped) for full training and for LoRA with dropout (its RNG counter is restored);
// so does full training with bf16 optimizer state (optimizer.precision = "bf16": its saved
// moments are bf16 values widened to f32, and its loss falls); --resume=auto with nothing saved
// starts fresh; a checkpoint of another model is refused
// naming the tensor; metrics.jsonl keeps one line per step.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "checkpoint/universal.h"
#include "tests/common/testing.h"
#include "tests/trainer/train_run_util.h"
#include "trainer/config.h"
#include "trainer/trainer.h"

namespace tandem::trainer {
namespace {

namespace fs = std::filesystem;
using run_util::StepLosses;
using run_util::Train;

void ExpectSameState(const std::string& a, const std::string& b) {
  run_util::ExpectSameUniversalState(a, b);
}

std::string WriteCorpus(const testing::TempDir& dir) {
  const char* words[] = {"the", "jury", "said", "city", "of", "a", "report", "was", "new"};
  std::mt19937 gen(5);
  const std::string path = dir.Join("corpus.jsonl");
  std::ofstream out(path);
  for (int d = 0; d < 150; ++d) {
    std::string text;
    for (int w = 0; w < 30; ++w) text += std::string(w ? " " : "") + words[gen() % 9];
    out << nlohmann::json({{"text", text + "."}}).dump() << "\n";
  }
  return path;
}

std::vector<std::string> Overrides(const testing::TempDir& dir, const std::string& run,
                                   bool lora) {
  std::vector<std::string> o = {
      "model.hidden_size=32", "model.intermediate_size=48", "model.num_layers=2",
      "model.num_heads=4", "model.num_kv_heads=2", "model.max_position_embeddings=64",
      "data.dir=\"" + dir.Join("data") + "\"", "data.inputs=[\"" + WriteCorpus(dir) + "\"]",
      "data.seq_len=32", "train.micro_batch_size=2", "train.grad_accum=2", "train.steps=6",
      "train.save_interval=3", "train.lr=3e-3", "train.warmup_steps=2",
      "train.log_interval=100", "train.eval_interval=0", "train.eval_batches=1",
      "train.out_dir=\"" + dir.Join(run) + "\""};
  if (lora) {
    for (const char* x : {"peft.method=\"lora\"", "peft.r=4", "peft.dropout=0.2", "train.lr=1e-2"})
      o.push_back(x);
  }
  return o;
}

void ResumeIsExact(bool lora, const std::vector<std::string>& extra = {}) {
  testing::TempDir dir;
  auto overrides = [&](const std::string& run) {
    std::vector<std::string> o = Overrides(dir, run, lora);
    o.insert(o.end(), extra.begin(), extra.end());
    return o;
  };
  auto full = Train(overrides("full"));
  ASSERT_TRUE(full.ok()) << full.status().ToString();
  EXPECT_EQ(full->last_universal_checkpoint, dir.Join("full/checkpoints/universal/step-6.h5"));
  // The interrupted run: its own directory holding what the first run had after step 3.
  fs::create_directories(dir.Join("cut/checkpoints/universal"));
  fs::copy_file(dir.Join("full/checkpoints/universal/step-3.h5"),
                dir.Join("cut/checkpoints/universal/step-3.h5"));
  {
    std::ofstream latest(dir.Join("cut/checkpoints/universal/latest"));
    latest << "step-3.h5\n";
  }
  {
    std::ofstream metrics(dir.Join("cut/metrics.jsonl"));  // lines of steps 1-4; 4 is rewritten
    std::ifstream in(dir.Join("full/metrics.jsonl"));
    std::string line;
    for (int i = 0; i < 4 && std::getline(in, line); ++i) metrics << line << "\n";
  }
  auto resumed = Train(overrides("cut"), "auto");
  ASSERT_TRUE(resumed.ok()) << resumed.status().ToString();
  EXPECT_EQ(resumed->resumed_from_step, 3);
  EXPECT_EQ(resumed->steps_done, 6);
  EXPECT_EQ(StepLosses(dir.Join("cut")), StepLosses(dir.Join("full")));  // bitwise, steps 1..6
  ExpectSameState(dir.Join("full/checkpoints/universal/step-6.h5"),
                  dir.Join("cut/checkpoints/universal/step-6.h5"));
}

TEST(ResumeTest, FullTrainingResumesBitwise) { ResumeIsExact(false); }

TEST(ResumeTest, LoraWithDropoutResumesBitwise) { ResumeIsExact(true); }

TEST(ResumeTest, Bf16OptimizerStateResumesBitwise) {
  ResumeIsExact(false, {"optimizer.precision=\"bf16\""});
  testing::TempDir dir;
  std::vector<std::string> o = Overrides(dir, "bf16", false);
  o.push_back("optimizer.precision=\"bf16\"");
  o.push_back("train.steps=12");
  ASSERT_TRUE(Train(o).ok());
  const auto losses = StepLosses(dir.Join("bf16"));
  ASSERT_EQ(losses.size(), 12u);
  EXPECT_LT(losses.back().second, losses.front().second - 0.5)
      << "bf16 state: the loss did not fall";
  auto ckpt = checkpoint::UniversalReader::Open(dir.Join("bf16/checkpoints/universal/step-12.h5"));
  ASSERT_TRUE(ckpt.ok()) << ckpt.status().ToString();
  int64_t nonzero = 0;
  for (const checkpoint::TensorInfo& info : ckpt->tensors()) {
    auto t = ckpt->ReadAll(info.name, info.adapter);
    ASSERT_TRUE(t.ok()) << info.name;
    for (const Tensor* x : {&t->exp_avg, &t->exp_avg_sq}) {
      for (int64_t i = 0; i < x->numel(); ++i) {  // bf16 values (CPU weights stay f32)
        const uint32_t bits = FloatBits(x->data<float>()[i]);
        ASSERT_EQ(bits & 0xFFFFu, 0u) << info.name << " moment " << i << " is not a bf16 value";
        nonzero += bits != 0;
      }
    }
  }
  EXPECT_GT(nonzero, 1000);
}

// A checkpoint resumes under the other state precision (f32 -> bf16 narrows, bf16 -> f32
// widens): the run continues to its last step with the loss of the uninterrupted run to 1e-3.
TEST(ResumeTest, CheckpointsResumeUnderTheOtherStatePrecision) {
  testing::TempDir dir;
  for (const bool from_bf16 : {false, true}) {
    const std::string tag = from_bf16 ? "b" : "f";
    const std::string from = StrCat("optimizer.precision=\"", from_bf16 ? "bf16" : "f32", "\"");
    const std::string to = StrCat("optimizer.precision=\"", from_bf16 ? "f32" : "bf16", "\"");
    std::vector<std::string> a = Overrides(dir, "full" + tag, false);
    a.push_back(from);
    ASSERT_TRUE(Train(a).ok());
    std::vector<std::string> b = Overrides(dir, "other" + tag, false);
    b.push_back(to);
    auto r = Train(b, dir.Join("full" + tag + "/checkpoints/universal/step-3.h5"));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->resumed_from_step, 3);
    EXPECT_EQ(r->steps_done, 6);
    const auto want = StepLosses(dir.Join("full" + tag)), got = StepLosses(dir.Join("other" + tag));
    ASSERT_EQ(want.size(), 6u);
    ASSERT_FALSE(got.empty());
    EXPECT_EQ(got.back().first, 6);
    EXPECT_NEAR(got.back().second, want.back().second, 1e-3) << tag;
  }
}

TEST(ResumeTest, Bf16OptimizerStateIsForFullTrainingOnOneRank) {
  testing::TempDir dir;
  for (const char* bad : {"peft.method=\"lora\"", "parallel.tp=2", "optimizer.offload=\"host\""}) {
    std::vector<std::string> o = Overrides(dir, "x", false);
    o.push_back("optimizer.precision=\"bf16\"");
    o.push_back(bad);
    auto c = LoadTrainConfig("", o);
    ASSERT_FALSE(c.ok()) << bad;
    EXPECT_NE(c.status().message().find("optimizer.precision = \"bf16\""), std::string::npos)
        << c.status().message();
  }
  std::vector<std::string> o = Overrides(dir, "y", false);
  o.push_back("optimizer.precision=\"f16\"");
  auto c = LoadTrainConfig("", o);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("optimizer.precision"), std::string::npos)
      << c.status().message();
}

TEST(ResumeTest, AutoWithNothingSavedStartsFresh) {
  testing::TempDir dir;
  auto o = Overrides(dir, "fresh", false);
  o.push_back("train.steps=2");
  auto r = Train(o, "auto");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->resumed_from_step, 0);
  EXPECT_EQ(r->steps_done, 2);
}

TEST(ResumeTest, RefusesAnotherModelsCheckpointAndAMissingPath) {
  testing::TempDir dir;
  auto o = Overrides(dir, "a", false);
  o.push_back("train.steps=3");
  ASSERT_TRUE(Train(o).ok());
  auto other = Overrides(dir, "b", false);
  other.push_back("model.intermediate_size=64");
  auto r = Train(other, dir.Join("a/checkpoints/universal/step-3.h5"));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("mlp.gate_proj.weight"), std::string::npos)
      << r.status().message();
  EXPECT_NE(r.status().message().find("[64, 32]"), std::string::npos) << r.status().message();
  auto missing = Train(Overrides(dir, "c", false), dir.Join("nowhere.h5"));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("nowhere.h5"), std::string::npos);
  // A LoRA run cannot resume from a full-training checkpoint: the adapter is not in it.
  auto lora = Train(Overrides(dir, "d", true), dir.Join("a/checkpoints/universal/step-3.h5"));
  ASSERT_FALSE(lora.ok());
  EXPECT_NE(lora.status().message().find("lora_A"), std::string::npos) << lora.status().message();
}

}  // namespace
}  // namespace tandem::trainer
