// A frozen Llama base with LoRA adapters (CPU, f32): gradients against finite differences, no base
// gradients, merge/unmerge, mixed multi-adapter batches against separate runs, recompute, dropout
// and an AdamW smoke run.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/peft/peft_test_util.h"

namespace tandem::peft {
namespace {

using testing::AdapterIds;
using testing::MakeAdapter;
using testing::MakeBase;
using testing::MakeBatch;
using testing::SubBatch;
using testing::TinyConfig;

LoraConfig AllLinear(int64_t r, double alpha) {
  LoraConfig c;
  c.r = r;
  c.alpha = alpha;
  c.target_modules = {"all-linear"};
  return c;
}

// Central difference of the loss sum for one element of a parameter's master (CPU: the weight).
double FiniteDifference(const std::function<double()>& loss, float* x) {
  const float saved = *x, h = 1e-2f;
  *x = saved + h;
  const double up = loss();
  *x = saved - h;
  const double down = loss();
  *x = saved;
  return (up - down) / (static_cast<double>(saved + h) - static_cast<double>(saved - h));
}

TEST(LoraModelTest, FreshAdapterLeavesTheModelUnchanged) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto base = MakeBase(*ctx, c, 1);
  const model::Batch batch = MakeBatch(2, 5, c.vocab_size, 3);
  const Tensor before = *base->Logits(batch);
  AdapterSet set(*ctx, c);
  ASSERT_TRUE(set.Add(std::move(LoraAdapter::Create(*ctx, c, AllLinear(4, 8))).value()).ok());
  base->SetAdapter(&set);
  EXPECT_TRUE(testing::AllClose(*base->Logits(batch), before, {0, 0}));  // B = 0: exact
}

TEST(LoraModelTest, GradientsMatchFiniteDifferencesAndBaseGetsNone) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto base = MakeBase(*ctx, c, 2);
  LoraConfig lc = AllLinear(2, 2);
  lc.rank_pattern = {{"layers.1.mlp.up_proj", 3}};
  lc.use_rslora = true;
  AdapterSet set(*ctx, c);
  auto adapter = std::move(LoraAdapter::Create(*ctx, c, lc)).value();
  testing::Randomize(*adapter, 10, 0.1f);  // a mild regime: central differences stay accurate
  ASSERT_TRUE(set.Add(std::move(adapter)).ok());
  base->SetAdapter(&set);
  const model::Batch batch = MakeBatch(2, 5, c.vocab_size, 4);
  ASSERT_TRUE(base->ZeroGrads().ok());
  ASSERT_TRUE(base->ForwardBackward(batch, 1.0f).ok());
  for (const model::Parameter& p : base->parameters()) {
    EXPECT_FALSE(p.trainable) << p.name;
    EXPECT_FALSE(p.grad.defined()) << p.name << ": a frozen base has no gradient";
    EXPECT_EQ(p.master.storage(), p.weight.storage()) << p.name;  // CPU: no extra master copy
  }
  LoraAdapter& ad = set.adapter(0);
  auto loss = [&] { return base->Loss(batch)->sum; };
  for (model::Parameter& p : ad.parameters()) {
    double gmax = 0;
    for (int64_t i = 0; i < p.grad.numel(); ++i)
      gmax = std::max(gmax, std::fabs(p.grad.data<float>()[i]) * 1.0);
    ASSERT_GT(gmax, 1e-4) << p.name << ": gradient is (nearly) zero";
    for (int64_t i = 0; i < p.grad.numel(); ++i) {
      const double fd = FiniteDifference(loss, p.master.data<float>() + i);
      const double g = p.grad.data<float>()[i];
      ASSERT_NEAR(g, fd, 2e-3 + 2e-2 * std::fabs(g)) << p.name << "[" << i << "]";
    }
  }
}

