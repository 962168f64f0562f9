// Shared by llama_fixture_test.cc (CPU, f32) and llama_gpu_test.cc (CUDA, bf16): the HF
// transformers fixtures under tests/golden/<name>/ written by scripts/make_fixtures.py.
//
// A fixture directory holds config.json, model.safetensors (f32, HF names), meta.json and
// expected.safetensors: "input_ids" i32 [B, T], "labels" i32 [B, T] (HF convention: labels[t] is
// predicted at position t - 1, -100 ignored), "logits" f32 [B, T, V], "loss" f32 [1] (HF mean
// loss), "grad.<param>" f32 of the mean loss, "adamw_losses" f32 [steps] (before each step) and
// optionally "rope.inv_freq" f32 [D/2].
#pragma once

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/llama.h"
#include "model/safetensors.h"
#include "ops/ops.h"
#include "tests/common/testing.h"

namespace tandem::model::golden {

// tests/golden of the source tree, or $TANDEM_GOLDEN_DIR when set.
inline std::string GoldenRoot() {
  const char* env = std::getenv("TANDEM_GOLDEN_DIR");
  return env != nullptr && *env != '\0' ? std::string(env) : testing::SourceDir() + "/tests/golden";
}

// Fixture directories (those holding expected.safetensors), sorted; nullopt when tests/golden
// itself does not exist.
inline std::optional<std::vector<std::string>> ModelFixtureDirs() {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(GoldenRoot(), ec)) return std::nullopt;
  std::vector<std::string> dirs;
  for (const auto& e : fs::directory_iterator(GoldenRoot(), ec)) {
    if (e.is_directory() && fs::exists(e.path() / "expected.safetensors")) {
      dirs.push_back(e.path().string());
    }
  }
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

struct AdamWMeta {
  float lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
};

struct GoldenCase {
  std::string dir;
  LlamaConfig config;
  SafetensorsFile expected;
  Batch batch;        // targets[t] = labels[t + 1], the last position ignored
  int64_t count = 0;  // target tokens
  AdamWMeta adamw;
  // How far transformers itself lands from its f32 results when run in bf16 ("hf_bf16_errors" of
  // meta.json: max|a-e|/max|e| per tensor, relative error for losses); empty in old fixtures.
  std::map<std::string, double> hf_bf16_errors;
};

inline StatusOr<GoldenCase> LoadCase(const std::string& dir) {
  GoldenCase g;
  g.dir = dir;
  TANDEM_ASSIGN_OR_RETURN(g.config, LoadLlamaConfig(dir + "/config.json"));
  TANDEM_ASSIGN_OR_RETURN(g.expected, SafetensorsFile::Open(dir + "/expected.safetensors"));
  TANDEM_ASSIGN_OR_RETURN(Tensor ids, g.expected.Get("input_ids"));
  TANDEM_ASSIGN_OR_RETURN(Tensor labels, g.expected.Get("labels"));
  TANDEM_RETURN_IF_ERROR(ExpectDType(ids, DType::kI32, "input_ids"));
  TANDEM_RETURN_IF_ERROR(ExpectShape(labels, ids.shape(), "labels"));
  const int64_t B = ids.dim(0), T = ids.dim(1);
  g.batch.tokens = Tensor::Cpu({B, T}, DType::kI32);
  std::copy(ids.data<int32_t>(), ids.data<int32_t>() + B * T, g.batch.tokens.data<int32_t>());
  g.batch.targets = Tensor::Cpu({B, T}, DType::kI32);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int32_t target = t + 1 < T ? labels.data<int32_t>()[b * T + t + 1] : ops::kIgnoreIndex;
      g.batch.targets.data<int32_t>()[b * T + t] = target;
      g.count += target != ops::kIgnoreIndex;
    }
  }
  std::ifstream in(dir + "/meta.json");
  if (!in) return NotFoundError(StrCat(dir, "/meta.json is missing"));
  const nlohmann::json meta = nlohmann::json::parse(in, nullptr, false);
  if (meta.is_discarded() || !meta.contains("adamw")) {
    return InvalidArgumentError(StrCat(dir, "/meta.json: expected an object with \"adamw\""));
  }
  const nlohmann::json& a = meta["adamw"];
  g.adamw = {a.at("lr").get<float>(), a.at("betas")[0].get<float>(), a.at("betas")[1].get<float>(),
             a.at("eps").get<float>(), a.at("weight_decay").get<float>()};
  if (meta.contains("hf_bf16_errors")) {
    for (const auto& [key, value] : meta["hf_bf16_errors"].items()) {
      if (value.is_number()) g.hf_bf16_errors[key] = value.get<double>();
    }
  }
  return g;
}

// Loss before each of `steps` AdamW steps on the case's batch (mean loss, grads of the mean, no
// clipping, decay on every parameter as in the fixture). The model's weights are trained.
inline StatusOr<std::vector<double>> AdamWLosses(ops::Context& ctx, LlamaModel& model,
                                                 const GoldenCase& g, int steps) {
  std::vector<Tensor> m, v;
  for (const Parameter& p : model.parameters()) {
    for (std::vector<Tensor>* s : {&m, &v}) {
      TANDEM_ASSIGN_OR_RETURN(Tensor t,
                              Tensor::Empty(p.weight.shape(), DType::kF32, ctx.allocator()));
      TANDEM_RETURN_IF_ERROR(ops::Fill(ctx, t, 0.0f));
      s->push_back(t);
    }
  }
  std::vector<double> losses;
  for (int step = 1; step <= steps; ++step) {
    TANDEM_RETURN_IF_ERROR(model.ZeroGrads());
    TANDEM_ASSIGN_OR_RETURN(LossSum l, model.ForwardBackward(g.batch, 1.0f / g.count));
    losses.push_back(l.sum / l.count);
    ops::AdamWParams params;
    params.lr = g.adamw.lr;
    params.beta1 = g.adamw.beta1;
    params.beta2 = g.adamw.beta2;
    params.eps = g.adamw.eps;
    params.weight_decay = g.adamw.weight_decay;
    params.step = step;
    for (size_t i = 0; i < model.parameters().size(); ++i) {
      Parameter& p = model.parameters()[i];
      // On the CPU master and weight are one tensor; on CUDA the bf16 weight gets the new master.
      Tensor weights = p.master.raw_data() == p.weight.raw_data() ? Tensor() : p.weight;
      TANDEM_RETURN_IF_ERROR(ops::AdamW(ctx, p.master, m[i], v[i], weights, p.grad, params));
    }
  }
  TANDEM_RETURN_IF_ERROR(ctx.Synchronize());
  return losses;
}

}  // namespace tandem::model::golden
