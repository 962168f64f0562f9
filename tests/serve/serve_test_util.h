// Helpers shared by the serve tests: the small random Llamas they serve (one for the CPU, one with
// GPU-sized heads), the byte tokenizer's ids of a prompt, the greedy reference decoding, and
// waiting for a fine-tuning job to end.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"
#include "model/llama.h"
#include "ops/context.h"
#include "peft/s2ft.h"
#include "peft/s2ft_io.h"
#include "serve/engine.h"
#include "tests/common/testing.h"

namespace tandem::serve::test_util {

// hidden 32, ffn 48, 2 layers, 4 heads of dim 8 over 2 kv heads: small enough for many engine
// iterations on a CPU, with GQA.
inline model::LlamaConfig TinyServeConfig(int64_t vocab_size, int64_t max_positions) {
  model::LlamaConfig c;
  c.vocab_size = vocab_size;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.rope_theta = 100.0;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = max_positions;
  return c;
}

// hidden 128, ffn 256, 2 layers, 4 heads of dim 64 over 2 kv heads, vocab 300, 256 positions:
// the smallest shape the CUDA kernels take.
inline model::LlamaConfig SmallGpuServeConfig() {
  model::LlamaConfig c;
  c.vocab_size = 300;
  c.hidden_size = 128;
  c.intermediate_size = 256;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.max_position_embeddings = 256;
  return c;
}

// Writes a frozen base of `config` with weights from InitRandom(seed, scale) to `dir` as a model
// directory (safetensors in `dtype`).
inline void SaveRandomModel(const model::LlamaConfig& config, const std::string& dir, uint64_t seed,
                            float scale, DType dtype) {
  auto cpu = ops::Context::Cpu();
  model::ModelOptions mo;
  mo.trainable = false;
  auto m = std::move(model::LlamaModel::Create(*cpu, config, mo)).value();
  TANDEM_CHECK_OK(m->InitRandom(seed, scale));
  TANDEM_CHECK_OK(m->SaveSafetensors(dir, dtype));
}

// Polls job `id` until it succeeded, failed or was cancelled, or `seconds` passed; returns the
// last state seen.
inline FineTuneJobInfo WaitJobFinished(Engine& engine, const std::string& id, double seconds) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int>(seconds * 1e3));
  while (true) {
    StatusOr<FineTuneJobInfo> job = engine.GetFineTuneJob(id);
    EXPECT_TRUE(job.ok()) << job.status().ToString();
    if (!job.ok()) return {};
    const std::string& s = job->status;
    if (s == "succeeded" || s == "failed" || s == "cancelled" ||
        std::chrono::steady_clock::now() > deadline) {
      return *job;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

// <bos> (256) then the bytes of `text`, as the byte tokenizer encodes a prompt.
inline std::vector<int32_t> ByteIds(const std::string& text) {
  std::vector<int32_t> ids = {256};
  for (unsigned char ch : text) ids.push_back(ch);
  return ids;
}

// `steps` greedy tokens after `ids` from LlamaModel::Logits of the whole sequence each step (with
// whatever adapter is attached), the argmax over the first `vocab_limit` ids: what the engine's
// greedy decoding must reproduce.
inline std::vector<int32_t> GreedyTokens(model::LlamaModel& m, std::vector<int32_t> ids,
                                         int steps, int64_t vocab_limit) {
  const int64_t V = m.config().vocab_size;
  std::vector<int32_t> out;
  for (int s = 0; s < steps; ++s) {
    const int64_t T = static_cast<int64_t>(ids.size());
    model::Batch b;
    b.tokens = Tensor::Cpu({1, T}, DType::kI32);
    std::copy(ids.begin(), ids.end(), b.tokens.data<int32_t>());
    Tensor logits = std::move(m.Logits(b)).value();
    const float* last = logits.data<float>() + (T - 1) * V;
    const int32_t id = static_cast<int32_t>(std::max_element(last, last + vocab_limit) - last);
    out.push_back(id);
    ids.push_back(id);
  }
  return out;
}

// Writes an S2FT adapter for `config` to `dir`: half the heads and a quarter of the FFN channels
// of every layer, coupled (row blocks on q/k/v/gate/up as well as column blocks on o/down), every
// block uniform in [-0.5, 0.5) from `seed`.
inline void SaveRandomS2ftAdapter(ops::Context& cpu, const model::LlamaConfig& config,
                                  const std::string& dir, uint64_t seed) {
  auto base = std::move(model::LlamaModel::Create(cpu, config, model::ModelOptions())).value();
  peft::S2ftConfig sc;
  sc.heads_fraction = 0.5;
  sc.ffn_fraction = 0.25;
  sc.coupled = true;
  auto ad = std::move(peft::PrepareS2ft(cpu, *base, sc)).value();
  for (size_t i = 0; i < ad->parameters().size(); ++i) {
    TANDEM_CHECK_OK(ad->SetFromHost(
        i, testing::RandomUniform(ad->parameters()[i].master.shape(), seed + i, -0.5f, 0.5f)));
  }
  TANDEM_CHECK_OK(peft::SaveS2ftAdapter(*ad, dir));
}

}  // namespace tandem::serve::test_util
