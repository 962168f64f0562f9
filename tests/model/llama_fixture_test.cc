// LlamaModel on the CPU (f32) against Hugging Face transformers (f32, eager attention): logits,
// mean loss, every parameter's gradient, RoPE frequencies, and the losses of 5 AdamW steps, for
// every fixture under tests/golden/ (see tests/model/llama_golden.h for the format).
//
// Tolerances (f32 vs f32, different summation orders): logits and gradients max|a - e| /
// max|e| <= 1e-4 per tensor; mean loss and each AdamW-step loss within 1e-4 relative; RoPE
// inverse frequencies within 1e-6 relative. Skipped only when tests/golden does not exist; when
// it does, every fixture in it must pass.
#include <gtest/gtest.h>

#include <cmath>

#include "model/rope.h"
#include "tests/model/llama_golden.h"

namespace tandem::model {
namespace {

constexpr double kTensorRel = 1e-4;
constexpr double kLossRel = 1e-4;

void CheckFixture(const std::string& dir) {
  SCOPED_TRACE("fixture " + dir);
  StatusOr<golden::GoldenCase> gs = golden::LoadCase(dir);
  ASSERT_TRUE(gs.ok()) << gs.status().ToString();
  const golden::GoldenCase& g = *gs;
  auto ctx = ops::Context::Cpu();
  StatusOr<std::unique_ptr<LlamaModel>> ms = LlamaModel::Create(*ctx, g.config, ModelOptions{});
  ASSERT_TRUE(ms.ok()) << ms.status().ToString();
  LlamaModel& model = **ms;
  Status s = model.LoadSafetensors(dir);
  ASSERT_TRUE(s.ok()) << s.ToString();

  if (g.expected.Find("rope.inv_freq") != nullptr) {
    const Tensor expected = *g.expected.Get("rope.inv_freq");
    const std::vector<float> inv = RopeInvFreq(g.config);
    ASSERT_EQ(static_cast<int64_t>(inv.size()), expected.numel());
    for (size_t i = 0; i < inv.size(); ++i) {
      const float e = expected.data<float>()[i];
      EXPECT_NEAR(inv[i], e, 1e-6 * std::fabs(e)) << "inv_freq[" << i << "]";
    }
  }

  StatusOr<Tensor> logits = model.Logits(g.batch);
  ASSERT_TRUE(logits.ok()) << logits.status().ToString();
  const Tensor expected_logits = *g.expected.Get("logits");
  ASSERT_EQ(logits->shape(), expected_logits.shape());
  EXPECT_LE(testing::MaxRelativeError(*logits, expected_logits), kTensorRel) << "logits";

  ASSERT_TRUE(model.ZeroGrads().ok());
  StatusOr<LossSum> loss = model.ForwardBackward(g.batch, 1.0f / g.count);
  ASSERT_TRUE(loss.ok()) << loss.status().ToString();
  EXPECT_EQ(loss->count, g.count);
  const double expected_loss = g.expected.Get("loss")->data<float>()[0];
  EXPECT_NEAR(loss->sum / loss->count, expected_loss, kLossRel * std::fabs(expected_loss));

  size_t grads_in_file = 0;
  for (const SafetensorsTensorInfo& t : g.expected.tensors())
    grads_in_file += t.name.rfind("grad.", 0) == 0;
  EXPECT_EQ(grads_in_file, model.parameters().size()) << "grad.* tensors vs model parameters";
  for (const Parameter& p : model.parameters()) {
    StatusOr<Tensor> e = g.expected.Get("grad." + p.name);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    ASSERT_EQ(e->shape(), p.grad.shape()) << p.name;
    EXPECT_LE(testing::MaxRelativeError(p.grad, *e), kTensorRel) << "grad of " << p.name;
  }

  const Tensor expected_steps = *g.expected.Get("adamw_losses");
  StatusOr<std::vector<double>> steps =
      golden::AdamWLosses(*ctx, model, g, static_cast<int>(expected_steps.numel()));
  ASSERT_TRUE(steps.ok()) << steps.status().ToString();
  for (size_t i = 0; i < steps->size(); ++i) {
    const double e = expected_steps.data<float>()[i];
    EXPECT_NEAR((*steps)[i], e, kLossRel * std::fabs(e)) << "loss before AdamW step " << i + 1;
  }
}

TEST(LlamaFixtureTest, MatchesTransformers) {
  const std::optional<std::vector<std::string>> dirs = golden::ModelFixtureDirs();
  if (!dirs) {
    GTEST_SKIP() << "no golden fixtures: directory " << golden::GoldenRoot()
                 << " does not exist (write them with scripts/make_fixtures.py --out tests/golden)";
  }
  ASSERT_FALSE(dirs->empty()) << golden::GoldenRoot()
                              << " exists but holds no model fixture (no */expected.safetensors)";
  for (const std::string& dir : *dirs) CheckFixture(dir);
}

}  // namespace
}  // namespace tandem::model
