// S²FT on a tiny Llama (CPU, f32): selection determinism and budget, co-permutation leaves the
// model equal, block gradients equal the full-weight gradient's columns (and finite
// differences), merge/unmerge, a short training run whose merged weights are base + blocks.
#include "peft/s2ft.h"

#include <gtest/gtest.h>

#include <cmath>

#include "peft/adapter_set.h"
#include "peft/internal/s2ft_weights.h"
#include "peft/lora.h"
#include "tests/peft/peft_test_util.h"

namespace tandem::peft {
namespace {

using model::Projection;
using ::tandem::testing::AllClose;
using ::tandem::testing::RandomUniform;
using testing::MakeBase;
using testing::MakeBatch;
using testing::TinyConfig;

S2ftConfig Fractions(double heads, double ffn, bool coupled = false, uint64_t seed = 3) {
  S2ftConfig c;
  c.heads_fraction = heads;
  c.ffn_fraction = ffn;
  c.coupled = coupled;
  c.seed = seed;
  return c;
}

// Host copies of every base weight.
std::vector<Tensor> Weights(const model::LlamaModel& m) {
  std::vector<Tensor> out;
  for (const model::Parameter& p : m.parameters()) out.push_back(testing::Clone(p.weight));
  return out;
}

void RandomizeBlocks(S2ftAdapter& a, uint64_t seed, float scale) {
  for (size_t i = 0; i < a.parameters().size(); ++i) {
    TANDEM_CHECK_OK(
        a.SetFromHost(i, RandomUniform(a.parameters()[i].master.shape(), seed + i, -scale, scale)));
  }
}

TEST(S2ftSelectTest, RandomIsDeterministicAndCountsFollowFractions) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();  // Hkv 2 (g 2), F 24, 2 layers
  auto base = MakeBase(*ctx, c, 1);
  const S2ftSelection a = *SelectS2ft(*ctx, Fractions(0.5, 0.25), *base);
  const S2ftSelection b = *SelectS2ft(*ctx, Fractions(0.5, 0.25), *base);
  bool differs = false;
  for (uint64_t seed = 4; seed < 8; ++seed) {
    const S2ftSelection o = *SelectS2ft(*ctx, Fractions(0.5, 0.25, false, seed), *base);
    for (int l = 0; l < 2; ++l) differs = differs || o.layers[l].channels != a.layers[l].channels;
  }
  EXPECT_TRUE(differs) << "the seed does not change the selection";
  ASSERT_EQ(a.layers.size(), 2u);
  for (int l = 0; l < 2; ++l) {
    EXPECT_EQ(a.layers[l].heads, b.layers[l].heads);
    EXPECT_EQ(a.layers[l].channels, b.layers[l].channels);
    ASSERT_EQ(a.layers[l].heads.size(), 2u);  // one kv group of 2 query heads
    EXPECT_EQ(a.layers[l].heads[1], a.layers[l].heads[0] + 1);
    EXPECT_EQ(a.layers[l].heads[0] % 2, 0);
    ASSERT_EQ(a.layers[l].channels.size(), 6u);
    EXPECT_TRUE(std::is_sorted(a.layers[l].channels.begin(), a.layers[l].channels.end()));
  }
}

TEST(S2ftSelectTest, BudgetIsNeverExceeded) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto base = MakeBase(*ctx, c, 1);
  for (bool coupled : {false, true}) {
    for (int64_t budget : {200, 700, 1500, 4000, 100000}) {
      S2ftConfig cfg = Fractions(0.5, 0.5, coupled);
      cfg.budget = budget;
      auto sel = SelectS2ft(*ctx, cfg, *base);
      ASSERT_TRUE(sel.ok()) << sel.status().ToString();
      auto ad = *S2ftAdapter::Create(*ctx, c, cfg, *sel);
      const int64_t slack =
          c.num_hidden_layers * (S2ftParamsPerGroup(c, coupled) + S2ftParamsPerChannel(c, coupled));
      EXPECT_LE(ad->num_trainable(), budget) << "coupled " << coupled;
      const int64_t everything =
          c.num_hidden_layers * (S2ftParamsPerGroup(c, coupled) * c.num_key_value_heads +
                                 S2ftParamsPerChannel(c, coupled) * c.intermediate_size);
      EXPECT_GT(ad->num_trainable(), std::min(budget, everything) - slack)
          << "coupled " << coupled << " budget " << budget;
    }
  }
  S2ftConfig none = Fractions(0.0, 0.0);
  EXPECT_EQ(SelectS2ft(*ctx, none, *base).status().code(), StatusCode::kInvalidArgument);
  S2ftConfig bad = Fractions(1.5, 0.1);
  EXPECT_EQ(SelectS2ft(*ctx, bad, *base).status().code(), StatusCode::kInvalidArgument);
}

