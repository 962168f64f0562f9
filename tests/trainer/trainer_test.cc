// The training loop end to end on a tiny model: determinism, falling loss, gradient
// accumulation, the run directory, and every bad input stopping the run before it starts.
#include "trainer/trainer.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "model/config.h"
#include "model/llama.h"
#include "tests/common/testing.h"
#include "trainer/config.h"

namespace tandem::trainer {
namespace {

namespace fs = std::filesystem;

// A few hundred short English-like documents, one JSONL record each.
std::string WriteCorpus(const testing::TempDir& dir, int docs) {
  const char* words[] = {"the", "jury", "said", "city", "of", "a", "report", "was", "new", "and",
                         "election", "to", "in", "that", "it", "county", "which", "for"};
  std::mt19937 gen(7);
  const std::string path = dir.Join("corpus.jsonl");
  std::ofstream out(path);
  for (int d = 0; d < docs; ++d) {
    std::string text;
    for (int w = 0; w < 40; ++w) text += std::string(w ? " " : "") + words[gen() % 18];
    out << nlohmann::json({{"text", text + "."}}).dump() << "\n";
  }
  return path;
}

std::vector<std::string> TinyOverrides(const testing::TempDir& dir, const std::string& corpus) {
  return {"model.hidden_size=32", "model.intermediate_size=48", "model.num_layers=2",
          "model.num_heads=4", "model.num_kv_heads=2", "model.max_position_embeddings=64",
          "data.dir=\"" + dir.Join("data") + "\"", "data.inputs=[\"" + corpus + "\"]",
          "data.seq_len=32", "train.micro_batch_size=4", "train.steps=30", "train.lr=3e-3",
          "train.warmup_steps=3", "train.log_interval=100", "train.eval_interval=0",
          "train.eval_batches=2", "train.out_dir=\"" + dir.Join("run") + "\""};
}

std::vector<double> Losses(const std::string& run_dir) {
  std::vector<double> losses;
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) losses.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  return losses;
}

StatusOr<TrainResult> Train(const std::vector<std::string>& overrides) {
  TANDEM_ASSIGN_OR_RETURN(TrainConfig config, LoadTrainConfig("", overrides));
  return RunTraining(config, "test");
}

TEST(TrainerTest, LossFallsAndRunsAreBitwiseDeterministic) {
  testing::TempDir dir;
  const std::string corpus = WriteCorpus(dir, 300);
  std::vector<std::string> o = TinyOverrides(dir, corpus);
  StatusOr<TrainResult> a = Train(o);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(a->steps_done, 30);
  EXPECT_LT(a->final_loss, a->first_loss - 1.5) << "first " << a->first_loss << ", last " << a->final_loss;
  EXPECT_GT(a->final_eval_loss, 0.0);
  const std::vector<double> first = Losses(dir.Join("run"));
  ASSERT_EQ(first.size(), 30u);

  // The same config and seed again, into a fresh run directory: bitwise the same losses.
  o.push_back("train.out_dir=\"" + dir.Join("run2") + "\"");
  StatusOr<TrainResult> b = Train(o);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  const std::vector<double> second = Losses(dir.Join("run2"));
  ASSERT_EQ(second.size(), first.size());
  for (size_t i = 0; i < first.size(); ++i) EXPECT_EQ(first[i], second[i]) << "step " << i + 1;

  // Another seed changes them.
  o.push_back("train.seed=99");
  o.push_back("train.out_dir=\"" + dir.Join("run3") + "\"");
  ASSERT_TRUE(Train(o).ok());
  EXPECT_NE(Losses(dir.Join("run3"))[0], first[0]);

  // The run directory: resolved config (loads back), run facts, a checkpoint that loads.
  EXPECT_TRUE(fs::exists(dir.Join("run/config.toml")));
  EXPECT_TRUE(LoadTrainConfig(dir.Join("run/config.toml"), {}).ok());
  std::ifstream run_json(dir.Join("run/run.json"));
  const nlohmann::json facts = nlohmann::json::parse(run_json);
  EXPECT_TRUE(facts.contains("git_commit"));
  EXPECT_EQ(facts.at("device").get<std::string>(), "cpu");
  std::ifstream latest(dir.Join("run/checkpoints/latest"));
  std::string name;
  latest >> name;
  EXPECT_EQ(name, "step-30");
  auto cfg = model::LoadLlamaConfig(dir.Join("run/checkpoints/step-30/config.json"));
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  auto ctx = ops::Context::Cpu();
  auto m = model::LlamaModel::Create(*ctx, *cfg, {});
  ASSERT_TRUE(m.ok());
  EXPECT_TRUE((*m)->LoadSafetensors(dir.Join("run/checkpoints/step-30")).ok());
}

TEST(TrainerTest, GradientAccumulationMatchesOneLargeBatch) {
  testing::TempDir dir;
  const std::string corpus = WriteCorpus(dir, 300);
  std::vector<std::string> big = TinyOverrides(dir, corpus);
  big.push_back("train.steps=3");
  std::vector<std::string> accum = big;
  accum.push_back("train.micro_batch_size=2");
  accum.push_back("train.grad_accum=2");
  accum.push_back("train.out_dir=\"" + dir.Join("accum") + "\"");
  ASSERT_TRUE(Train(big).ok());
  ASSERT_TRUE(Train(accum).ok());
  const std::vector<double> a = Losses(dir.Join("run")), b = Losses(dir.Join("accum"));
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), 3u);
  // The same windows and the same mean: equal up to the order of f32 sums.
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-4 * std::fabs(a[i])) << "step " << i + 1;
}