TEST(LoraModelTest, DropoutGradientsMatchFiniteDifferences) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto base = MakeBase(*ctx, c, 5);
  LoraConfig lc = AllLinear(3, 3);
  lc.dropout = 0.3;
  AdapterSet set(*ctx, c);
  ASSERT_TRUE(set.Add(MakeAdapter(*ctx, c, lc, 20)).ok());
  base->SetAdapter(&set);
  const model::Batch batch = MakeBatch(2, 6, c.vocab_size, 6);
  // The training loss with the dropout masks of batch counter 7 (ForwardBackward's value; the
  // gradients it also accumulates are ignored).
  auto loss = [&] {
    set.set_batch_counter(7);
    return base->ForwardBackward(batch, 1.0f)->sum;
  };
  const double train_loss = loss();
  EXPECT_NE(train_loss, base->Loss(batch)->sum) << "dropout changes the training loss";
  ASSERT_TRUE(base->ZeroGrads().ok());
  set.set_batch_counter(7);
  ASSERT_TRUE(base->ForwardBackward(batch, 1.0f).ok());
  EXPECT_EQ(set.batch_counter(), 8u);
  const std::vector<Tensor> grads = testing::Grads(set.adapter(0));
  std::vector<model::Parameter>& ps = set.adapter(0).parameters();
  for (size_t k = 0; k < ps.size(); ++k) {
    const Tensor& g = grads[k];
    int64_t top = 0;
    for (int64_t i = 0; i < g.numel(); ++i) {
      if (std::fabs(g.data<float>()[i]) > std::fabs(g.data<float>()[top])) top = i;
    }
    const double fd = FiniteDifference(loss, ps[k].master.data<float>() + top);
    const double gv = g.data<float>()[top];
    EXPECT_NEAR(gv, fd, 2e-3 + 2e-2 * std::fabs(gv)) << ps[k].name;
  }
}

TEST(LoraModelTest, MergeEqualsAdapterAndUnmergeRestores) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto base = MakeBase(*ctx, c, 7);
  std::vector<std::vector<float>> original;
  for (const model::Parameter& p : base->parameters()) {
    original.emplace_back(p.weight.data<float>(), p.weight.data<float>() + p.weight.numel());
  }
  LoraConfig lc = AllLinear(4, 8);
  lc.alpha_pattern = {{"o_proj", 2.0}};
  AdapterSet set(*ctx, c);
  ASSERT_TRUE(set.Add(MakeAdapter(*ctx, c, lc, 30)).ok());
  const model::Batch batch = MakeBatch(3, 7, c.vocab_size, 8);
  base->SetAdapter(&set);
  const Tensor with_adapter = *base->Logits(batch);
  base->SetAdapter(nullptr);
  const Tensor base_logits = *base->Logits(batch);
  ASSERT_FALSE(testing::AllClose(with_adapter, base_logits, {1e-3, 0}));
  ASSERT_TRUE(set.adapter(0).Merge(*base).ok());
  EXPECT_TRUE(testing::AllClose(*base->Logits(batch), with_adapter, {2e-5, 1e-5}));
  ASSERT_TRUE(set.adapter(0).Unmerge(*base).ok());
  for (size_t i = 0; i < original.size(); ++i) {
    const model::Parameter& p = base->parameters()[i];
    for (int64_t j = 0; j < p.weight.numel(); ++j) {
      ASSERT_NEAR(p.weight.data<float>()[j], original[i][j], 1e-6) << p.name << "[" << j << "]";
    }
  }
  EXPECT_TRUE(testing::AllClose(*base->Logits(batch), base_logits, {1e-5, 1e-5}));
}