TEST(S2ftSelectTest, WeightSelectionPicksTheLargestColumns) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto base = MakeBase(*ctx, c, 2);
  model::Parameter* down = *internal::FindProjectionWeight(*base, 1, Projection::kDown);
  model::Parameter* o = *internal::FindProjectionWeight(*base, 1, Projection::kO);
  for (int64_t r = 0; r < c.hidden_size; ++r) {
    for (int64_t ch : {5, 17}) down->weight.data<float>()[r * 24 + ch] *= 20.0f;
    for (int64_t col = 8; col < 16; ++col) o->weight.data<float>()[r * 16 + col] *= 20.0f;
  }
  S2ftConfig cfg = Fractions(0.5, 2.0 / 24);
  cfg.selection = "weight";
  const S2ftSelection s = *SelectS2ft(*ctx, cfg, *base);
  EXPECT_EQ(s.layers[1].channels, (std::vector<int64_t>{5, 17}));
  EXPECT_EQ(s.layers[1].heads, (std::vector<int64_t>{2, 3}));  // kv group 1
}

TEST(S2ftSelectTest, SelectionsMustBeWholeGroupsInRange) {
  const model::LlamaConfig c = TinyConfig();
  S2ftSelection s;
  s.layers.resize(2);
  s.layers[0].heads = {1};
  EXPECT_EQ(NormalizeS2ftSelection(s, c, "t").code(), StatusCode::kInvalidArgument);
  s.layers[0].heads = {3, 2};
  EXPECT_TRUE(NormalizeS2ftSelection(s, c, "t").ok());
  EXPECT_EQ(s.layers[0].heads, (std::vector<int64_t>{2, 3}));
  s.layers[1].channels = {4, 24};
  EXPECT_EQ(NormalizeS2ftSelection(s, c, "t").code(), StatusCode::kOutOfRange);
  s.layers[1].channels = {4, 4};
  EXPECT_EQ(NormalizeS2ftSelection(s, c, "t").code(), StatusCode::kInvalidArgument);
}

TEST(S2ftModelTest, PermutationLeavesLogitsEqualAndUnpermuteRestores) {
  auto ctx = ops::Context::Cpu();
  model::LlamaConfig c = TinyConfig();
  c.num_key_value_heads = 4;  // also MHA (g = 1) below
  for (int64_t hkv : {2, 4, 1}) {
    c.num_key_value_heads = hkv;
    auto base = MakeBase(*ctx, c, 3);
    const std::vector<Tensor> original = Weights(*base);
    const model::Batch batch = MakeBatch(2, 6, c.vocab_size, 4);
    const Tensor before = *base->Logits(batch);
    const S2ftSelection sel = *SelectS2ft(*ctx, Fractions(0.5, 0.3, false, 9), *base);
    ASSERT_TRUE(PermuteS2ftBase(*ctx, *base, sel).ok());
    bool moved = false;
    for (size_t i = 0; i < original.size(); ++i) {
      moved = moved || !AllClose(base->parameters()[i].weight, original[i], {0, 0});
    }
    EXPECT_TRUE(moved || hkv == 1) << "the permutation changed no weight";
    EXPECT_TRUE(AllClose(*base->Logits(batch), before, {1e-5, 1e-5})) << "Hkv " << hkv;
    ASSERT_TRUE(UnpermuteS2ftBase(*ctx, *base, sel).ok());
    for (size_t i = 0; i < original.size(); ++i) {
      EXPECT_TRUE(AllClose(base->parameters()[i].weight, original[i], {0, 0}))
          << base->parameters()[i].name;
    }
  }
}