TEST(TrainerTest, LoraFineTuningTrainsOnlyTheAdapter) {
  testing::TempDir dir;
  const std::string corpus = WriteCorpus(dir, 300);
  std::vector<std::string> pre = TinyOverrides(dir, corpus);
  pre.insert(pre.end(), {"model.hidden_size=128", "model.intermediate_size=256"});  // room for an adapter
  ASSERT_TRUE(Train(pre).ok());
  const std::string base = dir.Join("run/checkpoints/step-30");
  // An SFT set: whatever the prompt, answer with the same two words (a behaviour the base
  // model does not have and an adapter learns quickly).
  const std::string sft = dir.Join("sft.jsonl");
  {
    std::ofstream out(sft);
    std::mt19937 gen(3);
    const char* words[] = {"the", "jury", "said", "city", "report", "election", "county", "new"};
    for (int i = 0; i < 400; ++i) {
      std::string a = words[gen() % 8], b = words[gen() % 8];
      out << nlohmann::json({{"prompt", a + " " + b + " ->"}, {"completion", " election county"}}).dump() << "\n";
    }
  }
  std::vector<std::string> o = TinyOverrides(dir, sft);
  o.insert(o.end(), {"model.init=\"pretrained\"", "model.path=\"" + base + "\"", "peft.method=\"lora\"",
                     "peft.r=8", "peft.alpha=16.0", "train.lr=1e-2", "train.steps=25", "train.eval_accuracy=true", "data.dir=\"" + dir.Join("sft_data") + "\"", "data.format=\"sft\"",
                     "train.out_dir=\"" + dir.Join("lora") + "\""});
  std::ifstream before_file(base + "/model.safetensors", std::ios::binary);
  const std::string before((std::istreambuf_iterator<char>(before_file)), {});
  StatusOr<TrainResult> r = Train(o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_LT(r->final_loss, r->first_loss - 0.5) << "first " << r->first_loss << ", last " << r->final_loss;
  // train.eval_accuracy: the answer tokens are learned (" election county" from any prompt).
  EXPECT_GE(r->initial_eval_accuracy, 0.0);
  EXPECT_LE(r->final_eval_accuracy, 1.0);
  EXPECT_GT(r->final_eval_accuracy, r->initial_eval_accuracy + 0.3)
      << "before " << r->initial_eval_accuracy << ", after " << r->final_eval_accuracy;
  // The checkpoint is a PEFT adapter; the base model's file is untouched.
  const std::string ckpt = dir.Join("lora/checkpoints/step-25");
  EXPECT_TRUE(fs::exists(ckpt + "/adapter_config.json"));
  EXPECT_TRUE(fs::exists(ckpt + "/adapter_model.safetensors"));
  EXPECT_FALSE(fs::exists(ckpt + "/model.safetensors"));
  std::ifstream after_file(base + "/model.safetensors", std::ios::binary);
  EXPECT_EQ(std::string((std::istreambuf_iterator<char>(after_file)), {}), before);
  // Continuing from the saved adapter reproduces its loss on the first step's data.
  std::vector<std::string> again = o;
  again.insert(again.end(), {"peft.init_adapter=\"" + ckpt + "\"", "train.steps=1", "train.lr=1e-12",
                             "train.warmup_steps=0", "train.out_dir=\"" + dir.Join("lora2") + "\""});
  StatusOr<TrainResult> r2 = Train(again);
  ASSERT_TRUE(r2.ok()) << r2.status().ToString();
  EXPECT_LT(r2->first_loss, r->first_loss - 0.5);
}

// Each bad input fails before the first step with an error naming what is wrong.
void ExpectFails(const std::vector<std::string>& overrides, const std::string& needle, const std::string& run_dir) {
  StatusOr<TrainResult> r = Train(overrides);
  ASSERT_FALSE(r.ok()) << "expected an error mentioning '" << needle << "'";
  EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().ToString();
  EXPECT_FALSE(fs::exists(run_dir + "/metrics.jsonl")) << "training started despite: " << r.status().ToString();
}

TEST(TrainerTest, BadInputsFailBeforeTraining) {
  testing::TempDir dir;
  const std::string corpus = WriteCorpus(dir, 300);
  const std::vector<std::string> base = TinyOverrides(dir, corpus);
  const std::string run = dir.Join("run");
  auto with = [&](std::initializer_list<std::string> extra) {
    std::vector<std::string> o = base;
    o.insert(o.end(), extra);
    return o;
  };
  ExpectFails(with({"train.lrr=0.1"}), "did you mean 'train.lr'", run);        // unknown key
  ExpectFails(with({"train.steps=\"many\""}), "train.steps", run);              // wrong type
  ExpectFails(with({"train.steps=0"}), "train.steps", run);                     // out of range
  ExpectFails(with({"train.schedule=\"sawtooth\""}), "train.schedule", run);    // bad choice
  ExpectFails(with({"model.attention_kernel=\"flash\""}), "model.attention_kernel", run);
  ExpectFails(with({"model.num_kv_heads=3"}), "num_kv_heads", run);             // heads mismatch
  ExpectFails(with({"data.seq_len=128"}), "max_position_embeddings", run);      // too long
  ExpectFails(with({"train.device=\"tpu:0\""}), "tpu:0", run);                  // bad device
  // Missing data files.
  ExpectFails(with({"data.dir=\"" + dir.Join("none") + "\"", "data.inputs=[\"" + dir.Join("missing.jsonl") + "\"]"}),
              "missing.jsonl", run);
  ExpectFails(with({"data.dir=\"" + dir.Join("none2") + "\"", "data.inputs=[]"}), "manifest.json", run);
  // A tokenizer file that does not exist.
  ExpectFails(with({"data.tokenizer=\"" + dir.Join("tokenizer.json") + "\""}), "tokenizer.json", run);
  // A model vocabulary smaller than the tokenizer's.
  ExpectFails(with({"model.vocab_size=100"}), "vocab", run);
  // A dataset shorter than one batch.
  testing::TempDir small;
  const std::string tiny_corpus = WriteCorpus(small, 1);
  ExpectFails({"model.hidden_size=32", "model.intermediate_size=48", "model.num_layers=1", "model.num_heads=4",
               "model.num_kv_heads=2", "data.dir=\"" + small.Join("data") + "\"",
               "data.inputs=[\"" + tiny_corpus + "\"]", "data.seq_len=512", "train.micro_batch_size=8",
               "train.out_dir=\"" + small.Join("run") + "\""},
              "tokens", small.Join("run"));
  // A pretrained model whose vocabulary cannot hold the tokenizer's ids.
  model::LlamaConfig c;
  c.vocab_size = 100;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  fs::create_directories(dir.Join("small_model"));
  ASSERT_TRUE(model::SaveLlamaConfig(c, dir.Join("small_model/config.json")).ok());
  ExpectFails(with({"model.init=\"pretrained\"", "model.path=\"" + dir.Join("small_model") + "\""}),
              "vocab_size 100", run);
}

}  // namespace
}  // namespace tandem::trainer
