// optimizer.offload = "host" and "nvme" on a GPU: the gradients go device -> pinned slabs -> CPU
// AdamW and the bf16 weights come back on a side stream. Against the on-device optimizer (whose
// CUDA kernel may contract multiply-adds, so a few f32 ulps apart): the first loss is identical,
// the state after update 1 agrees in every element within 1e-5 relative + 1e-7 absolute (a chunk
// updated with the wrong gradient or offset would be off by about lr = 3e-3), the second loss
// within 1e-3 relative (it reads the bf16 weights copied back). The HF checkpoint of the offloaded
// run holds its f32 masters bitwise (read back from the optimizer, not the bf16 device weights).
// With grad_clip = 0 the update overlaps backward and is bitwise the update after it.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <tuple>

#include "checkpoint/universal.h"
#include "model/safetensors.h"
#include "tests/common/testing.h"
#include "tests/trainer/train_run_util.h"
#include "trainer/config.h"
#include "trainer/trainer.h"

namespace tandem::trainer {
namespace {

// `grad_clip` empty: the config's default.
StatusOr<TrainResult> Train(const testing::TempDir& dir, const std::string& run,
                            const std::string& offload, const std::string& grad_clip = "",
                            const std::vector<std::string>& extra = {}) {
  std::vector<std::string> overrides = {
      "model.hidden_size=256", "model.intermediate_size=96", "model.num_layers=2",  // head_dim 64
      "model.num_heads=4", "model.num_kv_heads=2", "model.max_position_embeddings=64",
      "data.dir=\"" + dir.Join("data") + "\"",
      "data.inputs=[\"" + run_util::WordCorpusIn(dir, 13) + "\"]",
      "data.seq_len=32", "train.device=\"cuda:0\"", "train.micro_batch_size=2", "train.steps=2",
      "train.save_interval=1", "train.lr=3e-3", "train.warmup_steps=0", "train.weight_decay=0.1",
      "train.log_interval=100", "train.eval_interval=0", "train.eval_batches=0",
      "train.out_dir=\"" + dir.Join(run) + "\"", "optimizer.offload=\"" + offload + "\"",
      "optimizer.chunk_mib=0.001", "optimizer.threads=3"};
  if (!grad_clip.empty()) overrides.push_back("train.grad_clip=" + grad_clip);
  overrides.insert(overrides.end(), extra.begin(), extra.end());
  if (offload == "nvme") {
    overrides.push_back("optimizer.nvme_path=\"" + dir.Join("nvme-state") + "\"");
  }
  TANDEM_ASSIGN_OR_RETURN(TrainConfig config, LoadTrainConfig("", overrides));
  return RunTraining(config, "test");
}

std::vector<double> Losses(const std::string& run_dir) {
  std::vector<double> out;
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    out.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  }
  return out;
}

// The run `run` (offload = `offload`, default `run`) against the run "none" in `dir`.
void ExpectCloseToNone(const testing::TempDir& dir, const std::string& run,
                       const std::string& offload = "", const std::string& grad_clip = "") {
  auto trained = Train(dir, run, offload.empty() ? run : offload, grad_clip);
  ASSERT_TRUE(trained.ok()) << trained.status().ToString();
  const std::vector<double> a = Losses(dir.Join("none")), b = Losses(dir.Join(run));
  ASSERT_EQ(a.size(), 2u);
  ASSERT_EQ(b.size(), 2u);
  EXPECT_EQ(a[0], b[0]);
  EXPECT_NEAR(a[1], b[1], 1e-3 * std::abs(a[1]));

  auto x = checkpoint::UniversalReader::Open(dir.Join("none/checkpoints/universal/step-1.h5"));
  auto y = checkpoint::UniversalReader::Open(dir.Join(run + "/checkpoints/universal/step-1.h5"));
  ASSERT_TRUE(x.ok() && y.ok());
  auto hf = model::SafetensorsCheckpoint::Open(dir.Join(run + "/checkpoints/step-1"));
  ASSERT_TRUE(hf.ok()) << hf.status().ToString();
  ASSERT_EQ(x->tensors().size(), y->tensors().size());
  for (const checkpoint::TensorInfo& info : x->tensors()) {
    auto sx = x->ReadAll(info.name);
    auto sy = y->ReadAll(info.name);
    ASSERT_TRUE(sx.ok() && sy.ok()) << info.name;
    for (auto [tx, ty] : {std::pair{&sx->master, &sy->master},
                          std::pair{&sx->exp_avg, &sy->exp_avg},
                          std::pair{&sx->exp_avg_sq, &sy->exp_avg_sq}}) {
      ASSERT_EQ(tx->numel(), ty->numel()) << info.name;
      const float* p = tx->data<float>();
      const float* q = ty->data<float>();
      int64_t bad = 0;
      for (int64_t i = 0; i < tx->numel(); ++i) {
        bad += !(std::abs(p[i] - q[i]) <= 1e-5f * std::abs(p[i]) + 1e-7f);
      }
      EXPECT_EQ(bad, 0) << info.name << ": elements outside the tolerance";
    }
    auto w = hf->GetFloat(info.name, info.shape);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    EXPECT_EQ(0, std::memcmp(w->data<float>(), sy->master.data<float>(), w->numel() * 4))
        << info.name << ": the HF checkpoint is not the offloaded f32 master";
  }
}

TEST(OffloadTrainGpuTest, HostAndNvmeOffloadMatchTheDeviceOptimizer) {
  TANDEM_SKIP_WITHOUT_GPU();
  testing::TempDir dir;
  auto none = Train(dir, "none", "none");
  ASSERT_TRUE(none.ok()) << none.status().ToString();
  {
    SCOPED_TRACE("host");
    ExpectCloseToNone(dir, "host");
  }
  {
    SCOPED_TRACE("nvme");
    ExpectCloseToNone(dir, "nvme");
  }
}

// [overlap] grad_clip = 0: each chunk's update starts during the last backward as its gradient
// becomes final, the bf16 weights go back while backward runs and the next forward waits on the
// upload event. Close to the on-device optimizer as above, and bitwise (both losses, every element
// of the state after updates 1 and 2) the same offloaded run with the update after backward
// (grad_clip = 1e9 never clips: scale exactly 1; the model's CUDA ops are deterministic).
TEST(OffloadTrainGpuTest, OverlappedUpdateIsBitwiseTheUpdateAfterBackward) {
  TANDEM_SKIP_WITHOUT_GPU();
  testing::TempDir dir;
  auto none = Train(dir, "none", "none", "0");
  ASSERT_TRUE(none.ok()) << none.status().ToString();
  for (const char* tier : {"host", "nvme"}) {
    SCOPED_TRACE(tier);
    ExpectCloseToNone(dir, tier, tier, "0");
  }
  auto after = Train(dir, "after", "host", "1e9");
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  EXPECT_EQ(Losses(dir.Join("after")), Losses(dir.Join("host")));
  for (const char* step : {"step-1", "step-2"}) {  // overlapped and after-backward: bitwise
    const std::string h5 = StrCat("/checkpoints/universal/", step, ".h5");
    run_util::ExpectSameUniversalState(dir.Join("after") + h5, dir.Join("host") + h5);
  }
}

// [delayed] optimizer.delayed_update on a GPU: gradients copied to the host buffer during the
// last backward, bf16 weights uploaded after the step (or copied into streamed host layers): the
// same losses and final weights for host and nvme state and with layers streamed from host
// memory or from a file, and a
// trajectory other than the undelayed one from step 2 (which still sees the initial weights).
TEST(OffloadTrainGpuTest, DelayedUpdateIsTheSameOnEveryTierAndWithStreamedLayers) {
  TANDEM_SKIP_WITHOUT_GPU();
  testing::TempDir dir;
  const std::vector<std::string> four = {"train.steps=4", "train.save_interval=0"};
  auto plain = Train(dir, "plain", "host", "", four);
  ASSERT_TRUE(plain.ok()) << plain.status().ToString();
  std::vector<std::string> delayed = four;
  delayed.push_back("optimizer.delayed_update=true");
  std::vector<std::string> streamed = delayed;
  streamed.push_back("model.offload=\"host\"");
  // The layers in a mapped file, read with io_uring (model.offload = "nvme").
  std::vector<std::string> from_file = delayed;
  std::filesystem::create_directories(dir.Join("layers"));
  from_file.push_back("model.offload=\"nvme\"");
  from_file.push_back(StrCat("model.nvme_path=\"", dir.Join("layers"), "\""));
  for (const auto& [run, tier, extra] :
       {std::tuple<std::string, std::string, std::vector<std::string>>{"dpu-host", "host", delayed},
        {"dpu-nvme", "nvme", delayed},
        {"dpu-streamed", "host", streamed},
        {"dpu-streamed-nvme", "host", from_file}}) {
    SCOPED_TRACE(run);
    auto r = Train(dir, run, tier, "", extra);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
  }
  const std::vector<double> losses = Losses(dir.Join("dpu-host"));
  ASSERT_EQ(losses.size(), 4u);
  const std::vector<double> undelayed = Losses(dir.Join("plain"));
  EXPECT_EQ(losses[0], undelayed[0]);
  EXPECT_NE(losses[1], undelayed[1]);
  EXPECT_LT(losses[3], losses[0]);
  const std::string st = "/checkpoints/step-4/model.safetensors";
  std::ifstream a(dir.Join("dpu-host") + st, std::ios::binary);
  const std::string want((std::istreambuf_iterator<char>(a)), {});
  ASSERT_FALSE(want.empty());
  for (const char* run : {"dpu-nvme", "dpu-streamed", "dpu-streamed-nvme"}) {
    EXPECT_EQ(Losses(dir.Join(run)), losses) << run;
    std::ifstream b(dir.Join(run) + st, std::ios::binary);
    EXPECT_TRUE(std::string((std::istreambuf_iterator<char>(b)), {}) == want) << run;
  }
}

}  // namespace
}  // namespace tandem::trainer
