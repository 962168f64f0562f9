// Shared by engine_infer_test.cc (CPU) and engine_infer_gpu_test.cc (CUDA): InferModel's paged,
// chunked, multi-adapter forward against LlamaModel::Logits on the same weights.
//
// One sequence on the base model and one per adapter (by default: adapter 0 of rank 4 on all
// projections, adapter 1 of rank 2 on some) run as one ragged batch: prompt prefill in two chunks
// of different sizes, then one decode token each; the logits of each sequence's last token must
// equal LlamaModel::Logits (with the sequence's adapter attached through peft::AdapterSet) at that
// position.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "model/llama.h"
#include "peft/adapter_set.h"
#include "peft/lora.h"
#include "serve/infer_model.h"
#include "serve/kv_pool.h"
#include "tests/common/testing.h"

namespace tandem::serve {

inline model::LlamaConfig ParityConfig(int64_t head_dim) {
  model::LlamaConfig c;
  c.vocab_size = 96;
  c.hidden_size = 128;
  c.intermediate_size = 192;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = head_dim;
  c.max_position_embeddings = 128;
  return c;
}

// An adapter of the parity tests: alpha 2r unless alpha_pattern says otherwise; every A and B
// uniform in [-0.2, 0.2) from `seed`.
struct ParitySpec {
  int64_t r = 4;
  std::vector<std::string> targets;
  uint64_t seed = 0;
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
};

inline std::vector<ParitySpec> DefaultParitySpecs() {
  return {{4, {"all-linear"}, 10, {}, {}}, {2, {"q_proj", "v_proj", "up_proj"}, 20, {}, {}}};
}

// Adapters that exercise the fused q|k|v and gate|up LoRA sites (serve/infer_model.h): q and v
// without k; all of q, k, v, gate, up with a different rank and scale each (and another q rank in
// layer 1); o and down only (rank 0 on both fused sites); k and up alone (blocks that do not start
// at column 0).
inline std::vector<ParitySpec> FusedParitySpecs() {
  return {{3, {"q_proj", "v_proj"}, 30, {}, {}},
          {4,
           {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"},
           40,
           {{"^model.layers.1.self_attn.q_proj", 6},
            {"k_proj", 2},
            {"v_proj", 5},
            {"gate_proj", 3},
            {"up_proj", 1}},
           {{"k_proj", 1.0}, {"up_proj", 3.0}, {"v_proj", 4.0}}},
          {2, {"o_proj", "down_proj"}, 50, {}, {}},
          {2, {"k_proj", "up_proj"}, 60, {}, {}}};
}

inline std::unique_ptr<peft::LoraAdapter> ParityAdapter(ops::Context& ctx,
                                                        const model::LlamaConfig& c,
                                                        const ParitySpec& spec) {
  peft::LoraConfig lc;
  lc.r = spec.r;
  lc.alpha = 2.0 * spec.r;
  lc.target_modules = spec.targets;
  lc.rank_pattern = spec.rank_pattern;
  lc.alpha_pattern = spec.alpha_pattern;
  const uint64_t seed = spec.seed;
  auto a = std::move(peft::LoraAdapter::Create(ctx, c, lc)).value();
  for (size_t i = 0; i < a->parameters().size(); ++i) {
    TANDEM_CHECK_OK(a->SetFromHost(
        i, testing::RandomUniform(a->parameters()[i].weight.shape(), seed + i, -0.2f, 0.2f)));
  }
  return a;
}

// Logits [V] of the last position of `ids` through LlamaModel, with adapter `a` (or none).
inline Tensor ReferenceLastLogits(model::LlamaModel& m, std::unique_ptr<peft::LoraAdapter>* a,
                                  ops::Context& ctx, const std::vector<int32_t>& ids) {
  std::unique_ptr<peft::AdapterSet> set;
  if (a != nullptr) {
    set = std::make_unique<peft::AdapterSet>(ctx, m.config());
    TANDEM_CHECK_OK(set->Add(std::move(*a)));
    m.SetAdapter(set.get());
  }
  const int64_t T = static_cast<int64_t>(ids.size()), V = m.config().vocab_size;
  model::Batch b;
  b.tokens = Tensor::Cpu({1, T}, DType::kI32);
  std::copy(ids.begin(), ids.end(), b.tokens.data<int32_t>());
  Tensor logits = std::move(m.Logits(b)).value();
  Tensor last = Tensor::Cpu({V}, DType::kF32);
  std::copy_n(logits.data<float>() + (T - 1) * V, V, last.data<float>());
  m.SetAdapter(nullptr);
  return last;
}

inline void RunInferParity(ops::Context& ctx, int64_t head_dim, testing::Tolerance tol,
                           const std::vector<ParitySpec>& specs = DefaultParitySpecs()) {
  const model::LlamaConfig c = ParityConfig(head_dim);
  model::ModelOptions mo;
  mo.trainable = false;
  auto m = std::move(model::LlamaModel::Create(ctx, c, mo)).value();
  TANDEM_CHECK_OK(m->InitRandom(3, 0.1f));
  auto infer = std::move(InferModel::Create(ctx, *m, /*block_tokens=*/8)).value();
  const int64_t L = c.num_hidden_layers;
  const int64_t page_bytes = (infer->kv_block_bytes() + 255) / 256 * 256;
  PagePool pool = std::move(PagePool::Create(ctx.allocator(), page_bytes, 64)).value();
  Tensor pages = pool.PagesAs(infer->compute_dtype());
  // The engine's path: adapters loaded on the host, their compute copies on ctx's device.
  auto host_ctx = ops::Context::Cpu();
  std::vector<std::unique_ptr<peft::LoraAdapter>> adapters;
  for (const ParitySpec& spec : specs) adapters.push_back(ParityAdapter(*host_ctx, c, spec));
  std::vector<AdapterWeights> weights;
  for (const auto& a : adapters) {
    weights.push_back(std::move(AdapterWeights::FromLora(ctx, *a, m->compute_dtype())).value());
  }
  std::vector<const AdapterWeights*> ptrs;
  for (const AdapterWeights& w : weights) ptrs.push_back(&w);
  // Sequences: adapter -1, 0, 1, ...; prompt lengths 13, 21, 5, 13, 21, 5, ...
  const int S = static_cast<int>(specs.size()) + 1;
  const std::vector<int64_t> kLens = {13, 21, 5}, kSplit = {5, 9, 1};
  std::vector<std::vector<int32_t>> ids;
  std::vector<std::vector<std::vector<int32_t>>> blocks(S, std::vector<std::vector<int32_t>>(L));
  for (int s = 0; s < S; ++s) {
    Tensor t = testing::RandomInts({kLens[s % 3] + 1}, 50 + s, 96);
    ids.emplace_back(t.data<int32_t>(), t.data<int32_t>() + t.numel());
    for (int64_t l = 0; l < L; ++l) ASSERT_TRUE(pool.Allocate(PageUse::kKv, 4, &blocks[s][l]));
  }
  // Three forwards: prompt[0:k), prompt[k:T-1), then the decode token at T-1.
  auto run = [&](int step) {
    std::vector<SeqChunk> seqs;
    for (int s = 0; s < S; ++s) {
      const int64_t T = static_cast<int64_t>(ids[s].size()), k = kSplit[s % 3];
      const int64_t from = step == 0 ? 0 : step == 1 ? k : T - 1;
      const int64_t to = step == 0 ? k : step == 1 ? T - 1 : T;
      SeqChunk ch;
      ch.start = from;
      ch.tokens.assign(ids[s].begin() + from, ids[s].begin() + to);
      ch.adapter = s - 1;
      ch.blocks = &blocks[s];
      seqs.push_back(std::move(ch));
    }
    return std::move(infer->Forward(pages, seqs, ptrs)).value();  // [S, V]
  };
  run(0);
  const Tensor prefill = run(1);
  const Tensor decode = run(2);
  const int64_t V = c.vocab_size;
  for (int s = 0; s < S; ++s) {
    for (int step = 0; step < 2; ++step) {
      const Tensor& got_all = step == 0 ? prefill : decode;
      const int64_t len = static_cast<int64_t>(ids[s].size()) - (step == 0 ? 1 : 0);
      std::vector<int32_t> prefix(ids[s].begin(), ids[s].begin() + len);
      std::unique_ptr<peft::LoraAdapter> a;
      if (s > 0) a = ParityAdapter(ctx, c, specs[s - 1]);  // a fresh copy: AdapterSet owns it
      Tensor want = ReferenceLastLogits(*m, s > 0 ? &a : nullptr, ctx, prefix);
      Tensor got = Tensor::Cpu({V}, DType::kF32);
      std::copy_n(got_all.data<float>() + s * V, V, got.data<float>());
      EXPECT_TRUE(testing::AllClose(got, want, tol)) << "sequence " << s << " step " << step;
    }
  }
}

}  // namespace tandem::serve
