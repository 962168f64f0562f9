// LoraConfig resolution (targets, patterns, scales), PEFT initialization, adapter_config.json
// text.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "peft/adapter_io.h"
#include "tests/peft/peft_test_util.h"

namespace tandem::peft {
namespace {

using model::Projection;
using testing::TinyConfig;

std::vector<std::string> Modules(const std::vector<LoraTarget>& ts) {
  std::vector<std::string> out;
  for (const LoraTarget& t : ts) out.push_back(t.module);
  return out;
}

TEST(LoraConfigTest, AllLinearTargetsEveryProjection) {
  LoraConfig c;
  c.target_modules = {"all-linear"};
  auto ts = ResolveLoraTargets(c, TinyConfig());
  ASSERT_TRUE(ts.ok()) << ts.status().ToString();
  ASSERT_EQ(ts->size(), 14u);
  EXPECT_EQ((*ts)[0].module, "model.layers.0.self_attn.q_proj");
  EXPECT_EQ((*ts)[6].module, "model.layers.0.mlp.down_proj");
  EXPECT_EQ((*ts)[13].module, "model.layers.1.mlp.down_proj");
  // Shapes of the GQA base: C=16, Hq*D=16, Hkv*D=8, F=24.
  const std::pair<int64_t, int64_t> in_out[] = {{16, 16}, {16, 8},  {16, 8}, {16, 16},
                                                {16, 24}, {16, 24}, {24, 16}};
  for (int p = 0; p < 7; ++p) {
    EXPECT_EQ((*ts)[p].in, in_out[p].first) << (*ts)[p].module;
    EXPECT_EQ((*ts)[p].out, in_out[p].second) << (*ts)[p].module;
  }
}

TEST(LoraConfigTest, SuffixAndShortNames) {
  LoraConfig c;
  c.target_modules = {"q", "layers.1.mlp.down_proj", "self_attn.v_proj"};
  auto ts = ResolveLoraTargets(c, TinyConfig());
  ASSERT_TRUE(ts.ok()) << ts.status().ToString();
  EXPECT_EQ(Modules(*ts), (std::vector<std::string>{
                              "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                              "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                              "model.layers.1.mlp.down_proj"}));
  // A suffix must start at a dot: "_proj" alone or "roj" select nothing.
  for (const char* bad : {"roj", "foo_proj", "layers.7.self_attn.q_proj", "lm_head"}) {
    c.target_modules = {bad};
    auto r = ResolveLoraTargets(c, TinyConfig());
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(bad), std::string::npos) << r.status().message();
  }
  c.target_modules = {".*q_proj"};
  EXPECT_EQ(ResolveLoraTargets(c, TinyConfig()).status().code(), StatusCode::kUnimplemented);
}

TEST(LoraConfigTest, PatternsFirstMatchWinsAndScales) {
  LoraConfig c;
  c.r = 4;
  c.alpha = 8;
  c.target_modules = {"q_proj", "down_proj"};
  c.rank_pattern = {{"layers.1.self_attn.q_proj", 2}, {"q_proj", 6}};
  c.alpha_pattern = {{"down_proj", 3.0}};
  auto ts = ResolveLoraTargets(c, TinyConfig());
  ASSERT_TRUE(ts.ok()) << ts.status().ToString();
  ASSERT_EQ(ts->size(), 4u);
  EXPECT_EQ((*ts)[0].rank, 6);  // layer 0 q: only "q_proj" matches
  EXPECT_FLOAT_EQ((*ts)[0].scale, 8.0f / 6.0f);
  EXPECT_EQ((*ts)[1].rank, 4);  // layer 0 down: default rank, pattern alpha
  EXPECT_FLOAT_EQ((*ts)[1].scale, 3.0f / 4.0f);
  EXPECT_EQ((*ts)[2].rank, 2);  // layer 1 q: the first key matches first
  // In PEFT's order the first matching key wins even when a later one is more specific.
  c.rank_pattern = {{"q_proj", 6}, {"layers.1.self_attn.q_proj", 2}};
  EXPECT_EQ((*ResolveLoraTargets(c, TinyConfig()))[2].rank, 6);
  // "^..." must equal the whole name, as PEFT's anchored regex.
  c.rank_pattern = {{"^layers.1.self_attn.q_proj", 2}, {"^model.layers.0.self_attn.q_proj$", 3}};
  EXPECT_EQ((*ResolveLoraTargets(c, TinyConfig()))[0].rank, 3);
  EXPECT_EQ((*ResolveLoraTargets(c, TinyConfig()))[2].rank, 4);
  c.use_rslora = true;
  EXPECT_FLOAT_EQ((*ResolveLoraTargets(c, TinyConfig()))[1].scale,
                  static_cast<float>(3.0 / std::sqrt(4.0)));
}

TEST(LoraConfigTest, InvalidScalars) {
  const auto bad = [](auto edit) {
    LoraConfig c;
    edit(c);
    return ResolveLoraTargets(c, TinyConfig()).status().code();
  };
  EXPECT_EQ(bad([](LoraConfig& c) { c.r = 0; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(bad([](LoraConfig& c) { c.dropout = 1.0; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(bad([](LoraConfig& c) { c.alpha = NAN; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(bad([](LoraConfig& c) { c.target_modules.clear(); }), StatusCode::kInvalidArgument);
  EXPECT_EQ(bad([](LoraConfig& c) {
              c.rank_pattern = {{"q_proj", -1}};
            }),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(bad([](LoraConfig& c) {
              c.alpha_pattern = {{"(q|v)_proj", 2.0}};
            }),
            StatusCode::kUnimplemented);
}

TEST(LoraConfigTest, PeftInitialization) {
  auto ctx = ops::Context::Cpu();
  LoraConfig c;
  c.target_modules = {"all-linear"};
  c.init_seed = 42;
  auto a = std::move(LoraAdapter::Create(*ctx, TinyConfig(), c)).value();
  c.target_modules = {"down_proj"};
  auto only_down = std::move(LoraAdapter::Create(*ctx, TinyConfig(), c)).value();
  for (size_t t = 0; t < a->targets().size(); ++t) {
    const LoraTarget& target = a->targets()[t];
    const float bound = 1.0f / std::sqrt(static_cast<float>(target.in));
    const Tensor& A = a->a(static_cast<int>(t)).master;
    const Tensor& B = a->b(static_cast<int>(t)).master;
    EXPECT_EQ(A.shape(), (Shape{c.r, target.in}));
    EXPECT_EQ(B.shape(), (Shape{target.out, c.r}));
    double sum_sq = 0;
    for (int64_t i = 0; i < A.numel(); ++i) {
      const float v = A.data<float>()[i];
      ASSERT_TRUE(v >= -bound && v < bound) << target.module << " " << v;
      sum_sq += static_cast<double>(v) * v;
    }
    // Uniform(-b, b) has variance b^2 / 3.
    EXPECT_NEAR(sum_sq / A.numel(), bound * bound / 3.0, 0.35 * bound * bound / 3.0);
    for (int64_t i = 0; i < B.numel(); ++i) ASSERT_EQ(B.data<float>()[i], 0.0f);
    if (target.proj == Projection::kDown) {
      const Tensor& other = only_down->a(only_down->Find(target.layer, Projection::kDown)).master;
      EXPECT_TRUE(testing::AllClose(other, A, {0, 0})) << "init depends on the target set";
    }
  }
  EXPECT_FALSE(testing::AllClose(a->a(0).master.View({-1}).Slice(0, 0, 32),
                                 a->a(1).master.View({-1}).Slice(0, 0, 32), {0, 0}));
}

TEST(LoraConfigTest, ConfigJsonRoundTrip) {
  LoraConfig c;
  c.r = 4;
  c.alpha = 8;
  c.dropout = 0.05;
  c.target_modules = {"q", "v_proj", "layers.1.mlp.down_proj"};
  c.use_rslora = true;
  c.rank_pattern = {{"v_proj", 2}, {"q_proj", 3}};  // not sorted: order matters
  c.alpha_pattern = {{"down_proj", 1.5}};
  c.base_model_name_or_path = "tiny";
  const std::string text = LoraConfigToJson(c);
  const nlohmann::json j = nlohmann::json::parse(text);
  EXPECT_EQ(j["peft_type"], "LORA");
  EXPECT_EQ(j["bias"], "none");
  EXPECT_EQ(j["task_type"], "CAUSAL_LM");
  EXPECT_EQ(j["lora_alpha"], 8);
  EXPECT_TRUE(j["lora_alpha"].is_number_integer());
  EXPECT_EQ(j["target_modules"],
            (std::vector<std::string>{"q_proj", "v_proj", "layers.1.mlp.down_proj"}));
  auto back = ParseLoraConfigJson(text, "mem");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->r, 4);
  EXPECT_EQ(back->alpha, 8.0);
  EXPECT_EQ(back->dropout, 0.05);
  EXPECT_TRUE(back->use_rslora);
  EXPECT_EQ(back->rank_pattern, c.rank_pattern);
  EXPECT_EQ(back->alpha_pattern, c.alpha_pattern);
  EXPECT_EQ(back->base_model_name_or_path, "tiny");
  LoraConfig all;
  all.target_modules = {"all-linear"};
  EXPECT_EQ(nlohmann::json::parse(LoraConfigToJson(all))["target_modules"].size(), 7u);
}

}  // namespace
}  // namespace tandem::peft
