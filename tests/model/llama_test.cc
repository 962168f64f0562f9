// LlamaModel on the CPU (f32): parameter layout, an independent f64 reference forward, finite-
// difference gradients, recompute, packed documents, frozen parameters, loss chunking, batch
// validation, init, and safetensors save/load.
#include "model/llama.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <set>

#include "core/rng.h"
#include "model/safetensors.h"
#include "ops/ops.h"
#include "tests/common/testing.h"
#include "tests/model/llama_reference.h"

namespace tandem::model {
namespace {

using reference::ReadWeights;
using reference::RefLogits;
using reference::RefLossSum;
using reference::RowOf;
using reference::Weights;
using testing::TempDir;

LlamaConfig TinyConfig(bool tied = false) {
  LlamaConfig c;
  c.vocab_size = 37;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.rope_theta = 100.0;  // large angles at small positions: rope errors show
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = tied;
  return c;
}

struct Fixture {
  std::unique_ptr<ops::Context> ctx = ops::Context::Cpu();
  std::unique_ptr<LlamaModel> model;
};

Fixture MakeModel(const LlamaConfig& config, uint64_t seed, float std, ModelOptions options = {}) {
  Fixture f;
  StatusOr<std::unique_ptr<LlamaModel>> m = LlamaModel::Create(*f.ctx, config, options);
  TANDEM_CHECK_OK(m);
  f.model = std::move(m).value();
  TANDEM_CHECK_OK(f.model->InitRandom(seed, std));
  return f;
}

// Random tokens and targets (a few ignored), i32 [B, T].
Batch MakeBatch(int64_t B, int64_t T, int64_t V, uint64_t seed) {
  Batch b;
  b.tokens = testing::RandomInts({B, T}, seed, static_cast<int32_t>(V));
  b.targets = testing::RandomInts({B, T}, seed + 1, static_cast<int32_t>(V));
  b.targets.data<int32_t>()[0] = ops::kIgnoreIndex;
  b.targets.data<int32_t>()[B * T - 1] = ops::kIgnoreIndex;
  return b;
}

TEST(LlamaModelTest, ParametersHaveHfNamesShapesAndCount) {
  for (bool tied : {false, true}) {
    const LlamaConfig c = TinyConfig(tied);
    Fixture f = MakeModel(c, 1, 0.02f);
    const std::vector<Parameter>& ps = f.model->parameters();
    std::map<std::string, Shape> shapes;
    int64_t total = 0;
    for (const Parameter& p : ps) {
      shapes[p.name] = p.weight.shape();
      total += p.weight.numel();
      EXPECT_TRUE(p.weight.is_contiguous()) << p.name;
      EXPECT_EQ(p.master.raw_data(), p.weight.raw_data()) << p.name;  // CPU: same tensor
      ASSERT_TRUE(p.grad.defined()) << p.name;
      EXPECT_EQ(p.grad.shape(), p.weight.shape()) << p.name;
      EXPECT_EQ(p.grad.dtype(), DType::kF32);
      EXPECT_EQ(p.weight_decay, p.weight.ndim() == 2) << p.name;
    }
    EXPECT_EQ(total, c.NumParameters());
    EXPECT_EQ(ps.size(), 2u + 9 * 2 + (tied ? 0 : 1));
    EXPECT_EQ(ps.front().name, "model.embed_tokens.weight");
    EXPECT_EQ(shapes["model.embed_tokens.weight"], (Shape{37, 16}));
    EXPECT_EQ(shapes["model.layers.1.self_attn.q_proj.weight"], (Shape{16, 16}));
    EXPECT_EQ(shapes["model.layers.1.self_attn.k_proj.weight"], (Shape{8, 16}));
    EXPECT_EQ(shapes["model.layers.1.self_attn.v_proj.weight"], (Shape{8, 16}));
    EXPECT_EQ(shapes["model.layers.0.self_attn.o_proj.weight"], (Shape{16, 16}));
    EXPECT_EQ(shapes["model.layers.0.mlp.gate_proj.weight"], (Shape{24, 16}));
    EXPECT_EQ(shapes["model.layers.0.mlp.up_proj.weight"], (Shape{24, 16}));
    EXPECT_EQ(shapes["model.layers.0.mlp.down_proj.weight"], (Shape{16, 24}));
    EXPECT_EQ(shapes["model.layers.0.input_layernorm.weight"], (Shape{16}));
    EXPECT_EQ(shapes["model.layers.0.post_attention_layernorm.weight"], (Shape{16}));
    EXPECT_EQ(shapes["model.norm.weight"], (Shape{16}));
    EXPECT_EQ(shapes.count("lm_head.weight"), tied ? 0u : 1u);
  }
}

TEST(LlamaModelTest, InitRandomIsDeterministicWithHfInit) {
  Fixture a = MakeModel(TinyConfig(), 7, 0.02f);
  Fixture b = MakeModel(TinyConfig(), 7, 0.02f);
  Fixture c = MakeModel(TinyConfig(), 8, 0.02f);
  double sum_sq = 0;
  int64_t n = 0;
  for (size_t i = 0; i < a.model->parameters().size(); ++i) {
    const Tensor& wa = a.model->parameters()[i].weight;
    EXPECT_EQ(
        std::memcmp(wa.raw_data(), b.model->parameters()[i].weight.raw_data(), wa.num_bytes()), 0);
    if (wa.ndim() == 1) {
      for (int64_t j = 0; j < wa.numel(); ++j) EXPECT_EQ(wa.data<float>()[j], 1.0f);
      continue;
    }
    EXPECT_NE(
        std::memcmp(wa.raw_data(), c.model->parameters()[i].weight.raw_data(), wa.num_bytes()), 0);
    for (int64_t j = 0; j < wa.numel(); ++j)
      sum_sq += wa.data<float>()[j] * wa.data<float>()[j], ++n;
  }
  EXPECT_NEAR(std::sqrt(sum_sq / n), 0.02, 0.001);  // ~3600 samples
}

// Large tensors are filled by several threads; every element must still be the documented
// draw: element j of parameter i is std * the j-th Normal() of Rng(seed, /*stream=*/i).
TEST(LlamaModelTest, InitRandomOfLargeTensorsIsTheSequentialStream) {
  LlamaConfig c = TinyConfig();
  c.vocab_size = 4099;  // embedding and head of 4099 x 2048: over 2^23 elements each
  c.hidden_size = 2048;
  c.intermediate_size = 64;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 16;
  c.num_hidden_layers = 1;
  Fixture f = MakeModel(c, 21, 0.5f);
  int checked = 0;
  for (size_t i = 0; i < f.model->parameters().size(); ++i) {
    const Tensor& w = f.model->parameters()[i].weight;
    if (w.numel() < (int64_t{1} << 23)) continue;
    Rng rng(21, i);
    int64_t bad = 0;
    for (int64_t j = 0; j < w.numel(); ++j) bad += w.data<float>()[j] != 0.5f * rng.Normal();
    EXPECT_EQ(bad, 0) << f.model->parameters()[i].name;
    ++checked;
  }
  EXPECT_EQ(checked, 2);
}

TEST(LlamaModelTest, LogitsAndLossMatchF64Reference) {
  for (bool tied : {false, true}) {
    const LlamaConfig c = TinyConfig(tied);
    Fixture f = MakeModel(c, 3, 0.3f);
    Batch batch = MakeBatch(2, 5, c.vocab_size, 11);
    StatusOr<Tensor> logits = f.model->Logits(batch);
    ASSERT_TRUE(logits.ok()) << logits.status().ToString();
    ASSERT_EQ(logits->shape(), (Shape{2, 5, 37}));
    const Weights w = ReadWeights(*f.model);
    Tensor expected = Tensor::Cpu({2, 5, 37}, DType::kF32);
    for (int64_t b = 0; b < 2; ++b) {
      const std::vector<double> ref =
          RefLogits(c, w, RowOf(batch.tokens, b), {0, 1, 2, 3, 4}, {0, 0, 0, 0, 0});
      for (int64_t i = 0; i < 5 * 37; ++i)
        expected.data<float>()[b * 5 * 37 + i] = static_cast<float>(ref[i]);
    }
    // f32 through 2 layers vs f64: logits are O(1).
    EXPECT_TRUE(testing::AllClose(*logits, expected, {2e-5, 1e-4}));
    StatusOr<LossSum> loss = f.model->Loss(batch);
    ASSERT_TRUE(loss.ok()) << loss.status().ToString();
    EXPECT_EQ(loss->count, 8);
    EXPECT_NEAR(loss->sum, RefLossSum(c, w, batch), 1e-5 * std::fabs(loss->sum));
  }
}

// Analytic gradients (f32) vs central differences of the f64 reference loss, for a sample of
// elements of every parameter: the largest-gradient element and 4 random ones.
TEST(LlamaModelTest, GradientsMatchFiniteDifferences) {
  for (bool tied : {false, true}) {
    const LlamaConfig c = TinyConfig(tied);
    Fixture f = MakeModel(c, 5, 0.3f);
    Batch batch = MakeBatch(2, 5, c.vocab_size, 21);
    const float grad_scale = 0.5f;
    ASSERT_TRUE(f.model->ZeroGrads().ok());
    StatusOr<LossSum> loss = f.model->ForwardBackward(batch, grad_scale);
    ASSERT_TRUE(loss.ok()) << loss.status().ToString();
    Weights w = ReadWeights(*f.model);
    std::mt19937_64 gen(99);
    for (const Parameter& p : f.model->parameters()) {
      const float* g = p.grad.data<float>();
      int64_t top = 0;
      double gmax = 0;
      for (int64_t i = 0; i < p.grad.numel(); ++i) {
        if (std::fabs(g[i]) > gmax) gmax = std::fabs(g[i]), top = i;
      }
      ASSERT_GT(gmax, 1e-4) << p.name << ": gradient is (nearly) all zero";
      std::vector<int64_t> sample = {top};
      for (int s = 0; s < 4; ++s) sample.push_back(gen() % p.grad.numel());
      for (int64_t i : sample) {
        auto loss_at = [&](double delta) {
          Weights v = w;
          v[p.name][i] += delta;
          if (tied && p.name == "model.embed_tokens.weight") v["lm_head.weight"][i] += delta;
          return RefLossSum(c, v, batch);
        };
        const double h = 1e-4;
        const double fd = grad_scale * (loss_at(h) - loss_at(-h)) / (2 * h);
        EXPECT_NEAR(g[i], fd, 1e-5 + 1e-3 * gmax) << p.name << "[" << i << "] tied=" << tied;
      }
    }
  }
}

// The same check straight on the f32 model, perturbing its own weights: coarse, but uses no
// reference code at all.
TEST(LlamaModelTest, GradientsMatchModelFiniteDifferences) {
  const LlamaConfig c = TinyConfig();
  Fixture f = MakeModel(c, 6, 0.3f);
  Batch batch = MakeBatch(2, 5, c.vocab_size, 31);
  ASSERT_TRUE(f.model->ZeroGrads().ok());
  ASSERT_TRUE(f.model->ForwardBackward(batch, 1.0f).ok());
  for (Parameter& p : f.model->parameters()) {
    int64_t top = 0;
    for (int64_t i = 0; i < p.grad.numel(); ++i) {
      if (std::fabs(p.grad.data<float>()[i]) > std::fabs(p.grad.data<float>()[top])) top = i;
    }
    float* x = p.weight.data<float>() + top;
    const float saved = *x, h = 1e-2f;
    *x = saved + h;
    const double up = f.model->Loss(batch)->sum;
    *x = saved - h;
    const double down = f.model->Loss(batch)->sum;
    *x = saved;
    const double fd = (up - down) / (2.0 * (static_cast<double>(saved + h) - saved));
    const double g = p.grad.data<float>()[top];
    EXPECT_NEAR(g, fd, 2e-3 + 2e-2 * std::fabs(g)) << p.name;
  }
}

// Weights of every parameter (copies).
std::vector<std::vector<float>> Weights0(const LlamaModel& m) {
  std::vector<std::vector<float>> out;
  for (const Parameter& p : m.parameters()) {
    out.emplace_back(p.weight.data<float>(), p.weight.data<float>() + p.weight.numel());
  }
  return out;
}

// Gradients of every parameter as one host vector (copies).
std::vector<std::vector<float>> Grads(const LlamaModel& m) {
  std::vector<std::vector<float>> out;
  for (const Parameter& p : m.parameters()) {
    if (!p.grad.defined()) {
      out.emplace_back();
      continue;
    }
    out.emplace_back(p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
  }
  return out;
}

TEST(LlamaModelTest, RecomputeGivesBitwiseIdenticalGradients) {
  const LlamaConfig c = TinyConfig();
  Fixture plain = MakeModel(c, 9, 0.3f);
  Fixture re = MakeModel(c, 9, 0.3f, ModelOptions{.recompute = true});
  Batch batch = MakeBatch(2, 5, c.vocab_size, 41);
  for (Fixture* f : {&plain, &re}) {
    ASSERT_TRUE(f->model->ZeroGrads().ok());
    ASSERT_TRUE(f->model->ForwardBackward(batch, 0.25f).ok());
  }
  const LossSum a = *plain.model->Loss(batch), b = *re.model->Loss(batch);
  EXPECT_EQ(a.sum, b.sum);
  EXPECT_EQ(Grads(*plain.model), Grads(*re.model));
}

TEST(LlamaModelTest, GradientsAccumulateOverMicroBatches) {
  const LlamaConfig c = TinyConfig();
  Fixture f = MakeModel(c, 10, 0.3f);
  Batch b1 = MakeBatch(2, 5, c.vocab_size, 51), b2 = MakeBatch(1, 3, c.vocab_size, 52);
  ASSERT_TRUE(f.model->ZeroGrads().ok());
  ASSERT_TRUE(f.model->ForwardBackward(b1, 1.0f).ok());
  const auto g1 = Grads(*f.model);
  ASSERT_TRUE(f.model->ZeroGrads().ok());
  ASSERT_TRUE(f.model->ForwardBackward(b2, 1.0f).ok());  // a different batch shape
  const auto g2 = Grads(*f.model);
  ASSERT_TRUE(f.model->ZeroGrads().ok());
  ASSERT_TRUE(f.model->ForwardBackward(b1, 1.0f).ok());
  ASSERT_TRUE(f.model->ForwardBackward(b2, 1.0f).ok());
  const auto both = Grads(*f.model);
  for (size_t p = 0; p < both.size(); ++p) {
    for (size_t i = 0; i < both[p].size(); ++i) {
      const float sum = g1[p][i] + g2[p][i];
      EXPECT_NEAR(both[p][i], sum, 1e-6 * std::fabs(sum) + 1e-9)
          << f.model->parameters()[p].name << "[" << i << "]";
    }
  }
}

// Two documents packed in one row (segment ids, positions restarting) equal two separate runs.
TEST(LlamaModelTest, PackedDocumentsEqualSeparateRuns) {
  const LlamaConfig c = TinyConfig();
  Fixture f = MakeModel(c, 12, 0.3f);
  const int64_t T1 = 3, T2 = 4;
  Batch d1 = MakeBatch(1, T1, c.vocab_size, 61), d2 = MakeBatch(1, T2, c.vocab_size, 62);
  Batch packed;
  packed.tokens = Tensor::Cpu({1, T1 + T2}, DType::kI32);
  packed.targets = Tensor::Cpu({1, T1 + T2}, DType::kI32);
  packed.positions = Tensor::Cpu({1, T1 + T2}, DType::kI32);
  packed.segment_ids = Tensor::Cpu({1, T1 + T2}, DType::kI32);
  for (int64_t t = 0; t < T1 + T2; ++t) {
    const bool first = t < T1;
    const Batch& d = first ? d1 : d2;
    const int64_t s = first ? t : t - T1;
    packed.tokens.data<int32_t>()[t] = d.tokens.data<int32_t>()[s];
    packed.targets.data<int32_t>()[t] = d.targets.data<int32_t>()[s];
    packed.positions.data<int32_t>()[t] = static_cast<int32_t>(s);
    packed.segment_ids.data<int32_t>()[t] = first ? 5 : 9;
  }
  const Tensor l1 = *f.model->Logits(d1), l2 = *f.model->Logits(d2), lp = *f.model->Logits(packed);
  Tensor joined = Tensor::Cpu({1, T1 + T2, c.vocab_size}, DType::kF32);
  std::copy(l1.data<float>(), l1.data<float>() + l1.numel(), joined.data<float>());
  std::copy(l2.data<float>(), l2.data<float>() + l2.numel(), joined.data<float>() + l1.numel());
  // Same math, but GEMMs of other shapes round differently: f32 tolerance.
  EXPECT_TRUE(testing::AllClose(lp, joined, {1e-5, 1e-5}));

  ASSERT_TRUE(f.model->ZeroGrads().ok());
  const LossSum s1 = *f.model->ForwardBackward(d1, 1.0f);
  const LossSum s2 = *f.model->ForwardBackward(d2, 1.0f);
  const auto separate = Grads(*f.model);
  ASSERT_TRUE(f.model->ZeroGrads().ok());
  const LossSum sp = *f.model->ForwardBackward(packed, 1.0f);
  const auto together = Grads(*f.model);
  EXPECT_EQ(sp.count, s1.count + s2.count);
  EXPECT_NEAR(sp.sum, s1.sum + s2.sum, 1e-5 * std::fabs(sp.sum));
  for (size_t p = 0; p < together.size(); ++p) {
    double gmax = 0;
    for (float g : separate[p]) gmax = std::max(gmax, std::fabs(double{g}));
    for (size_t i = 0; i < together[p].size(); ++i) {
      EXPECT_NEAR(together[p][i], separate[p][i], 1e-5 * gmax + 1e-7)
          << f.model->parameters()[p].name << "[" << i << "]";
    }
  }
}

TEST(LlamaModelTest, FrozenParametersGetNoGradient) {
  const LlamaConfig c = TinyConfig();
  Fixture full = MakeModel(c, 13, 0.3f);
  Fixture part = MakeModel(c, 13, 0.3f);
  const std::set<std::string> frozen = {"model.embed_tokens.weight",
                                        "model.layers.0.self_attn.k_proj.weight",  // part of q|k|v
                                        "model.layers.1.mlp.gate_proj.weight",
                                        "model.layers.1.mlp.up_proj.weight",  // all of gate|up
                                        "model.layers.0.input_layernorm.weight",
                                        "lm_head.weight"};
  for (Parameter& p : part.model->parameters()) p.trainable = !frozen.count(p.name);
  Batch batch = MakeBatch(2, 5, c.vocab_size, 71);
  EXPECT_EQ(part.model->ForwardBackward(batch, 1.0f).status().code(),
            StatusCode::kFailedPrecondition);  // flags changed without ZeroGrads
  for (Fixture* f : {&full, &part}) {
    ASSERT_TRUE(f->model->ZeroGrads().ok());
    ASSERT_TRUE(f->model->ForwardBackward(batch, 1.0f).ok());
  }
  const auto gf = Grads(*full.model), gp = Grads(*part.model);
  for (size_t i = 0; i < gf.size(); ++i) {
    const Parameter& p = part.model->parameters()[i];
    if (!frozen.count(p.name)) {
      ASSERT_EQ(gp[i].size(), gf[i].size()) << p.name;
      for (size_t j = 0; j < gf[i].size(); ++j) EXPECT_NEAR(gp[i][j], gf[i][j], 1e-6) << p.name;
    } else if (p.name == "model.layers.0.self_attn.k_proj.weight") {
      // Its fused group still trains (q, v): the slice exists and stays zero.
      for (float g : gp[i]) EXPECT_EQ(g, 0.0f);
    } else {
      EXPECT_FALSE(p.grad.defined()) << p.name << ": a fully frozen group keeps no gradient";
    }
  }
}

TEST(LlamaModelTest, FrozenBaseAllocatesNoGradients) {
  Fixture f = MakeModel(TinyConfig(), 14, 0.3f, ModelOptions{.trainable = false});
  for (const Parameter& p : f.model->parameters()) {
    EXPECT_FALSE(p.trainable);
    EXPECT_FALSE(p.grad.defined()) << p.name;
  }
  Batch batch = MakeBatch(2, 5, 37, 81);
  StatusOr<LossSum> l = f.model->ForwardBackward(batch, 1.0f);  // computes nothing to keep
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  EXPECT_NEAR(l->sum, f.model->Loss(batch)->sum, 1e-6 * l->sum);
  f.model->parameters()[1].trainable = true;
  ASSERT_TRUE(f.model->ZeroGrads().ok());
  EXPECT_TRUE(f.model->parameters()[1].grad.defined());
}

TEST(LlamaModelTest, LossChunkingDoesNotChangeResults) {
  const LlamaConfig c = TinyConfig();
  Fixture big = MakeModel(c, 15, 0.3f);
  Fixture small = MakeModel(c, 15, 0.3f, ModelOptions{.loss_chunk_tokens = 3});
  Batch batch = MakeBatch(2, 5, c.vocab_size, 91);
  // Rows 3..5 (the second chunk) have no targets: that chunk is skipped.
  for (int i = 3; i < 6; ++i) batch.targets.data<int32_t>()[i] = ops::kIgnoreIndex;
  for (Fixture* f : {&big, &small}) {
    ASSERT_TRUE(f->model->ZeroGrads().ok());
    ASSERT_TRUE(f->model->ForwardBackward(batch, 1.0f).ok());
  }
  EXPECT_NEAR(big.model->Loss(batch)->sum, small.model->Loss(batch)->sum, 1e-6);
  // GEMMs over fewer rows round differently: f32 tolerances.
  EXPECT_TRUE(
      testing::AllClose(*small.model->Logits(batch), *big.model->Logits(batch), {1e-5, 1e-5}));
  const auto a = Grads(*big.model), b = Grads(*small.model);
  for (size_t p = 0; p < a.size(); ++p) {
    double gmax = 0;
    for (float g : a[p]) gmax = std::max(gmax, std::fabs(double{g}));
    for (size_t i = 0; i < a[p].size(); ++i) EXPECT_NEAR(a[p][i], b[p][i], 1e-5 * gmax);
  }
}

TEST(LlamaModelTest, RejectsBadBatches) {
  Fixture f = MakeModel(TinyConfig(), 16, 0.02f);
  auto expect = [&](const Batch& b, const char* fragment) {
    StatusOr<LossSum> s = f.model->Loss(b);
    ASSERT_FALSE(s.ok()) << fragment;
    EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.status().message().find(fragment), std::string::npos) << s.status().ToString();
  };
  Batch b = MakeBatch(2, 5, 37, 1);
  b.tokens.data<int32_t>()[7] = 37;
  expect(b, "batch.tokens[1, 2] = 37 is outside [0, 37)");
  b = MakeBatch(2, 5, 37, 1);
  b.targets.data<int32_t>()[3] = -1;
  expect(b, "batch.targets[0, 3] = -1");
  b = MakeBatch(2, 5, 37, 1);
  b.targets = Tensor::CpuZeros({2, 4}, DType::kI32);
  expect(b, "batch.targets: expected a contiguous host i32 tensor [2, 5]");
  b = MakeBatch(2, 5, 37, 1);
  b.positions = Tensor::CpuZeros({2, 5}, DType::kF32);
  expect(b, "batch.positions");
  b = MakeBatch(2, 5, 37, 1);
  b.targets = Tensor();
  expect(b, "batch.targets is undefined");
  b.tokens = Tensor::CpuZeros({10}, DType::kI32);
  expect(b, "batch.tokens: expected a host i32 tensor [B, T]");
}

TEST(LlamaModelTest, SaveLoadRoundTripGivesIdenticalLogits) {
  for (bool tied : {false, true}) {
    const LlamaConfig c = TinyConfig(tied);
    Fixture a = MakeModel(c, 17, 0.3f);
    TempDir dir;
    ASSERT_TRUE(a.model->SaveSafetensors(dir.path(), DType::kF32).ok());
    StatusOr<LlamaConfig> loaded_config = LoadLlamaConfig(dir.Join("config.json"));
    ASSERT_TRUE(loaded_config.ok()) << loaded_config.status().ToString();
    Fixture b = MakeModel(*loaded_config, 99, 0.02f);  // different init, then overwritten
    Status s = b.model->LoadSafetensors(dir.path());
    ASSERT_TRUE(s.ok()) << s.ToString();
    Batch batch = MakeBatch(2, 5, c.vocab_size, 101);
    EXPECT_TRUE(testing::AllClose(*b.model->Logits(batch), *a.model->Logits(batch), {0, 0}));
    StatusOr<SafetensorsFile> file = SafetensorsFile::Open(dir.Join("model.safetensors"));
    ASSERT_TRUE(file.ok());
    EXPECT_EQ(file->Find("lm_head.weight") != nullptr, !tied);
    EXPECT_EQ(file->metadata().at("format"), "pt");

    // bf16: every weight comes back as its bf16 rounding.
    ASSERT_TRUE(a.model->SaveSafetensors(dir.path(), DType::kBF16).ok());
    ASSERT_TRUE(b.model->LoadSafetensors(dir.Join("model.safetensors")).ok());
    EXPECT_EQ(LoadLlamaConfig(dir.Join("config.json"))->torch_dtype, "bfloat16");
    for (size_t i = 0; i < a.model->parameters().size(); ++i) {
      const Tensor& wa = a.model->parameters()[i].weight;
      const Tensor& wb = b.model->parameters()[i].weight;
      for (int64_t j = 0; j < wa.numel(); ++j) {
        ASSERT_EQ(wb.data<float>()[j], RoundToBf16(wa.data<float>()[j]));
      }
    }
  }
}

TEST(LlamaModelTest, LoadRejectsMissingExtraAndMisShapedTensors) {
  const LlamaConfig c = TinyConfig();
  Fixture f = MakeModel(c, 18, 0.3f);
  const std::vector<std::vector<float>> original = Weights0(*f.model);
  TempDir dir;
  std::vector<std::pair<std::string, Tensor>> all;  // fresh values, different from the model's
  uint64_t seed = 1000;
  for (const Parameter& p : f.model->parameters()) {
    all.push_back({p.name, testing::RandomUniform(p.weight.shape(), seed++)});
  }
  const std::string path = dir.Join("model.safetensors");
  auto load_with = [&](std::vector<std::pair<std::string, Tensor>> tensors) {
    TANDEM_CHECK_OK(WriteSafetensors(path, tensors));
    return f.model->LoadSafetensors(dir.path());
  };
  auto without = all;
  without.erase(without.begin() + 3);
  Status s = load_with(without);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_NE(s.message().find("1 tensor(s) missing: '" + all[3].first + "'"), std::string::npos)
      << s.ToString();

  auto extra = all;
  extra.push_back({"model.layers.2.mlp.up_proj.weight", testing::RandomUniform({24, 16}, 1)});
  extra.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", testing::RandomUniform({2}, 1)});
  s = load_with(extra);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("unexpected tensor(s) for this config: "
                             "'model.layers.2.mlp.up_proj.weight'"),
            std::string::npos)
      << s.ToString();
  EXPECT_EQ(s.message().find("inv_freq"), std::string::npos) << s.ToString();

  auto bad = all;
  bad[5].second = testing::RandomUniform({3, 3}, 2);
  s = load_with(bad);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'" + all[5].first + "' in '" + path + "' is F32[3, 3], expected " +
                             ShapeToString(all[5].second.shape())),
            std::string::npos)
      << s.ToString();
  EXPECT_EQ(Weights0(*f.model), original) << "a failed load must not change any weight";

  s = load_with(all);
  ASSERT_TRUE(s.ok()) << s.ToString();
  for (size_t i = 0; i < all.size(); ++i) {
    const Tensor& w = f.model->parameters()[i].weight;
    EXPECT_EQ(std::memcmp(w.raw_data(), all[i].second.raw_data(), w.num_bytes()), 0)
        << all[i].first;
  }
}

}  // namespace
}  // namespace tandem::model
