// tandem's LoRA against HF PEFT (CPU, f32): the fixtures under tests/golden/peft/<name>/ written by
// scripts/make_fixtures.py (write_peft) hold a base model, an adapter saved by PEFT's
// save_pretrained, and PEFT's logits, loss and LoRA gradients for one batch. Loading PEFT's files
// into tandem must give PEFT's numbers. Skips with a message when no fixtures exist.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/safetensors.h"
#include "peft/adapter_io.h"
#include "tests/peft/peft_test_util.h"

namespace tandem::peft {
namespace {

// $TANDEM_GOLDEN_DIR/peft or tests/golden/peft of the source tree.
std::string PeftGoldenRoot() {
  const char* env = std::getenv("TANDEM_GOLDEN_DIR");
  const std::string root = env != nullptr && *env != '\0'
                               ? std::string(env)
                               : ::tandem::testing::SourceDir() + "/tests/golden";
  return root + "/peft";
}

std::vector<std::string> FixtureDirs() {
  namespace fs = std::filesystem;
  std::vector<std::string> dirs;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(PeftGoldenRoot(), ec)) {
    if (e.is_directory() && fs::exists(e.path() / "expected.safetensors")) {
      dirs.push_back(e.path().string());
    }
  }
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

// targets[t] = labels[t + 1] (transformers shifts labels inside the model), last position ignored.
model::Batch BatchOf(const model::SafetensorsFile& expected, int64_t* count) {
  const Tensor ids = *expected.Get("input_ids");
  const Tensor labels = *expected.Get("labels");
  const int64_t B = ids.dim(0), T = ids.dim(1);
  model::Batch batch;
  batch.tokens = testing::Clone(ids);
  batch.targets = Tensor::Cpu({B, T}, DType::kI32);
  *count = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int32_t target = t + 1 < T ? labels.data<int32_t>()[b * T + t + 1] : ops::kIgnoreIndex;
      batch.targets.data<int32_t>()[b * T + t] = target;
      *count += target != ops::kIgnoreIndex;
    }
  }
  return batch;
}

void CheckFixture(const std::string& dir) {
  SCOPED_TRACE(dir);
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig config = *model::LoadLlamaConfig(dir + "/base/config.json");
  model::ModelOptions options;
  options.trainable = false;
  auto base = std::move(model::LlamaModel::Create(*ctx, config, options)).value();
  ASSERT_TRUE(base->LoadSafetensors(dir + "/base").ok());
  auto adapter = LoadLoraAdapter(*ctx, config, dir + "/adapter");
  ASSERT_TRUE(adapter.ok()) << adapter.status().ToString();
  AdapterSet set(*ctx, config);
  ASSERT_TRUE(set.Add(std::move(adapter).value()).ok());
  base->SetAdapter(&set);

  const model::SafetensorsFile expected =
      *model::SafetensorsFile::Open(dir + "/expected.safetensors");
  int64_t count = 0;
  const model::Batch batch = BatchOf(expected, &count);
  const Tensor logits = *base->Logits(batch);
  EXPECT_LT(::tandem::testing::MaxRelativeError(logits, *expected.Get("logits")), 1e-4) << "logits";
  ASSERT_TRUE(base->ZeroGrads().ok());
  const model::LossSum loss = *base->ForwardBackward(batch, 1.0f / static_cast<float>(count));
  const float want = expected.Get("loss")->data<float>()[0];
  EXPECT_NEAR(loss.sum / loss.count, want, 1e-5 * std::fabs(want)) << "loss";
  int checked = 0;
  for (const model::Parameter& p : set.adapter(0).parameters()) {
    auto g = expected.Get("grad." + p.name);
    ASSERT_TRUE(g.ok()) << "expected.safetensors has no grad." << p.name;
    EXPECT_LT(::tandem::testing::MaxRelativeError(*CopyToHostBlocking(p.grad), *g), 1e-4) << p.name;
    ++checked;
  }
  int in_file = 0;
  for (const auto& info : expected.tensors()) in_file += info.name.rfind("grad.", 0) == 0;
  EXPECT_EQ(checked, in_file) << "PEFT trained tensors tandem does not have";
}

TEST(LoraGoldenTest, MatchesHfPeft) {
  const std::vector<std::string> dirs = FixtureDirs();
  if (dirs.empty()) {
    GTEST_SKIP() << "no HF PEFT fixtures under " << PeftGoldenRoot()
                 << ": generate them with scripts/make_fixtures.py (needs torch, transformers, "
                    "peft)";
  }
  for (const std::string& dir : dirs) CheckFixture(dir);
}

}  // namespace
}  // namespace tandem::peft
