// optimizer.offload in the training loop (CPU): a tiny model trained with the AdamW state in host
// memory or in a file (io_uring; buffered where O_DIRECT is refused) gives bitwise the losses,
// final weights (HF safetensors bytes) and optimizer state (universal checkpoint, every element)
// of the on-device optimizer, with several chunks per parameter updated on several threads and
// weight decay off for norms. Universal checkpoints saved under offload resume with and without
// offload (and the reverse) exactly like the run that never stopped. Bad [optimizer] settings
// fail before training with errors naming the key. With grad_clip = 0 the update overlapping the
// last backward is bitwise the same, host and nvme. model.offload = "host" (layer weights streamed
// from host memory) and "nvme" (from a mapped file read with io_uring) change no bit either, with
// the optimizer offloaded or under LoRA and S2FT, and the layer file is gone after the run.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <tuple>

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

// 6 updates, checkpoints after 3 and 6. chunk_mib = 0.001: 262 elements per chunk, so the
// embedding [256, 32] and every projection span several chunks (and a partial last one).
// grad_clip = 0 (no clipping): the offloaded update overlaps the last backward.
std::vector<std::string> Overrides(const testing::TempDir& dir, const std::string& run,
                                   const std::string& offload,
                                   const std::string& grad_clip = "0.5") {
  std::vector<std::string> o = {
      "model.hidden_size=32", "model.intermediate_size=48", "model.num_layers=2",
      "model.num_heads=4", "model.num_kv_heads=2", "model.max_position_embeddings=64",
      "data.dir=\"" + dir.Join("data") + "\"",
      "data.inputs=[\"" + run_util::WordCorpusIn(dir, 11) + "\"]",
      "data.seq_len=32", "train.micro_batch_size=2", "train.grad_accum=2", "train.steps=6",
      "train.save_interval=3", "train.lr=3e-3", "train.warmup_steps=2",
      "train.grad_clip=" + grad_clip, "train.weight_decay=0.1", "train.log_interval=100",
      "train.eval_interval=0", "train.eval_batches=1", "train.out_dir=\"" + dir.Join(run) + "\"",
      "optimizer.offload=\"" + offload + "\"", "optimizer.chunk_mib=0.001", "optimizer.threads=3"};
  if (offload == "nvme") o.push_back("optimizer.nvme_path=\"" + dir.Join(run + "-nvme") + "\"");
  return o;
}



std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}


// The run in `dir`/`run` matches `dir`/"none" (the on-device optimizer) bit for bit.
void ExpectSameAsNone(const testing::TempDir& dir, const std::string& run) {
  EXPECT_EQ(StepLosses(dir.Join(run)), StepLosses(dir.Join("none")));
  EXPECT_EQ(StepLosses(dir.Join(run)).size(), 6u);
  for (const char* step : {"step-3", "step-6"}) {
    const std::string st = StrCat("/checkpoints/", step, "/model.safetensors");
    const std::string want = ReadBytes(dir.Join("none") + st);
    ASSERT_FALSE(want.empty()) << st;
    EXPECT_TRUE(ReadBytes(dir.Join(run) + st) == want) << run << st << " differs";
    const std::string h5 = StrCat("/checkpoints/universal/", step, ".h5");
    ExpectSameState(dir.Join("none") + h5, dir.Join(run) + h5);
  }
}

class OffloadTrainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto none = Train(Overrides(dir_, "none", "none"));
    ASSERT_TRUE(none.ok()) << none.status().ToString();
  }
  // A run directory `run` holding only what `from` had after step 3.
  void CutAfterStep3(const std::string& from, const std::string& run) {
    fs::create_directories(dir_.Join(run + "/checkpoints/universal"));
    fs::copy_file(dir_.Join(from + "/checkpoints/universal/step-3.h5"),
                  dir_.Join(run + "/checkpoints/universal/step-3.h5"));
    std::ofstream latest(dir_.Join(run + "/checkpoints/universal/latest"));
    latest << "step-3.h5\n";
  }
  testing::TempDir dir_;
};

TEST_F(OffloadTrainTest, HostTierIsBitwiseTheDeviceOptimizer) {
  auto host = Train(Overrides(dir_, "host", "host"));
  ASSERT_TRUE(host.ok()) << host.status().ToString();
  ExpectSameAsNone(dir_, "host");
}

