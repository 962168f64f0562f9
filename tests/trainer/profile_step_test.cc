// train.profile_step on a tiny CPU model: the chosen update (and only it) writes
// profile-step-N.json with every op category of a training step, positive times that fit in the
// update, and GEMM flops; profiling changes no loss; a LoRA update counts only the adapter's
// optimizer work.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "tests/common/testing.h"
#include "trainer/config.h"
#include "trainer/trainer.h"

namespace tandem::trainer {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string WriteCorpus(const testing::TempDir& dir) {
  const char* words[] = {"a", "profile", "of", "one", "step", "shows", "where", "time", "goes"};
  std::mt19937 gen(11);
  const std::string path = dir.Join("corpus.jsonl");
  std::ofstream out(path);
  for (int d = 0; d < 120; ++d) {
    std::string text;
    for (int w = 0; w < 30; ++w) text += std::string(w ? " " : "") + words[gen() % 9];
    out << json({{"text", text + "."}}).dump() << "\n";
  }
  return path;
}

std::vector<std::string> Overrides(const testing::TempDir& dir, const std::string& run) {
  return {"model.hidden_size=32",
          "model.intermediate_size=48",
          "model.num_layers=2",
          "model.num_heads=4",
          "model.num_kv_heads=2",
          "model.max_position_embeddings=64",
          "data.dir=\"" + dir.Join("data") + "\"",
          "data.inputs=[\"" + dir.Join("corpus.jsonl") + "\"]",
          "data.seq_len=32",
          "train.micro_batch_size=2",
          "train.grad_accum=2",
          "train.steps=3",
          "train.warmup_steps=1",
          "train.eval_interval=0",
          "train.eval_batches=0",
          "train.out_dir=\"" + dir.Join(run) + "\""};
}

StatusOr<TrainResult> Train(std::vector<std::string> overrides) {
  TANDEM_ASSIGN_OR_RETURN(TrainConfig config, LoadTrainConfig("", overrides));
  return RunTraining(config, "test");
}

std::vector<double> Losses(const std::string& run_dir) {
  std::vector<double> losses;
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) losses.push_back(json::parse(line).at("loss").get<double>());
  return losses;
}

json ReadJson(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in, nullptr, /*allow_exceptions=*/false);
}

// The report's invariants; returns the categories by name.
std::map<std::string, json> CheckReport(const json& p, int64_t step) {
  std::map<std::string, json> by_name;
  EXPECT_EQ(p.at("step").get<int64_t>(), step);
  EXPECT_EQ(p.at("device").get<std::string>(), "cpu");
  EXPECT_EQ(p.at("timer").get<std::string>(), "steady_clock");
  EXPECT_GT(p.at("tokens").get<int64_t>(), 0);
  const double wall = p.at("wall_ms").get<double>();
  EXPECT_GT(wall, 0.0);
  double sum = 0;
  for (const json& c : p.at("categories")) {
    const std::string name = c.at("name").get<std::string>();
    EXPECT_GT(c.at("calls").get<int64_t>(), 0) << name;
    EXPECT_GT(c.at("ms").get<double>(), 0.0) << name;
    EXPECT_NEAR(c.at("percent").get<double>(), 100.0 * c.at("ms").get<double>() / wall, 1e-6);
    sum += c.at("ms").get<double>();
    EXPECT_TRUE(by_name.emplace(name, c).second) << name << " twice";
  }
  EXPECT_NEAR(p.at("regions_ms").get<double>(), sum, 1e-6);
  EXPECT_LE(sum, wall);
  EXPECT_NEAR(p.at("gap_ms").get<double>(), wall - sum, 1e-6);
  return by_name;
}

