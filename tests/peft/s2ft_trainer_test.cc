// `tandem train` with peft.method = "s2ft" on a tiny frozen base (CPU): the loss falls, the
// checkpoint is an S²FT adapter (loadable, with only the selected blocks), a run continued from
// it starts where it ended, and bad S²FT keys stop the run before it starts.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "model/llama.h"
#include "peft/s2ft.h"
#include "peft/s2ft_io.h"
#include "tests/common/testing.h"
#include "trainer/config.h"
#include "trainer/trainer.h"

namespace tandem::peft {
namespace {

namespace fs = std::filesystem;
using ::tandem::testing::TempDir;

std::string WriteCorpus(const TempDir& dir) {
  const char* words[] = {"the", "jury", "said", "city", "of", "a", "report", "was", "new"};
  std::mt19937 gen(11);
  const std::string path = dir.Join("corpus.jsonl");
  std::ofstream out(path);
  for (int d = 0; d < 200; ++d) {
    std::string text;
    for (int w = 0; w < 30; ++w) text += std::string(w ? " " : "") + words[gen() % 9];
    out << nlohmann::json({{"text", text + "."}}).dump() << "\n";
  }
  return path;
}

std::vector<std::string> Overrides(const TempDir& dir, const std::string& corpus,
                                   const std::string& out) {
  return {"model.hidden_size=32",
          "model.intermediate_size=48",
          "model.num_layers=2",
          "model.num_heads=4",
          "model.num_kv_heads=2",
          "model.max_position_embeddings=64",
          "model.init_std=0.1",
          "peft.method=\"s2ft\"",
          "peft.s2ft_heads_fraction=0.5",
          "peft.s2ft_ffn_fraction=0.25",
          "peft.s2ft_coupled=true",
          "data.dir=\"" + dir.Join("data") + "\"",
          "data.inputs=[\"" + corpus + "\"]",
          "data.seq_len=32",
          "train.micro_batch_size=4",
          "train.steps=25",
          "train.lr=1e-2",
          "train.warmup_steps=0",
          "train.schedule=\"constant\"",
          "train.weight_decay=0.0",
          "train.log_interval=100",
          "train.eval_interval=0",
          "train.eval_batches=0",
          "train.out_dir=\"" + dir.Join(out) + "\""};
}

StatusOr<trainer::TrainResult> Train(const std::vector<std::string>& overrides) {
  TANDEM_ASSIGN_OR_RETURN(trainer::TrainConfig config, trainer::LoadTrainConfig("", overrides));
  return trainer::RunTraining(config, "test");
}

TEST(S2ftTrainerTest, TrainsSavesAndContinues) {
  TempDir dir;
  const std::string corpus = WriteCorpus(dir);
  const std::vector<std::string> o = Overrides(dir, corpus, "run");
  StatusOr<trainer::TrainResult> r = Train(o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_LT(r->final_loss, r->first_loss - 1.0) << r->first_loss << " -> " << r->final_loss;
  const std::string ckpt = dir.Join("run/checkpoints/step-25");
  ASSERT_TRUE(IsS2ftAdapterDir(ckpt));
  EXPECT_TRUE(fs::exists(ckpt + "/" + kS2ftWeightsFile));
  EXPECT_FALSE(fs::exists(ckpt + "/model.safetensors")) << "only the adapter is saved";

  // Only the blocks trained: 2 layers x (1 kv group of 2 heads, 12 channels), coupled.
  auto ctx = ops::Context::Cpu();
  model::LlamaConfig mc;
  mc.vocab_size = 259;
  mc.hidden_size = 32;
  mc.intermediate_size = 48;
  mc.num_hidden_layers = 2;
  mc.num_attention_heads = 4;
  mc.num_key_value_heads = 2;
  mc.head_dim = 8;
  auto loaded = LoadS2ftAdapter(*ctx, mc, ckpt);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  EXPECT_EQ((*loaded)->num_trainable(),
            2 * (S2ftParamsPerGroup(mc, true) + 12 * S2ftParamsPerChannel(mc, true)));

  // Continuing from the adapter (lr ~ 0) starts near where the first run ended.
  std::vector<std::string> again = Overrides(dir, corpus, "run2");
  again.insert(again.end(),
               {"peft.init_adapter=\"" + ckpt + "\"", "train.steps=1", "train.lr=1e-12"});
  StatusOr<trainer::TrainResult> r2 = Train(again);
  ASSERT_TRUE(r2.ok()) << r2.status().ToString();
  EXPECT_LT(r2->first_loss, r->first_loss - 1.0) << r2->first_loss << " vs " << r->first_loss;
}

TEST(S2ftTrainerTest, BadKeysFailBeforeTraining) {
  TempDir dir;
  const std::string corpus = WriteCorpus(dir);
  for (const auto& [bad, needle] : std::vector<std::pair<std::string, std::string>>{
           {"peft.s2ft_selection=\"best\"", "s2ft_selection"},
           {"peft.s2ft_heads_fraction=1.5", "s2ft_heads_fraction"},
           {"peft.s2ft_seleciton=\"random\"", "s2ft_selection"}}) {
    std::vector<std::string> o = Overrides(dir, corpus, "run");
    o.push_back(bad);
    StatusOr<trainer::TrainResult> r = Train(o);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().ToString();
  }
  std::vector<std::string> none = Overrides(dir, corpus, "run");
  none.insert(none.end(), {"peft.s2ft_heads_fraction=0.0", "peft.s2ft_ffn_fraction=0.0"});
  StatusOr<trainer::TrainResult> r = Train(none);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("selects nothing"), std::string::npos)
      << r.status().ToString();
  EXPECT_FALSE(fs::exists(dir.Join("run/metrics.jsonl")));
}

}  // namespace
}  // namespace tandem::peft
