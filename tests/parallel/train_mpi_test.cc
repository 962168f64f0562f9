// mpi-ranks: 2 4
// `tandem train` under mpirun (trainer::RunTraining with an MPI world): on each mesh of the world
// size the per-step losses and the final checkpoint match a one-process run of the same global
// batch (rank 0 runs that first, in the same process), for full training and for LoRA (dp x cp).
// f32 CPU; tolerances below.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "collectives/mpi.h"
#include "model/safetensors.h"
#include "tests/collectives/mpi_test_main.h"
#include "tests/common/testing.h"
#include "tests/parallel/mpi_run_util.h"
#include "trainer/trainer.h"

namespace tandem::trainer {
namespace {

using collectives::Communicator;

std::vector<std::string> Overrides(const std::string& dir, const std::string& run, int64_t mb) {
  return {"model.hidden_size=32",
          "model.intermediate_size=48",
          "model.num_layers=2",
          "model.num_heads=4",
          "model.num_kv_heads=2",
          "model.max_position_embeddings=64",
          "data.dir=\"" + dir + "/data\"",
          "data.inputs=[\"" + dir + "/corpus.jsonl\"]",
          "data.seq_len=32",
          "train.micro_batch_size=" + std::to_string(mb),
          "train.steps=6",
          "train.lr=3e-3",
          "train.warmup_steps=2",
          "train.log_interval=100",
          "train.eval_interval=0",
          "train.eval_batches=1",
          "train.out_dir=\"" + dir + "/" + run + "\""};
}

std::vector<double> Losses(const std::string& run_dir) {
  std::vector<double> losses;
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line))
    losses.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  return losses;
}

struct Mesh {
  int dp, cp, tp;
  bool zero;
  bool lora = false;
};

const char* kLora[] = {"peft.method=\"lora\"", "peft.r=4", "train.lr=1e-2"};

TEST(TrainUnderMpi, LossesAndCheckpointMatchOneProcess) {
  auto world_or = collectives::CreateMpiWorld({.timeout_s = 60});
  ASSERT_TRUE(world_or.ok()) << world_or.status().ToString();
  Communicator& world = **world_or;
  tandem::testing::TempDir tmp;
  const std::string dir = tandem::testing::SharedDir(world, tmp);
  const int64_t global_rows = 4;
  if (world.rank() == 0) {
    tandem::testing::WriteWordCorpus(dir + "/corpus.jsonl", 11);
    auto cfg = LoadTrainConfig("", Overrides(dir, "single", global_rows));
    ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
    auto single = RunTraining(*cfg, "test");
    ASSERT_TRUE(single.ok()) << single.status().ToString();
    std::vector<std::string> lo = Overrides(dir, "single-lora", global_rows);
    lo.insert(lo.end(), std::begin(kLora), std::end(kLora));
    auto lcfg = LoadTrainConfig("", lo);
    ASSERT_TRUE(lcfg.ok()) << lcfg.status().ToString();
    auto single_lora = RunTraining(*lcfg, "test");
    ASSERT_TRUE(single_lora.ok()) << single_lora.status().ToString();
  }
  ASSERT_TRUE(world.Barrier().ok());
  const std::vector<Mesh> meshes =
      world.size() == 2
          ? std::vector<Mesh>{{1, 1, 2, false},
                              {2, 1, 1, true},
                              {1, 2, 1, false},
                              {2, 1, 1, false, true}}
          : std::vector<Mesh>{
                {2, 1, 2, false}, {1, 2, 2, true}, {1, 1, 4, false}, {2, 2, 1, false, true}};
  for (const Mesh& m : meshes) {
    const std::string run = StrCat("dp", m.dp, "cp", m.cp, "tp", m.tp, m.lora ? "-lora" : "");
    const std::string ref = m.lora ? "single-lora" : "single";
    std::vector<std::string> o = Overrides(dir, run, global_rows / m.dp);
    if (m.lora) o.insert(o.end(), std::begin(kLora), std::end(kLora));
    o.push_back(StrCat("parallel.dp=", m.dp));
    o.push_back(StrCat("parallel.cp=", m.cp));
    o.push_back(StrCat("parallel.tp=", m.tp));
    o.push_back(StrCat("parallel.zero=", m.zero ? 1 : 0));
    auto cfg = LoadTrainConfig("", o);
    ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
    TrainEnv env;
    env.world = &world;
    auto result = RunTraining(*cfg, "test", env);
    ASSERT_TRUE(result.ok()) << run << ": " << result.status().ToString();
    if (world.rank() != 0) continue;
    // Losses: 1e-5 relative per step (sums in another order); weights after 6 steps: every
    // element within 1e-4 + 1e-4 |w| (see tests/parallel/parallel_test_util.h for why).
    const std::vector<double> want = Losses(dir + "/" + ref), got = Losses(dir + "/" + run);
    ASSERT_EQ(got.size(), want.size()) << run;
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(got[i], want[i], 1e-5 * want[i]) << run << " step " << i + 1;
    }
    const std::string file = m.lora ? "/checkpoints/step-6/adapter_model.safetensors"
                                    : "/checkpoints/step-6/model.safetensors";
    auto a = model::SafetensorsCheckpoint::Open(dir + "/" + ref + file);
    auto b = model::SafetensorsCheckpoint::Open(dir + "/" + run + file);
    ASSERT_TRUE(a.ok() && b.ok()) << run;
    ASSERT_EQ(a->names(), b->names()) << run;
    for (const std::string& name : a->names()) {
      auto wa = a->GetFloat(name, a->Find(name)->shape);
      auto wb = b->GetFloat(name, a->Find(name)->shape);
      ASSERT_TRUE(wa.ok() && wb.ok()) << run << " " << name;
      EXPECT_TRUE(tandem::testing::AllClose(*wb, *wa, {1e-4, 1e-4})) << run << " " << name;
    }
  }
  EXPECT_TRUE(world.Close().ok());
}

// bf16 optimizer state is one rank only: under mpirun (dp = 0: the world) every rank refuses it
// before building the model, naming the setting.
TEST(TrainUnderMpi, Bf16OptimizerStateIsRefusedOnAMesh) {
  auto world_or = collectives::CreateMpiWorld({.timeout_s = 60});
  ASSERT_TRUE(world_or.ok()) << world_or.status().ToString();
  Communicator& world = **world_or;
  tandem::testing::TempDir tmp;
  const std::string dir = tandem::testing::SharedDir(world, tmp);
  std::vector<std::string> o = Overrides(dir, "bf16", 2);
  o.push_back("optimizer.precision=\"bf16\"");
  auto cfg = LoadTrainConfig("", o);
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  TrainEnv env;
  env.world = &world;
  auto r = RunTraining(*cfg, "test", env);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kUnimplemented) << r.status().ToString();
  EXPECT_NE(r.status().message().find("optimizer.precision"), std::string::npos) << r.status().ToString();
  EXPECT_TRUE(world.Close().ok());
}

}  // namespace
}  // namespace tandem::trainer

TANDEM_MPI_TEST_MAIN()