// Three adapters (ranks 2, 4, 8; different targets, alphas, rsLoRA) and base-only sequences in
// one batch give each sequence the logits, and each adapter the gradients, of separate runs.
TEST(LoraModelTest, MixedBatchEqualsSeparateRuns) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto base = MakeBase(*ctx, c, 9);
  AdapterSet set(*ctx, c);
  LoraConfig c0 = AllLinear(2, 4);
  LoraConfig c1 = AllLinear(4, 16);
  c1.target_modules = {"q_proj", "v_proj", "down_proj"};
  c1.use_rslora = true;
  LoraConfig c2 = AllLinear(8, 8);
  c2.target_modules = {"k_proj", "o_proj", "gate_proj", "up_proj"};
  c2.rank_pattern = {{"layers.0.self_attn.o_proj", 5}};
  ASSERT_TRUE(set.Add(MakeAdapter(*ctx, c, c0, 40)).ok());
  ASSERT_TRUE(set.Add(MakeAdapter(*ctx, c, c1, 50)).ok());
  ASSERT_TRUE(set.Add(MakeAdapter(*ctx, c, c2, 60)).ok());
  base->SetAdapter(&set);
  model::Batch batch = MakeBatch(6, 5, c.vocab_size, 10);
  const std::vector<int32_t> ids = {2, 0, 0, -1, 1, 2};
  batch.adapter_ids = AdapterIds(ids);
  ASSERT_TRUE(base->ZeroGrads().ok());
  const model::LossSum mixed = *base->ForwardBackward(batch, 1.0f);
  std::vector<std::vector<Tensor>> mixed_grads;
  for (int a = 0; a < 3; ++a) mixed_grads.push_back(testing::Grads(set.adapter(a)));
  const Tensor mixed_logits = *base->Logits(batch);

  double loss_sum = 0;
  const int64_t TV = 5 * c.vocab_size;
  for (int32_t a = -1; a < 3; ++a) {
    std::vector<int64_t> rows;
    for (int64_t b = 0; b < 6; ++b) {
      if (ids[b] == a) rows.push_back(b);
    }
    model::Batch sub = SubBatch(batch, rows);
    sub.adapter_ids = AdapterIds(std::vector<int32_t>(rows.size(), a));
    ASSERT_TRUE(base->ZeroGrads().ok());
    loss_sum += base->ForwardBackward(sub, 1.0f)->sum;
    const Tensor logits = *base->Logits(sub);
    for (size_t i = 0; i < rows.size(); ++i) {
      const Tensor got = mixed_logits.View({-1}).Slice(0, rows[i] * TV, (rows[i] + 1) * TV);
      const Tensor want = logits.View({-1}).Slice(0, i * TV, (i + 1) * TV);
      EXPECT_TRUE(testing::AllClose(got, want, {1e-5, 1e-5})) << "sequence " << rows[i];
    }
    if (a < 0) continue;
    const std::vector<Tensor> separate = testing::Grads(set.adapter(a));
    for (size_t k = 0; k < separate.size(); ++k) {
      EXPECT_TRUE(testing::AllClose(mixed_grads[a][k], separate[k], {1e-5, 1e-4}))
          << set.adapter(a).parameters()[k].name;
    }
  }
  EXPECT_NEAR(mixed.sum, loss_sum, 1e-5 * std::fabs(loss_sum));
}

TEST(LoraModelTest, RecomputeGivesIdenticalGradients) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  std::vector<std::vector<Tensor>> grads;
  for (bool recompute : {false, true}) {
    auto base = MakeBase(*ctx, c, 11, false, recompute);
    AdapterSet set(*ctx, c);
    LoraConfig lc = AllLinear(3, 6);
    lc.dropout = 0.25;
    ASSERT_TRUE(set.Add(MakeAdapter(*ctx, c, lc, 70)).ok());
    ASSERT_TRUE(set.Add(MakeAdapter(*ctx, c, AllLinear(2, 2), 80)).ok());
    base->SetAdapter(&set);
    model::Batch batch = MakeBatch(3, 4, c.vocab_size, 12);
    batch.adapter_ids = AdapterIds({0, 1, 0});
    ASSERT_TRUE(base->ZeroGrads().ok());
    ASSERT_TRUE(base->ForwardBackward(batch, 0.5f).ok());
    grads.push_back(testing::Grads(set.adapter(0)));
    const std::vector<Tensor> g1 = testing::Grads(set.adapter(1));
    grads.back().insert(grads.back().end(), g1.begin(), g1.end());
  }
  for (size_t k = 0; k < grads[0].size(); ++k) {
    EXPECT_TRUE(testing::AllClose(grads[1][k], grads[0][k], {0, 0})) << "parameter " << k;
  }
}