// The overrides that stream the layers from `where` ("host" or "nvme"; nvme: a file under
// `dir`/layers-`run`, which must exist and is empty again after the run).
std::vector<std::string> StreamLayers(const testing::TempDir& dir, const std::string& run,
                                      const std::string& where) {
  std::vector<std::string> o = {StrCat("model.offload=\"", where, "\"")};
  if (where == "nvme") {
    fs::create_directories(dir.Join("layers-" + run));
    o.push_back(StrCat("model.nvme_path=\"", dir.Join("layers-" + run), "\""));
  }
  return o;
}
void ExpectLayerFileGone(const testing::TempDir& dir, const std::string& run,
                         const std::string& where) {
  if (where != "nvme") return;
  EXPECT_TRUE(fs::is_empty(dir.Join("layers-" + run))) << "the layer file was left behind";
}

// model.offload = "host" / "nvme": the layer weights stream from host memory or from a file
// (two layers resident).
TEST_F(OffloadTrainTest, StreamedLayersAreBitwiseTheDeviceRun) {
  for (const std::string where : {"host", "nvme"}) {
    SCOPED_TRACE(where);
    const std::string run = "streamed-" + where;
    std::vector<std::string> o = Overrides(dir_, run, "host");
    for (const std::string& x : StreamLayers(dir_, run, where)) o.push_back(x);
    auto streamed = Train(o);
    ASSERT_TRUE(streamed.ok()) << streamed.status().ToString();
    ExpectSameAsNone(dir_, run);
    ExpectLayerFileGone(dir_, run, where);
  }
}

// A frozen base streamed from host memory under LoRA and S2FT: the same losses and adapters.
// LoRA's wide path needs resident weights (a streamed base runs the fast path, which rounds
// differently), so the LoRA runs here turn it off everywhere.
TEST(StreamedBaseTest, AdaptersTrainBitwiseAsOnAResidentBase) {
  testing::TempDir dir;
  for (const char* method : {"lora", "s2ft"}) {
    SCOPED_TRACE(method);
    for (const char* where : {"none", "host", "nvme"}) {
      const std::string run = StrCat(method, "-", where);
      std::vector<std::string> o = Overrides(dir, run, "none");
      o.insert(o.end(),
               {StrCat("peft.method=\"", method, "\""), "peft.r=4", "peft.s2ft_heads_fraction=0.5",
                "peft.s2ft_ffn_fraction=0.25", "train.lr=1e-2", "peft.lora_wide=false"});
      for (const std::string& x : StreamLayers(dir, run, where)) o.push_back(x);
      auto r = Train(o);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      ExpectLayerFileGone(dir, run, where);
    }
    for (const char* where : {"host", "nvme"}) {
      SCOPED_TRACE(where);
      const std::string a = dir.Join(StrCat(method, "-none")),
                        b = dir.Join(StrCat(method, "-", where));
      EXPECT_EQ(StepLosses(a), StepLosses(b));
      EXPECT_EQ(StepLosses(a).size(), 6u);
      int files = 0;
      for (const auto& e : fs::recursive_directory_iterator(a + "/checkpoints/step-6")) {
        if (!e.is_regular_file() || e.path().extension() != ".safetensors") continue;
        const std::string rel = fs::relative(e.path(), a).string();
        EXPECT_TRUE(ReadBytes(a + "/" + rel) == ReadBytes(b + "/" + rel)) << rel << " differs";
        ++files;
      }
      EXPECT_GT(files, 0);
    }
  }
}

TEST_F(OffloadTrainTest, NvmeTierIsBitwiseTheDeviceOptimizerAndRemovesItsFile) {
  auto nvme = Train(Overrides(dir_, "nvme", "nvme"));
  ASSERT_TRUE(nvme.ok()) << nvme.status().ToString();
  ExpectSameAsNone(dir_, "nvme");
  ASSERT_TRUE(fs::is_directory(dir_.Join("nvme-nvme")));
  EXPECT_TRUE(fs::is_empty(dir_.Join("nvme-nvme"))) << "the optimizer-state file was left behind";
}

