// Helpers shared by the peft tests: a tiny Llama base, batches, random adapter weights.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "model/llama.h"
#include "ops/context.h"
#include "ops/ops.h"
#include "peft/adapter_set.h"
#include "peft/lora.h"
#include "tests/common/testing.h"

namespace tandem::peft::testing {

using ::tandem::testing::AllClose;
using ::tandem::testing::RandomInts;
using ::tandem::testing::RandomUniform;

// GQA, odd sizes, two layers.
inline model::LlamaConfig TinyConfig() {
  model::LlamaConfig c;
  c.vocab_size = 37;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.rope_theta = 100.0;
  c.rms_norm_eps = 1e-5;
  return c;
}

// A base with random weights (std 0.3 so activations are not tiny); frozen unless `trainable`.
inline std::unique_ptr<model::LlamaModel> MakeBase(ops::Context& ctx, const model::LlamaConfig& c,
                                                   uint64_t seed, bool trainable = false,
                                                   bool recompute = false) {
  model::ModelOptions o;
  o.trainable = trainable;
  o.recompute = recompute;
  auto m = std::move(model::LlamaModel::Create(ctx, c, o)).value();
  TANDEM_CHECK_OK(m->InitRandom(seed, 0.3f));
  return m;
}

// Random tokens and next-token targets, two of them ignored.
inline model::Batch MakeBatch(int64_t B, int64_t T, int64_t vocab, uint64_t seed) {
  model::Batch b;
  b.tokens = RandomInts({B, T}, seed, static_cast<int32_t>(vocab));
  b.targets = RandomInts({B, T}, seed + 1, static_cast<int32_t>(vocab));
  b.targets.data<int32_t>()[0] = ops::kIgnoreIndex;
  b.targets.data<int32_t>()[B * T - 1] = ops::kIgnoreIndex;
  return b;
}

// The sequences `rows` of a batch (and their adapter ids, when set).
inline model::Batch SubBatch(const model::Batch& b, const std::vector<int64_t>& rows) {
  const int64_t T = b.tokens.dim(1), n = static_cast<int64_t>(rows.size());
  model::Batch out;
  out.tokens = Tensor::Cpu({n, T}, DType::kI32);
  out.targets = Tensor::Cpu({n, T}, DType::kI32);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t t = 0; t < T; ++t) {
      out.tokens.data<int32_t>()[i * T + t] = b.tokens.data<int32_t>()[rows[i] * T + t];
      out.targets.data<int32_t>()[i * T + t] = b.targets.data<int32_t>()[rows[i] * T + t];
    }
  }
  return out;
}

inline Tensor AdapterIds(const std::vector<int32_t>& ids) {
  Tensor t = Tensor::Cpu({static_cast<int64_t>(ids.size())}, DType::kI32);
  for (size_t i = 0; i < ids.size(); ++i) t.data<int32_t>()[i] = ids[i];
  return t;
}

// Every A and B uniform in [-scale, scale) (B is zero after PEFT's init: no gradient would reach A
// and the adapter would not change the model).
inline void Randomize(LoraAdapter& a, uint64_t seed, float scale = 0.3f) {
  for (size_t i = 0; i < a.parameters().size(); ++i) {
    const Tensor t = RandomUniform(a.parameters()[i].master.shape(), seed + i, -scale, scale);
    TANDEM_CHECK_OK(a.SetFromHost(i, t));
  }
}

inline std::unique_ptr<LoraAdapter> MakeAdapter(ops::Context& ctx, const model::LlamaConfig& c,
                                                const LoraConfig& lc, uint64_t seed) {
  auto a = std::move(LoraAdapter::Create(ctx, c, lc)).value();
  Randomize(*a, seed);
  return a;
}

// A host copy of a contiguous host tensor (e.g. one viewing a file mapping that is about to go).
inline Tensor Clone(const Tensor& t) {
  Tensor out = Tensor::Cpu(t.shape(), t.dtype());
  TANDEM_CHECK_OK(CopyTensor(out, t));
  return out;
}

// Host f32 copies of an adapter's gradients.
inline std::vector<Tensor> Grads(const LoraAdapter& a) {
  std::vector<Tensor> out;
  for (const model::Parameter& p : a.parameters()) out.push_back(*CopyToHostBlocking(p.grad));
  return out;
}

}  // namespace tandem::peft::testing