// The projection-group fast path (one adapter, no dropout: the adapter writes its deltas before
// the base GEMMs, q|k|v and gate|up share one shrink) against every projection after its base
// GEMM; groups whose members differ in scale (the rank-patterned up_proj) or are not all
// targeted fall back per group, recompute included.
TEST(LoraModelTest, GroupFastPathEqualsPerProjection) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  LoraConfig lc = AllLinear(3, 6);
  lc.rank_pattern = {{"layers.1.mlp.up_proj", 5}};
  LoraConfig partial = AllLinear(2, 4);
  partial.target_modules = {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"};
  for (const LoraConfig& config : {lc, partial}) {
    for (bool recompute : {false, true}) {
      std::vector<std::vector<Tensor>> grads;
      std::vector<Tensor> logits;
      std::vector<double> losses;
      for (int mode : {0, 1, 2}) {  // wide path, fast path only, per projection
        auto base = MakeBase(*ctx, c, 13, false, recompute);
        AdapterSet set(*ctx, c);
        set.set_group_fast_path(mode < 2);
        set.set_wide_path(mode == 0);
        ASSERT_TRUE(set.Add(MakeAdapter(*ctx, c, config, 90)).ok());
        base->SetAdapter(&set);
        const model::Batch batch = MakeBatch(2, 6, c.vocab_size, 14);
        ASSERT_TRUE(base->ZeroGrads().ok());
        losses.push_back(base->ForwardBackward(batch, 0.5f)->sum);
        grads.push_back(testing::Grads(set.adapter(0)));
        logits.push_back(*base->Logits(batch));
        if (mode == 0) {
          EXPECT_GT(set.wide_refreshes(), 0) << "the wide path was not taken";
        }
        base->SetAdapter(nullptr);
      }
      for (int mode : {0, 1}) {
        EXPECT_NEAR(losses[mode], losses[2], 1e-5 * std::fabs(losses[2])) << "mode " << mode;
        EXPECT_TRUE(testing::AllClose(logits[mode], logits[2], {1e-5, 1e-5})) << "mode " << mode;
        for (size_t k = 0; k < grads[0].size(); ++k) {
          EXPECT_TRUE(testing::AllClose(grads[mode][k], grads[2][k], {1e-5, 1e-4}))
              << "parameter " << k << " recompute " << recompute << " mode " << mode;
        }
      }
    }
  }
}

// The wide path keeps a copy of the frozen q|k|v and gate|up weights: it is taken once, and taken
// again after the model's weights are written (here through parameters(), as Merge does); a base
// that trains never takes the wide path.
TEST(LoraModelTest, WidePathFollowsBaseWeightChanges) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto base = MakeBase(*ctx, c, 15);
  AdapterSet set(*ctx, c);
  ASSERT_TRUE(set.Add(MakeAdapter(*ctx, c, AllLinear(3, 6), 95)).ok());
  base->SetAdapter(&set);
  const model::Batch batch = MakeBatch(2, 6, c.vocab_size, 16);
  const Tensor before = *base->Logits(batch);
  const int64_t groups = 4 * c.num_hidden_layers;  // q|k|v, o, gate|up and down per layer
  EXPECT_EQ(set.wide_refreshes(), groups);
  ASSERT_TRUE(base->ZeroGrads().ok());
  ASSERT_TRUE(base->ForwardBackward(batch, 1.0f).ok());
  EXPECT_EQ(set.wide_refreshes(), groups) << "unchanged weights were copied again";
  for (model::Parameter& p : base->parameters()) {  // every q_proj and up_proj weight doubled
    if (p.name.find("q_proj") == std::string::npos && p.name.find("up_proj") == std::string::npos)
      continue;
    for (int64_t i = 0; i < p.weight.numel(); ++i) p.weight.data<float>()[i] *= 2.0f;
  }
  const Tensor wide = *base->Logits(batch);
  EXPECT_EQ(set.wide_refreshes(), 2 * groups);
  set.set_wide_path(false);
  const Tensor narrow = *base->Logits(batch);
  EXPECT_FALSE(testing::AllClose(wide, before, {1e-3, 0})) << "the change was not seen";
  EXPECT_TRUE(testing::AllClose(wide, narrow, {1e-5, 1e-5}));

  auto trained = MakeBase(*ctx, c, 15, /*trainable=*/true);
  AdapterSet set2(*ctx, c);
  ASSERT_TRUE(set2.Add(MakeAdapter(*ctx, c, AllLinear(3, 6), 95)).ok());
  trained->SetAdapter(&set2);
  ASSERT_TRUE(trained->ZeroGrads().ok());
  ASSERT_TRUE(trained->ForwardBackward(batch, 1.0f).ok());
  EXPECT_EQ(set2.wide_refreshes(), 0);
  trained->SetAdapter(nullptr);
  base->SetAdapter(nullptr);
}

