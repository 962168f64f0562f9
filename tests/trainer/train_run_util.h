// Helpers of the single-process trainer tests that compare whole runs: a corpus, train from --set
// overrides, read a run's per-step losses, and compare two universal checkpoints bit for bit.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "checkpoint/universal.h"
#include "tests/common/testing.h"
#include "tests/parallel/mpi_run_util.h"
#include "trainer/config.h"
#include "trainer/trainer.h"

namespace tandem::trainer::run_util {

// dir/corpus.jsonl, the random-word corpus of tests/parallel/mpi_run_util.h, written on the first
// call; returns its path.
inline std::string WordCorpusIn(const tandem::testing::TempDir& dir, uint32_t seed) {
  const std::string path = dir.Join("corpus.jsonl");
  std::ifstream exists(path);
  if (!exists) tandem::testing::WriteWordCorpus(path, seed);
  return path;
}

// A run of `overrides` (no config file), resumed from `resume` when given ("auto" or a path).
inline StatusOr<TrainResult> Train(std::vector<std::string> overrides,
                                   const std::string& resume = "") {
  if (!resume.empty()) overrides.push_back("train.resume=\"" + resume + "\"");
  TANDEM_ASSIGN_OR_RETURN(TrainConfig config, LoadTrainConfig("", overrides));
  return RunTraining(config, "test");
}

// (step, loss) of every line of run_dir/metrics.jsonl.
inline std::vector<std::pair<int64_t, double>> StepLosses(const std::string& run_dir) {
  std::vector<std::pair<int64_t, double>> out;
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    out.emplace_back(j.at("step").get<int64_t>(), j.at("loss").get<double>());
  }
  return out;
}

// Every tensor of the universal checkpoint `b_path` equals `a_path`'s bitwise (masters and both
// moments), and so do the data position and the RNG state.
inline void ExpectSameUniversalState(const std::string& a_path, const std::string& b_path) {
  auto a = checkpoint::UniversalReader::Open(a_path);
  auto b = checkpoint::UniversalReader::Open(b_path);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  ASSERT_EQ(a->tensors().size(), b->tensors().size());
  EXPECT_EQ(a->meta().data_position_json, b->meta().data_position_json);
  EXPECT_EQ(a->meta().rng_state_json, b->meta().rng_state_json);
  for (const checkpoint::TensorInfo& info : a->tensors()) {
    auto x = a->ReadAll(info.name, info.adapter);
    auto y = b->ReadAll(info.name, info.adapter);
    ASSERT_TRUE(x.ok() && y.ok()) << info.name;
    for (auto [tx, ty] : {std::pair{&x->master, &y->master}, std::pair{&x->exp_avg, &y->exp_avg},
                          std::pair{&x->exp_avg_sq, &y->exp_avg_sq}}) {
      ASSERT_EQ(tx->numel(), ty->numel()) << info.name;
      EXPECT_EQ(0, std::memcmp(tx->data<float>(), ty->data<float>(), tx->numel() * 4))
          << info.name << " differs between " << a_path << " and " << b_path;
    }
  }
}

}  // namespace tandem::trainer::run_util