TEST(ProfileStepTest, WritesTheChosenUpdatesBreakdownAndChangesNoLoss) {
  testing::TempDir dir;
  WriteCorpus(dir);
  std::vector<std::string> o = Overrides(dir, "plain");
  ASSERT_TRUE(Train(o).ok());
  o = Overrides(dir, "profiled");
  o.push_back("train.profile_step=2");
  StatusOr<TrainResult> r = Train(o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(Losses(dir.Join("plain")), Losses(dir.Join("profiled")));
  EXPECT_EQ(Losses(dir.Join("profiled")).size(), 3u);
  EXPECT_FALSE(fs::exists(dir.Join("plain/profile-step-2.json")));
  EXPECT_FALSE(fs::exists(dir.Join("profiled/profile-step-1.json")));
  EXPECT_FALSE(fs::exists(dir.Join("profiled/profile-step-3.json")));

  const json p = ReadJson(dir.Join("profiled/profile-step-2.json"));
  ASSERT_TRUE(p.is_object()) << "profile-step-2.json missing or not JSON";
  const std::map<std::string, json> cats = CheckReport(p, 2);
  std::set<std::string> names;
  for (const auto& [name, c] : cats) names.insert(name);
  const std::set<std::string> want = {"gemm",      "attention_fwd", "attention_bwd", "norm",
                                      "rope",      "swiglu",        "loss",          "embedding",
                                      "optimizer", "elementwise"};
  EXPECT_EQ(names, want);
  EXPECT_GT(cats.at("gemm").at("flops").get<double>(), 0.0);
  EXPECT_GT(cats.at("gemm").at("tflops").get<double>(), 0.0);
  EXPECT_EQ(cats.at("norm").at("flops").get<double>(), 0.0);
  // Per micro-batch (2 per update) each of the 2 layers runs one attention forward and backward.
  EXPECT_EQ(cats.at("attention_fwd").at("calls").get<int64_t>(), 2 * 2);
  EXPECT_EQ(cats.at("attention_bwd").at("calls").get<int64_t>(), 2 * 2);
  // Causal attention, no segment ids (eos packing): 4 * D per visible pair, B=2, T=32, Hq=4, D=8.
  const double attn = 2 * 2 * 4.0 * 2 * 4 * 8 * (32 * 33 / 2);
  EXPECT_DOUBLE_EQ(cats.at("attention_fwd").at("flops").get<double>(), attn);
  EXPECT_DOUBLE_EQ(cats.at("attention_bwd").at("flops").get<double>(), 2.5 * attn);
}

TEST(ProfileStepTest, LoraUpdateProfilesOnlyTheAdaptersOptimizer) {
  for (bool wide : {true, false}) {
    SCOPED_TRACE(wide ? "wide path" : "fast path");
    testing::TempDir dir;
    WriteCorpus(dir);
    std::vector<std::string> o = Overrides(dir, "lora");
    o.insert(o.end(), {"peft.method=\"lora\"", "peft.r=4", "train.profile_step=1",
                       StrCat("peft.lora_wide=", wide ? "true" : "false")});
    StatusOr<TrainResult> r = Train(o);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    const json p = ReadJson(dir.Join("lora/profile-step-1.json"));
    ASSERT_TRUE(p.is_object()) << "profile-step-1.json missing or not JSON";
    const std::map<std::string, json> cats = CheckReport(p, 1);
    ASSERT_TRUE(cats.count("gemm")) << p.dump(2);
    ASSERT_TRUE(cats.count("optimizer")) << p.dump(2);
    // The frozen base takes no optimizer step: one multi-tensor gradient-norm sum and one
    // multi-tensor AdamW over the adapter's tensors (A and B of 7 projections in 2 layers).
    EXPECT_EQ(cats.at("optimizer").at("calls").get<int64_t>(), 2);
    // The base products run as GEMMs; the adapter's (one adapter, no dropout: the group paths)
    // are profiled by role, per group (q|k|v, o, gate|up, down) and micro-batch. The wide path
    // folds the expand and the dx product into the base GEMMs.
    EXPECT_GT(cats.at("gemm").at("flops").get<double>(), 0.0);
    std::vector<const char*> roles = {"lora_shrink", "lora_dh", "lora_dB", "lora_dA"};
    if (!wide) roles.insert(roles.end(), {"lora_expand", "lora_dx"});
    for (const char* role : roles) {
      ASSERT_TRUE(cats.count(role)) << role << " missing: " << p.dump(2);
      EXPECT_EQ(cats.at(role).at("calls").get<int64_t>(), 2 * 2 * 4) << role;
    }
    if (wide) {
      EXPECT_EQ(cats.count("lora_expand"), 0u) << p.dump(2);
      EXPECT_EQ(cats.count("lora_dx"), 0u) << p.dump(2);
    }
  }
}

TEST(ProfileStepTest, NegativeStepIsRejected) {
  testing::TempDir dir;
  WriteCorpus(dir);
  std::vector<std::string> o = Overrides(dir, "bad");
  o.push_back("train.profile_step=-1");
  StatusOr<TrainConfig> c = LoadTrainConfig("", o);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("profile_step"), std::string::npos) << c.status().ToString();
}

}  // namespace
}  // namespace tandem::trainer