TEST(LoraModelTest, BadAdapterIds) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto base = MakeBase(*ctx, c, 13);
  model::Batch batch = MakeBatch(2, 3, c.vocab_size, 14);
  batch.adapter_ids = AdapterIds({0, 0});
  Status s = base->Logits(batch).status();
  EXPECT_NE(s.message().find("no adapter is attached"), std::string::npos) << s.ToString();
  AdapterSet set(*ctx, c);
  ASSERT_TRUE(set.Add(MakeAdapter(*ctx, c, AllLinear(2, 2), 1)).ok());
  base->SetAdapter(&set);
  batch.adapter_ids = AdapterIds({0, 1});
  s = base->Logits(batch).status();
  EXPECT_NE(s.message().find("batch.adapter_ids[1] = 1"), std::string::npos) << s.ToString();
  batch.adapter_ids = AdapterIds({0, 0, 0});
  EXPECT_EQ(base->Logits(batch).status().code(), StatusCode::kInvalidArgument);
  model::LlamaConfig other = c;
  other.hidden_size = 24;
  other.head_dim = 6;
  EXPECT_EQ(
      set.Add(std::move(LoraAdapter::Create(*ctx, other, AllLinear(2, 2))).value()).status().code(),
      StatusCode::kInvalidArgument);
}

// The adapter parameters train with the trainer's plain AdamW loop; the base stays put.
TEST(LoraModelTest, AdamWLowersTheLoss) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto base = MakeBase(*ctx, c, 15);
  const Tensor embed_before = *CopyToHostBlocking(base->parameters()[0].weight);
  AdapterSet set(*ctx, c);
  ASSERT_TRUE(set.Add(std::move(LoraAdapter::Create(*ctx, c, AllLinear(4, 8))).value()).ok());
  base->SetAdapter(&set);
  const model::Batch batch = MakeBatch(2, 8, c.vocab_size, 16);
  std::vector<model::Parameter> params = set.parameters();
  std::vector<Tensor> m, v;
  for (const model::Parameter& p : params) {
    m.push_back(Tensor::CpuZeros(p.master.shape(), DType::kF32));
    v.push_back(Tensor::CpuZeros(p.master.shape(), DType::kF32));
  }
  double first = 0, last = 0;
  for (int step = 1; step <= 30; ++step) {
    ASSERT_TRUE(base->ZeroGrads().ok());
    const model::LossSum l = *base->ForwardBackward(batch, 1.0f / 14);
    (step == 1 ? first : last) = l.sum / l.count;
    for (size_t i = 0; i < params.size(); ++i) {
      ops::AdamWParams ap;
      ap.lr = 1e-2f;
      ap.step = step;
      Tensor none;
      ASSERT_TRUE(ops::AdamW(*ctx, params[i].master, m[i], v[i], none, params[i].grad, ap).ok());
    }
  }
  EXPECT_LT(last, first - 0.5) << "first " << first << ", last " << last;
  EXPECT_TRUE(testing::AllClose(base->parameters()[0].weight, embed_before, {0, 0}));
}

}  // namespace
}  // namespace tandem::peft
