// Pieces shared by the serving benchmarks (serve_bench.cc, coserve_bench.cc): "--key value" flag
// parsing, percentiles, the random model of a given shape (or a model directory's config) and the
// random LoRA adapters registered under N names.
//
// Header-only; no state. Errors come back as Status; the benches print them and exit.
#pragma once

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"
#include "model/llama.h"
#include "peft/adapter_io.h"
#include "serve/engine.h"

namespace tandem::bench {

// "--key value" pairs; a flag given twice keeps the last value.
struct Args {
  std::map<std::string, std::string> kv;
  std::string Get(const std::string& k, const std::string& d) const {
    auto it = kv.find(k);
    return it == kv.end() ? d : it->second;
  }
  int64_t Int(const std::string& k, int64_t d) const {
    return std::stoll(Get(k, std::to_string(d)));
  }
  double Num(const std::string& k, double d) const { return std::stod(Get(k, std::to_string(d))); }
};

inline Args ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) a.kv[std::string(argv[i]).substr(2)] = argv[i + 1];
  return a;
}

// The p-quantile (0 <= p <= 1) of v by nearest rank; 0 for an empty v.
inline double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

// --model-dir DIR: that directory and its config. Otherwise a random model (seed 1, std 0.02) of
// the shape --layers/--hidden/--inter/--vocab/--heads/--kv-heads (TinyLlama-1.1B by default),
// saved in bf16 to <tmp>/model. Returns the model directory.
inline StatusOr<std::string> PrepareModel(const Args& a, const std::string& tmp,
                                          model::LlamaConfig* config) {
  std::string model_dir = a.Get("model-dir", "");
  if (!model_dir.empty()) {
    TANDEM_ASSIGN_OR_RETURN(*config, model::LoadLlamaConfig(model_dir + "/config.json"));
    return model_dir;
  }
  config->num_hidden_layers = a.Int("layers", 22);
  config->hidden_size = a.Int("hidden", 2048);
  config->intermediate_size = a.Int("inter", 5632);
  config->vocab_size = a.Int("vocab", 32000);
  config->num_attention_heads = a.Int("heads", 32);
  config->num_key_value_heads = a.Int("kv-heads", 4);
  config->max_position_embeddings = 2048;
  auto ctx = ops::Context::Cpu();
  model::ModelOptions mo;
  mo.trainable = false;
  TANDEM_ASSIGN_OR_RETURN(auto m, model::LlamaModel::Create(*ctx, *config, mo));
  TANDEM_RETURN_IF_ERROR(m->InitRandom(1, 0.02f));
  model_dir = tmp + "/model";
  TANDEM_RETURN_IF_ERROR(m->SaveSafetensors(model_dir, DType::kBF16));
  return model_dir;
}

// --adapters N (default 16) random rank---rank (16) LoRA adapters on q/k/v/o with nonzero B: one
// adapter written to <tmp>/adapter, registered in `eo` under the names lora0 .. lora<N-1>. N = 0
// adds nothing.
inline Status AddRandomAdapters(const Args& a, const model::LlamaConfig& config,
                                const std::string& tmp, serve::EngineOptions* eo) {
  const int64_t num_adapters = a.Int("adapters", 16);
  if (num_adapters <= 0) return Status::Ok();
  auto ctx = ops::Context::Cpu();
  peft::LoraConfig lc;
  lc.r = a.Int("rank", 16);
  lc.alpha = 2.0 * lc.r;
  // --targets: comma-separated projections, or all-linear (default q, k, v, o as in S-LoRA).
  lc.target_modules.clear();
  const std::string targets = a.Get("targets", "q_proj,k_proj,v_proj,o_proj");
  for (size_t at = 0; at <= targets.size();) {
    const size_t comma = std::min(targets.find(',', at), targets.size());
    if (comma > at) lc.target_modules.push_back(targets.substr(at, comma - at));
    at = comma + 1;
  }
  TANDEM_ASSIGN_OR_RETURN(auto adapter, peft::LoraAdapter::Create(*ctx, config, lc));
  for (size_t i = 1; i < adapter->parameters().size(); i += 2) {  // nonzero B
    Tensor b = Tensor::Cpu(adapter->parameters()[i].weight.shape(), DType::kF32);
    for (int64_t j = 0; j < b.numel(); ++j) b.data<float>()[j] = 1e-3f * ((j % 7) - 3);
    TANDEM_RETURN_IF_ERROR(adapter->SetFromHost(i, b));
  }
  TANDEM_RETURN_IF_ERROR(peft::SaveLoraAdapter(*adapter, tmp + "/adapter", DType::kBF16));
  for (int64_t i = 0; i < num_adapters; ++i) {
    eo->adapters.push_back({"lora" + std::to_string(i), tmp + "/adapter"});
  }
  return Status::Ok();
}

}  // namespace tandem::bench