// Model A: trainable base with the blocks merged (original order). Model B: the frozen permuted
// base with the adapter. dL/dD must equal dL/dW_A at the block's positions, and the losses agree.
TEST(S2ftModelTest, BlockGradientsEqualFullWeightGradientAtTheBlock) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto full = MakeBase(*ctx, c, 5, /*trainable=*/true);
  auto frozen = MakeBase(*ctx, c, 5);
  auto ad = *PrepareS2ft(*ctx, *frozen, Fractions(0.5, 0.25, /*coupled=*/true));
  ASSERT_EQ(ad->blocks().size(), 14u);  // q k v o gate up down in both layers
  RandomizeBlocks(*ad, 50, 0.2f);
  ASSERT_TRUE(ad->Merge(*full).ok());
  frozen->SetAdapter(ad.get());
  const model::Batch batch = MakeBatch(2, 7, c.vocab_size, 6);
  ASSERT_TRUE(full->ZeroGrads().ok());
  ASSERT_TRUE(frozen->ZeroGrads().ok());
  const model::LossSum la = *full->ForwardBackward(batch, 0.1f);
  const model::LossSum lb = *frozen->ForwardBackward(batch, 0.1f);
  EXPECT_NEAR(la.sum, lb.sum, 1e-4 * std::fabs(la.sum));
  for (const model::Parameter& p : frozen->parameters()) EXPECT_FALSE(p.grad.defined()) << p.name;
  for (size_t i = 0; i < ad->blocks().size(); ++i) {
    const S2ftBlock& b = ad->blocks()[i];
    const model::Parameter* w = *internal::FindProjectionWeight(*full, b.layer, b.proj);
    const int64_t cols = w->grad.dim(1), s = static_cast<int64_t>(b.indices.size());
    Tensor expected = Tensor::Cpu(b.shape, DType::kF32);
    for (int64_t j = 0; j < s; ++j) {
      for (int64_t k = 0; k < (b.axis == S2ftAxis::kColumns ? b.shape[0] : b.shape[1]); ++k) {
        const bool colw = b.axis == S2ftAxis::kColumns;
        const float g = colw ? w->grad.data<float>()[k * cols + b.indices[j]]
                             : w->grad.data<float>()[b.indices[j] * cols + k];
        expected.data<float>()[colw ? k * s + j : j * cols + k] = g;
      }
    }
    EXPECT_TRUE(AllClose(ad->parameters()[i].grad, expected, {2e-6, 1e-4})) << b.name;
  }
}

TEST(S2ftModelTest, GradientsMatchFiniteDifferences) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto base = MakeBase(*ctx, c, 7);
  auto ad = *PrepareS2ft(*ctx, *base, Fractions(0.5, 0.25, true, 11));
  RandomizeBlocks(*ad, 70, 0.1f);
  base->SetAdapter(ad.get());
  const model::Batch batch = MakeBatch(2, 5, c.vocab_size, 8);
  ASSERT_TRUE(base->ZeroGrads().ok());
  ASSERT_TRUE(base->ForwardBackward(batch, 1.0f).ok());
  for (model::Parameter& p : ad->parameters()) {
    int64_t top = 0;
    for (int64_t i = 0; i < p.grad.numel(); ++i) {
      if (std::fabs(p.grad.data<float>()[i]) > std::fabs(p.grad.data<float>()[top])) top = i;
    }
    ASSERT_GT(std::fabs(p.grad.data<float>()[top]), 1e-4) << p.name;
    for (int64_t i : {top, p.grad.numel() / 2}) {
      float* x = p.master.data<float>() + i;
      const float saved = *x, h = 1e-2f;
      *x = saved + h;
      const double up = base->Loss(batch)->sum;
      *x = saved - h;
      const double down = base->Loss(batch)->sum;
      *x = saved;
      const double fd = (up - down) / (2.0 * h), g = p.grad.data<float>()[i];
      EXPECT_NEAR(g, fd, 2e-3 + 2e-2 * std::fabs(g)) << p.name << "[" << i << "]";
    }
  }
}

