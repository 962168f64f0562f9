// Shared by engine_infer_test.cc (CPU) and engine_infer_gpu_test.cc (CUDA): InferModel's paged,
// chunked, multi-adapter forward against LlamaModel::Logits on the same weights.
//
// Three sequences (base, adapter 0 of rank 4 on all projections, adapter 1 of rank 2 on some)
// run as one ragged batch: prompt prefill in two chunks of different sizes, then one decode
// token each; the logits of each sequence's last token must equal LlamaModel::Logits (with the
// sequence's adapter attached through peft::AdapterSet) at that position.
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

inline std::unique_ptr<peft::LoraAdapter> ParityAdapter(ops::Context& ctx,
                                                        const model::LlamaConfig& c, int64_t r,
                                                        std::vector<std::string> targets,
                                                        uint64_t seed) {
  peft::LoraConfig lc;
  lc.r = r;
  lc.alpha = 2.0 * r;
  lc.target_modules = std::move(targets);
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

inline void RunInferParity(ops::Context& ctx, int64_t head_dim, testing::Tolerance tol) {
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
  adapters.push_back(ParityAdapter(*host_ctx, c, 4, {"all-linear"}, 10));
  adapters.push_back(ParityAdapter(*host_ctx, c, 2, {"q_proj", "v_proj", "up_proj"}, 20));
  std::vector<AdapterWeights> weights;
  for (const auto& a : adapters) {
    weights.push_back(std::move(AdapterWeights::FromLora(ctx, *a, m->compute_dtype())).value());
  }
  // Sequences: adapter -1, 0, 1; prompt lengths 13, 21, 5.
  const std::vector<int32_t> which = {-1, 0, 1};
  std::vector<std::vector<int32_t>> ids;
  std::vector<std::vector<std::vector<int32_t>>> blocks(3, std::vector<std::vector<int32_t>>(L));
  for (int s = 0; s < 3; ++s) {
    Tensor t = testing::RandomInts({std::vector<int64_t>{13, 21, 5}[s] + 1}, 50 + s, 96);
    ids.emplace_back(t.data<int32_t>(), t.data<int32_t>() + t.numel());
    for (int64_t l = 0; l < L; ++l) ASSERT_TRUE(pool.Allocate(PageUse::kKv, 4, &blocks[s][l]));
  }
  std::vector<const AdapterWeights*> ptrs = {&weights[0], &weights[1]};
  // Three forwards: prompt[0:k), prompt[k:T-1), then the decode token at T-1.
  auto run = [&](std::vector<std::pair<int64_t, int64_t>> ranges) {
    std::vector<SeqChunk> seqs;
    for (int s = 0; s < 3; ++s) {
      SeqChunk ch;
      ch.start = ranges[s].first;
      ch.tokens.assign(ids[s].begin() + ranges[s].first, ids[s].begin() + ranges[s].second);
      ch.adapter = which[s];
      ch.blocks = &blocks[s];
      seqs.push_back(std::move(ch));
    }
    return std::move(infer->Forward(pages, seqs, ptrs)).value();  // [3, V]
  };
  run({{0, 5}, {0, 9}, {0, 1}});
  const Tensor prefill = run({{5, 13}, {9, 21}, {1, 5}});
  const Tensor decode = run({{13, 14}, {21, 22}, {5, 6}});
  const int64_t V = c.vocab_size;
  for (int s = 0; s < 3; ++s) {
    for (int step = 0; step < 2; ++step) {
      const Tensor& got_all = step == 0 ? prefill : decode;
      const int64_t len = static_cast<int64_t>(ids[s].size()) - (step == 0 ? 1 : 0);
      std::vector<int32_t> prefix(ids[s].begin(), ids[s].begin() + len);
      std::unique_ptr<peft::LoraAdapter> a;
      if (which[s] >= 0) {  // a fresh copy: AdapterSet takes ownership
        a = which[s] == 0 ? ParityAdapter(ctx, c, 4, {"all-linear"}, 10)
                          : ParityAdapter(ctx, c, 2, {"q_proj", "v_proj", "up_proj"}, 20);
      }
      Tensor want = ReferenceLastLogits(*m, which[s] >= 0 ? &a : nullptr, ctx, prefix);
      Tensor got = Tensor::Cpu({V}, DType::kF32);
      std::copy_n(got_all.data<float>() + s * V, V, got.data<float>());
      EXPECT_TRUE(testing::AllClose(got, want, tol)) << "sequence " << s << " step " << step;
    }
  }
}

}  // namespace tandem::serve