TEST_F(OffloadTrainTest, CheckpointsResumeAcrossOffloadModes) {
  auto host = Train(Overrides(dir_, "host", "host"));
  ASSERT_TRUE(host.ok()) << host.status().ToString();
  struct Case {
    const char* from;  // whose step-3 checkpoint
    const char* run;
    const char* offload;  // the resumed run's mode
  };
  for (const Case& c :
       {Case{"host", "host-to-none", "none"}, Case{"none", "none-to-host", "host"},
        Case{"host", "host-to-nvme", "nvme"}, Case{"host", "host-to-host", "host"}}) {
    SCOPED_TRACE(c.run);
    CutAfterStep3(c.from, c.run);
    auto resumed = Train(Overrides(dir_, c.run, c.offload), "auto");
    ASSERT_TRUE(resumed.ok()) << resumed.status().ToString();
    EXPECT_EQ(resumed->resumed_from_step, 3);
    EXPECT_EQ(resumed->steps_done, 6);
    const std::vector<std::pair<int64_t, double>> all = StepLosses(dir_.Join("none"));
    ASSERT_EQ(all.size(), 6u);
    const std::vector<std::pair<int64_t, double>> after3(all.begin() + 3, all.end());
    EXPECT_EQ(StepLosses(dir_.Join(c.run)), after3);
    ExpectSameState(dir_.Join("none/checkpoints/universal/step-6.h5"),
                    dir_.Join(std::string(c.run) + "/checkpoints/universal/step-6.h5"));
    const std::string st = "/checkpoints/step-6/model.safetensors";
    EXPECT_TRUE(ReadBytes(dir_.Join(c.run) + st) == ReadBytes(dir_.Join("none") + st));
  }
}

// [delayed] optimizer.delayed_update: a different (one step stale) trajectory that still learns,
// is the same for host and nvme, streamed layers or not, and resumes bitwise from a checkpoint
// (a save applies the pending update, in the uninterrupted run too).
TEST_F(OffloadTrainTest, DelayedUpdateLearnsAndResumesBitwise) {
  auto with = [&](const std::string& run, const std::string& tier,
                  std::vector<std::string> extra = {}) {
    std::vector<std::string> o = Overrides(dir_, run, tier);
    o.push_back("optimizer.delayed_update=true");
    o.insert(o.end(), extra.begin(), extra.end());
    return o;
  };
  auto delayed = Train(with("delayed", "host"));
  ASSERT_TRUE(delayed.ok()) << delayed.status().ToString();
  const auto losses = StepLosses(dir_.Join("delayed"));
  const auto none = StepLosses(dir_.Join("none"));
  ASSERT_EQ(losses.size(), 6u);
  EXPECT_EQ(losses[0], none[0]);  // the same first step
  EXPECT_NE(losses[1], none[1]);  // step 2 still sees the initial weights
  EXPECT_LT(losses.back().second, losses.front().second);
  for (const auto& [run, tier, extra] :
       {std::tuple<std::string, std::string, std::string>{"delayed-nvme", "nvme", ""},
        {"delayed-streamed", "host", "model.offload=\"host\""}}) {
    SCOPED_TRACE(run);
    auto r = Train(with(
        run, tier, extra.empty() ? std::vector<std::string>{} : std::vector<std::string>{extra}));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(StepLosses(dir_.Join(run)), losses);
    const std::string st = "/checkpoints/step-6/model.safetensors";
    EXPECT_TRUE(ReadBytes(dir_.Join(run) + st) == ReadBytes(dir_.Join("delayed") + st));
  }
  // delayed_update_after = 2: updates 1 and 2 are not delayed, so steps 1-3 are the plain run's;
  // update 3 is, but the save after step 3 applies it: step 5 is the first to see stale weights.
  auto after2 = Train(with("delayed-after2", "host", {"optimizer.delayed_update_after=2"}));
  ASSERT_TRUE(after2.ok()) << after2.status().ToString();
  const auto late = StepLosses(dir_.Join("delayed-after2"));
  ASSERT_EQ(late.size(), 6u);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(late[i], none[i]) << "step " << i + 1;
  EXPECT_NE(late[4], none[4]);
  CutAfterStep3("delayed", "delayed-resumed");
  auto resumed = Train(with("delayed-resumed", "host"), "auto");
  ASSERT_TRUE(resumed.ok()) << resumed.status().ToString();
  EXPECT_EQ(resumed->resumed_from_step, 3);
  const std::vector<std::pair<int64_t, double>> after3(losses.begin() + 3, losses.end());
  EXPECT_EQ(StepLosses(dir_.Join("delayed-resumed")), after3);
  ExpectSameState(dir_.Join("delayed/checkpoints/universal/step-6.h5"),
                  dir_.Join("delayed-resumed/checkpoints/universal/step-6.h5"));
}

// [overlap] grad_clip = 0: the update of each chunk starts during the last backward, as its
// gradient becomes final; still bitwise the on-device optimizer (no clipping there either).
class OffloadOverlapTrainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto none = Train(Overrides(dir_, "none", "none", "0"));
    ASSERT_TRUE(none.ok()) << none.status().ToString();
  }
  testing::TempDir dir_;
};