TEST(S2ftModelTest, MergeEqualsAdapterAndUnmergeRestores) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto permuted = MakeBase(*ctx, c, 9);
  auto original = MakeBase(*ctx, c, 9);
  const std::vector<Tensor> w0 = Weights(*original);
  auto ad = *PrepareS2ft(*ctx, *permuted, Fractions(0.5, 0.5, true, 12));
  const model::Batch batch = MakeBatch(3, 5, c.vocab_size, 10);
  const Tensor base_logits = *original->Logits(batch);
  permuted->SetAdapter(ad.get());
  EXPECT_TRUE(AllClose(*permuted->Logits(batch), base_logits, {1e-5, 1e-5}))
      << "a fresh (zero) adapter must leave the model unchanged";
  RandomizeBlocks(*ad, 90, 0.3f);
  const Tensor with_adapter = *permuted->Logits(batch);
  ASSERT_FALSE(AllClose(with_adapter, base_logits, {1e-3, 0}));
  ASSERT_TRUE(ad->Merge(*original).ok());
  EXPECT_TRUE(AllClose(*original->Logits(batch), with_adapter, {1e-5, 1e-5}));
  // Merged weights are exactly base + block at the block's positions and base elsewhere.
  for (size_t i = 0; i < ad->blocks().size(); ++i) {
    const S2ftBlock& b = ad->blocks()[i];
    const model::Parameter* w = *internal::FindProjectionWeight(*original, b.layer, b.proj);
    const size_t pi = static_cast<size_t>(w - original->parameters().data());
    Tensor expect = testing::Clone(w0[pi]);
    const Tensor d = *ad->ToHost(i);
    const int64_t cols = expect.dim(1), s = static_cast<int64_t>(b.indices.size());
    for (int64_t j = 0; j < s; ++j) {
      if (b.axis == S2ftAxis::kColumns) {
        for (int64_t r = 0; r < expect.dim(0); ++r)
          expect.data<float>()[r * cols + b.indices[j]] += d.data<float>()[r * s + j];
      } else {
        for (int64_t k = 0; k < cols; ++k)
          expect.data<float>()[b.indices[j] * cols + k] += d.data<float>()[j * cols + k];
      }
    }
    EXPECT_TRUE(AllClose(w->weight, expect, {0, 0})) << b.name;
  }
  permuted->SetAdapter(nullptr);
  ASSERT_TRUE(ad->Merge(*permuted, S2ftBaseOrder::kPermuted).ok());
  EXPECT_TRUE(AllClose(*permuted->Logits(batch), with_adapter, {1e-5, 1e-5}));
  ASSERT_TRUE(ad->Unmerge(*original).ok());
  for (size_t i = 0; i < w0.size(); ++i) {
    EXPECT_TRUE(AllClose(original->parameters()[i].weight, w0[i], {1e-6, 0}))
        << original->parameters()[i].name;
  }
}

TEST(S2ftModelTest, ShortTrainingLowersTheLoss) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto base = MakeBase(*ctx, c, 11);
  auto ad = *PrepareS2ft(*ctx, *base, Fractions(0.5, 0.25, false, 13));
  base->SetAdapter(ad.get());
  const model::Batch batch = MakeBatch(2, 8, c.vocab_size, 12);
  std::vector<Tensor> m, v;
  for (const model::Parameter& p : ad->parameters()) {
    m.push_back(Tensor::CpuZeros(p.master.shape(), DType::kF32));
    v.push_back(Tensor::CpuZeros(p.master.shape(), DType::kF32));
  }
  double first = 0, last = 0;
  for (int step = 1; step <= 30; ++step) {
    ASSERT_TRUE(base->ZeroGrads().ok());
    const model::LossSum l = *base->ForwardBackward(batch, 1.0f / 14);
    (step == 1 ? first : last) = l.sum / l.count;
    for (size_t i = 0; i < ad->parameters().size(); ++i) {
      model::Parameter& p = ad->parameters()[i];
      ops::AdamWParams ap;
      ap.lr = 1e-2f;
      ap.step = step;
      Tensor none;
      ASSERT_TRUE(ops::AdamW(*ctx, p.master, m[i], v[i], none, p.grad, ap).ok());
    }
  }
  EXPECT_LT(last, 0.8 * first) << "loss " << first << " -> " << last;
  // The trained blocks merged into the original base: exactly base + block at the block's
  // indices, base elsewhere, and the trained model's logits.
  auto original = MakeBase(*ctx, c, 11);
  const std::vector<Tensor> w0 = Weights(*original);
  ASSERT_TRUE(ad->Merge(*original).ok());
  std::vector<Tensor> expect = w0;
  for (Tensor& t : expect) t = testing::Clone(t);
  for (size_t i = 0; i < ad->blocks().size(); ++i) {
    const S2ftBlock& b = ad->blocks()[i];
    ASSERT_EQ(b.axis, S2ftAxis::kColumns);
    const model::Parameter* w = *internal::FindProjectionWeight(*original, b.layer, b.proj);
    Tensor& e = expect[static_cast<size_t>(w - original->parameters().data())];
    const Tensor d = *ad->ToHost(i);
    const int64_t cols = e.dim(1), s = static_cast<int64_t>(b.indices.size());
    for (int64_t r = 0; r < e.dim(0); ++r) {
      for (int64_t j = 0; j < s; ++j) {
        e.data<float>()[r * cols + b.indices[j]] += d.data<float>()[r * s + j];
      }
    }
  }
  for (size_t i = 0; i < w0.size(); ++i) {
    EXPECT_TRUE(AllClose(original->parameters()[i].weight, expect[i], {0, 0}))
        << original->parameters()[i].name;
  }
  EXPECT_TRUE(AllClose(*original->Logits(batch), *base->Logits(batch), {1e-5, 1e-5}));
}

}  // namespace
}  // namespace tandem::peft

