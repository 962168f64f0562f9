// mpi-ranks: 4
// Universal checkpoints across meshes (`tandem train` under mpirun): a run saved under
// dp2 x tp2 with ZeRO-1 at step 3 resumes
//   - under the same mesh: losses and the step-6 checkpoint bitwise equal to the run that never
//     stopped;
//   - under dp4 (ZeRO-1), tp4, cp2 x tp2 (no ZeRO) and one rank (dp1 x tp1): losses within 1e-5
//     relative and step-6 weights and moments within 1e-4 + 1e-4 |x| of it (sums run in another
//     order; the bound of tests/parallel/train_mpi_test.cc).
// The global batch is the same everywhere (4 sequences). f32 on the CPU.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "checkpoint/universal.h"
#include "collectives/mpi.h"
#include "tests/collectives/mpi_test_main.h"
#include "tests/common/testing.h"
#include "tests/parallel/mpi_run_util.h"
#include "trainer/trainer.h"

namespace tandem::trainer {
namespace {

using collectives::Communicator;
namespace fs = std::filesystem;

struct Mesh {
  int dp, cp, tp;
  bool zero;
};

std::string Name(const Mesh& m) { return StrCat("dp", m.dp, "cp", m.cp, "tp", m.tp, m.zero ? "z" : ""); }

std::vector<std::string> Overrides(const std::string& dir, const std::string& run, const Mesh& m) {
  return {"model.hidden_size=32",
          "model.intermediate_size=48",
          "model.num_layers=2",
          "model.num_heads=4",
          "model.num_kv_heads=2",
          "model.max_position_embeddings=64",
          "data.dir=\"" + dir + "/data\"",
          "data.inputs=[\"" + dir + "/corpus.jsonl\"]",
          "data.seq_len=32",
          StrCat("train.micro_batch_size=", 4 / m.dp),
          "train.steps=6",
          "train.save_interval=3",
          "train.lr=3e-3",
          "train.warmup_steps=2",
          "train.log_interval=100",
          "train.eval_interval=0",
          "train.eval_batches=1",
          "train.out_dir=\"" + dir + "/" + run + "\"",
          StrCat("parallel.dp=", m.dp),
          StrCat("parallel.cp=", m.cp),
          StrCat("parallel.tp=", m.tp),
          StrCat("parallel.zero=", m.zero ? 1 : 0)};
}

std::vector<double> Losses(const std::string& run_dir) {
  std::vector<double> losses;
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) losses.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  return losses;
}

// Every dataset of `got` against `want`: bitwise when `exact`, else 1e-4 + 1e-4 |want|.
void ExpectState(const std::string& want_path, const std::string& got_path, bool exact,
                 const std::string& what) {
  auto a = checkpoint::UniversalReader::Open(want_path);
  auto b = checkpoint::UniversalReader::Open(got_path);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << what << ": " << b.status().ToString();
  ASSERT_EQ(a->tensors().size(), b->tensors().size()) << what;
  EXPECT_EQ(a->meta().data_position_json, b->meta().data_position_json) << what;
  for (const checkpoint::TensorInfo& info : a->tensors()) {
    auto x = a->ReadAll(info.name, info.adapter);
    auto y = b->ReadAll(info.name, info.adapter);
    ASSERT_TRUE(x.ok() && y.ok()) << what << " " << info.name;
    const std::pair<const Tensor*, const Tensor*> pairs[] = {
        {&x->master, &y->master}, {&x->exp_avg, &y->exp_avg}, {&x->exp_avg_sq, &y->exp_avg_sq}};
    for (const auto& [tx, ty] : pairs) {
      ASSERT_EQ(tx->shape(), ty->shape()) << what << " " << info.name;
      if (exact) {
        EXPECT_EQ(0, std::memcmp(tx->data<float>(), ty->data<float>(), tx->numel() * 4))
            << what << " " << info.name;
      } else {
        EXPECT_TRUE(tandem::testing::AllClose(*ty, *tx, {1e-4, 1e-4})) << what << " " << info.name;
      }
    }
  }
}

TEST(ResumeUnderMpi, ContinuesUnderAnyMesh) {
  auto world_or = collectives::CreateMpiWorld({.timeout_s = 120});
  ASSERT_TRUE(world_or.ok()) << world_or.status().ToString();
  Communicator& world = **world_or;
  ASSERT_EQ(world.size(), 4);
  tandem::testing::TempDir tmp;
  const std::string dir = tandem::testing::SharedDir(world, tmp);
  if (world.rank() == 0) tandem::testing::WriteWordCorpus(dir + "/corpus.jsonl", 13);
  const Mesh saved{2, 1, 2, true};
  TrainEnv env;
  env.world = &world;
  {
    auto cfg = LoadTrainConfig("", Overrides(dir, "ref", saved));
    ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
    auto ref = RunTraining(*cfg, "test", env);
    ASSERT_TRUE(ref.ok()) << ref.status().ToString();
  }
  const std::string step3 = dir + "/ref/checkpoints/universal/step-3.h5";
  const std::string want6 = dir + "/ref/checkpoints/universal/step-6.h5";
  const std::vector<double> want = Losses(dir + "/ref");
  // One rank alone: the others join no group.
  auto solo = world.Split(world.rank() == 0 ? 0 : collectives::kNoColor, 0, "solo");
  ASSERT_TRUE(solo.ok()) << solo.status().ToString();
  const std::vector<Mesh> meshes = {saved, {4, 1, 1, true}, {1, 1, 4, false}, {1, 2, 2, false},
                                    {1, 1, 1, false}};
  for (const Mesh& m : meshes) {
    const bool one_rank = m.dp * m.cp * m.tp == 1;
    const std::string run = "resumed-" + Name(m);
    if (!one_rank || world.rank() == 0) {
      std::vector<std::string> o = Overrides(dir, run, m);
      o.push_back("train.resume=\"" + step3 + "\"");
      auto cfg = LoadTrainConfig("", o);
      ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
      TrainEnv e;
      e.world = one_rank ? solo->get() : &world;
      auto r = RunTraining(*cfg, "test", e);
      ASSERT_TRUE(r.ok()) << run << ": " << r.status().ToString();
      EXPECT_EQ(r->resumed_from_step, 3) << run;
    }
    ASSERT_TRUE(world.Barrier().ok());
    if (world.rank() != 0) continue;
    const bool exact = m.dp == saved.dp && m.cp == saved.cp && m.tp == saved.tp && m.zero == saved.zero;
    const std::vector<double> got = Losses(dir + "/" + run);
    ASSERT_EQ(got.size(), 3u) << run << ": steps 4, 5 and 6";
    for (size_t i = 0; i < got.size(); ++i) {
      if (exact) {
        EXPECT_EQ(got[i], want[3 + i]) << run << " step " << i + 4;
      } else {
        EXPECT_NEAR(got[i], want[3 + i], 1e-5 * want[3 + i]) << run << " step " << i + 4;
      }
    }
    ExpectState(want6, dir + "/" + run + "/checkpoints/universal/step-6.h5", exact, run);
  }
  EXPECT_TRUE(world.Close().ok());
}

}  // namespace
}  // namespace tandem::trainer

TANDEM_MPI_TEST_MAIN()