TEST_F(OffloadOverlapTrainTest, HostAndNvmeTiersAreBitwiseTheDeviceOptimizer) {
  for (const char* tier : {"host", "nvme"}) {
    SCOPED_TRACE(tier);
    auto run = Train(Overrides(dir_, tier, tier, "0"));
    ASSERT_TRUE(run.ok()) << run.status().ToString();
    ExpectSameAsNone(dir_, tier);
  }
  // The layers streamed from host memory: the update writes each chunk into the host weights
  // during the last backward while the next layers are copied in.
  for (const std::string where : {"host", "nvme"}) {
    const std::string run = "streamed-" + where;
    std::vector<std::string> o = Overrides(dir_, run, "host", "0");
    for (const std::string& x : StreamLayers(dir_, run, where)) o.push_back(x);
    auto streamed = Train(o);
    ASSERT_TRUE(streamed.ok()) << streamed.status().ToString();
    ExpectSameAsNone(dir_, run);
  }
  // Clipping does change this run (so the comparison above is not vacuous).
  auto clipped = Train(Overrides(dir_, "clipped", "host", "0.5"));
  ASSERT_TRUE(clipped.ok()) << clipped.status().ToString();
  EXPECT_NE(StepLosses(dir_.Join("clipped")), StepLosses(dir_.Join("none")));
}

// The error of loading a config with `extra` overrides, expected to name every string in `names`.
void ExpectConfigError(const std::vector<std::string>& extra,
                       const std::vector<std::string>& names) {
  std::vector<std::string> o = {"data.dir=\"/nonexistent\""};
  o.insert(o.end(), extra.begin(), extra.end());
  auto c = LoadTrainConfig("", o);
  ASSERT_FALSE(c.ok()) << "accepted: " << ::testing::PrintToString(extra);
  for (const std::string& name : names) {
    EXPECT_NE(c.status().message().find(name), std::string::npos)
        << "'" << name << "' not in: " << c.status().message();
  }
}

TEST(OffloadConfigTest, BadSettingsNameTheKey) {
  ExpectConfigError({"optimizer.offload=\"gpu\""}, {"optimizer.offload", "gpu"});
  ExpectConfigError({"optimizer.offload=\"nvme\""}, {"optimizer.nvme_path"});
  ExpectConfigError({"optimizer.offload=\"host\"", "parallel.tp=2"},
                    {"optimizer.offload", "parallel.tp = 2"});
  ExpectConfigError({"optimizer.offload=\"host\"", "parallel.dp=2"}, {"parallel.dp = 2"});
  ExpectConfigError({"optimizer.offload=\"host\"", "peft.method=\"lora\""},
                    {"optimizer.offload", "peft.method"});
  ExpectConfigError({"optimizer.offload=\"host\"", "snapshot.agent_socket=\"/tmp/a.sock\""},
                    {"snapshot.agent_socket"});
  ExpectConfigError({"optimizer.offload=\"host\"", "optimizer.threads=0"}, {"optimizer.threads"});
  ExpectConfigError({"optimizer.offload=\"host\"", "optimizer.chunk_mib=0"},
                    {"optimizer.chunk_mib"});
  ExpectConfigError({"model.offload=\"host\""},
                    {"model.offload", "optimizer.offload", "peft.method"});
  ExpectConfigError({"model.offload=\"nvme\""}, {"model.offload", "nvme"});
  ExpectConfigError({"model.offload=\"nvme\"", "peft.method=\"lora\""}, {"model.nvme_path"});
  ExpectConfigError({"optimizer.delayed_update=true"},
                    {"optimizer.delayed_update", "optimizer.offload"});
  ExpectConfigError({"model.offload=\"host\"", "peft.method=\"lora\"", "parallel.zero=1"},
                    {"model.offload", "parallel.zero = 1"});
  EXPECT_TRUE(LoadTrainConfig("", {"data.dir=\"/x\"", "model.offload=\"host\"",
                                   "peft.method=\"lora\"", "parallel.dp=2"})
                  .ok());
  auto ok = LoadTrainConfig("", {"data.dir=\"/x\"", "optimizer.offload=\"nvme\"",
                                 "optimizer.nvme_path=\"/x\""});
  EXPECT_TRUE(ok.ok()) << ok.status().ToString();
}

}  // namespace
}  // namespace tandem::trainer