namespace tandem::peft {
namespace {

// S2ftAsLora: the LoRA form of an adapter with column blocks (o, down) and row blocks (coupled
// q, k, v, gate, up) gives the merged model's logits, through peft::AdapterSet (the path the
// serving engine's kernels follow); its one-hot factors hold exactly one 1 per row or column.
TEST(S2ftLoraTest, LoraFormGivesTheMergedLogits) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto permuted = MakeBase(*ctx, c, 21);
  auto merged = MakeBase(*ctx, c, 21);
  auto base = MakeBase(*ctx, c, 21);
  auto ad = *PrepareS2ft(*ctx, *permuted, Fractions(0.5, 0.5, true, 5));
  RandomizeBlocks(*ad, 70, 0.3f);
  ASSERT_TRUE(ad->Merge(*merged).ok());
  const model::Batch batch = MakeBatch(2, 6, c.vocab_size, 11);
  const Tensor want = *merged->Logits(batch);

  StatusOr<std::unique_ptr<LoraAdapter>> lora = S2ftAsLora(*ctx, *ad);
  ASSERT_TRUE(lora.ok()) << lora.status().ToString();
  ASSERT_EQ((*lora)->targets().size(), ad->blocks().size());
  for (size_t i = 0; i < ad->blocks().size(); ++i) {
    const S2ftBlock& b = ad->blocks()[i];
    const int t = (*lora)->Find(b.layer, b.proj);
    ASSERT_GE(t, 0) << b.name;
    EXPECT_EQ((*lora)->targets()[t].rank, static_cast<int64_t>(b.indices.size()));
    EXPECT_FLOAT_EQ((*lora)->targets()[t].scale, 1.0f);
    const Tensor onehot = *(*lora)->ToHost(b.axis == S2ftAxis::kColumns ? 2 * t : 2 * t + 1);
    double sum = 0;
    for (int64_t e = 0; e < onehot.numel(); ++e) sum += onehot.data<float>()[e];
    EXPECT_EQ(sum, static_cast<double>(b.indices.size())) << b.name;
  }
  AdapterSet set(*ctx, c);
  ASSERT_TRUE(set.Add(std::move(*lora)).ok());
  base->SetAdapter(&set);
  EXPECT_TRUE(AllClose(*base->Logits(batch), want, {1e-5, 1e-5}));
  base->SetAdapter(nullptr);
}

TEST(S2ftLoraTest, AnAdapterWithoutBlocksIsRefused) {
  auto ctx = ops::Context::Cpu();
  const model::LlamaConfig c = TinyConfig();
  auto base = MakeBase(*ctx, c, 21);
  S2ftSelection none;
  none.layers.resize(c.num_hidden_layers);
  StatusOr<std::unique_ptr<S2ftAdapter>> ad = S2ftAdapter::Create(*ctx, c, S2ftConfig(), none);
  ASSERT_TRUE(ad.ok()) << ad.status().ToString();
  EXPECT_EQ(S2ftAsLora(*ctx, **ad).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tandem::peft
