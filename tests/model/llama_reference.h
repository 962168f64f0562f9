// An independent f64 reference of HF LlamaForCausalLM for tests, written straight from the
// definitions (no tandem ops): RMSNorm, rotate-half RoPE, causal GQA attention with segment ids,
// SwiGLU MLP, untied or tied lm_head. Slow and simple on purpose.
#pragma once

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "model/llama.h"
#include "ops/ops.h"

namespace tandem::model::reference {

using Weights = std::map<std::string, std::vector<double>>;

inline Weights ReadWeights(const LlamaModel& m) {
  Weights w;
  for (const Parameter& p : m.parameters()) {
    const float* d = p.weight.data<float>();
    w[p.name].assign(d, d + p.weight.numel());
  }
  if (m.config().tie_word_embeddings) w["lm_head.weight"] = w["model.embed_tokens.weight"];
  return w;
}

// y[t, o] = sum_i x[t, i] W[o, i]
inline std::vector<double> Linear(const std::vector<double>& x, const std::vector<double>& W,
                                  int64_t T, int64_t in, int64_t out) {
  std::vector<double> y(T * out, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) y[t * out + o] += x[t * in + i] * W[o * in + i];
  return y;
}

inline std::vector<double> RmsNorm(const std::vector<double>& x, const std::vector<double>& w,
                                   int64_t T, int64_t C, double eps) {
  std::vector<double> y(T * C);
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += x[t * C + c] * x[t * C + c];
    const double r = 1.0 / std::sqrt(ss / C + eps);
    for (int64_t c = 0; c < C; ++c) y[t * C + c] = x[t * C + c] * r * w[c];
  }
  return y;
}

// HF rotate_half on x [T, H, D].
inline void RefRope(std::vector<double>& x, const std::vector<int32_t>& pos, int64_t T, int64_t H,
                    int64_t D, double theta) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < D / 2; ++i) {
        const double angle = pos[t] / std::pow(theta, 2.0 * i / D);
        double* p = &x[(t * H + h) * D];
        const double a = p[i], b = p[i + D / 2];
        p[i] = a * std::cos(angle) - b * std::sin(angle);
        p[i + D / 2] = b * std::cos(angle) + a * std::sin(angle);
      }
}

// Logits [T, V] of one sequence.
inline std::vector<double> RefLogits(const LlamaConfig& c, const Weights& w,
                                     const std::vector<int32_t>& tokens,
                                     const std::vector<int32_t>& pos,
                                     const std::vector<int32_t>& seg) {
  const int64_t T = tokens.size(), C = c.hidden_size, F = c.intermediate_size, D = c.head_dim;
  const int64_t Hq = c.num_attention_heads, Hkv = c.num_key_value_heads, V = c.vocab_size;
  std::vector<double> x(T * C);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < C; ++i)
      x[t * C + i] = w.at("model.embed_tokens.weight")[tokens[t] * C + i];
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    auto W = [&](const std::string& n) -> const std::vector<double>& {
      return w.at(p + n + ".weight");
    };
    const std::vector<double> h = RmsNorm(x, W("input_layernorm"), T, C, c.rms_norm_eps);
    std::vector<double> q = Linear(h, W("self_attn.q_proj"), T, C, Hq * D);
    std::vector<double> k = Linear(h, W("self_attn.k_proj"), T, C, Hkv * D);
    const std::vector<double> v = Linear(h, W("self_attn.v_proj"), T, C, Hkv * D);
    RefRope(q, pos, T, Hq, D, c.rope_theta);
    RefRope(k, pos, T, Hkv, D, c.rope_theta);
    std::vector<double> att(T * Hq * D, 0.0);
    for (int64_t hq = 0; hq < Hq; ++hq) {
      const int64_t hk = hq / (Hq / Hkv);
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> s(T, -INFINITY);
        double mx = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          if (seg[j] != seg[i]) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d)
            dot += q[(i * Hq + hq) * D + d] * k[(j * Hkv + hk) * D + d];
          s[j] = dot / std::sqrt(static_cast<double>(D));
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        for (int64_t j = 0; j <= i; ++j) z += std::exp(s[j] - mx);
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t d = 0; d < D; ++d)
            att[(i * Hq + hq) * D + d] += std::exp(s[j] - mx) / z * v[(j * Hkv + hk) * D + d];
      }
    }
    const std::vector<double> o = Linear(att, W("self_attn.o_proj"), T, Hq * D, C);
    for (int64_t i = 0; i < T * C; ++i) x[i] += o[i];
    const std::vector<double> h2 = RmsNorm(x, W("post_attention_layernorm"), T, C, c.rms_norm_eps);
    const std::vector<double> g = Linear(h2, W("mlp.gate_proj"), T, C, F);
    const std::vector<double> u = Linear(h2, W("mlp.up_proj"), T, C, F);
    std::vector<double> a(T * F);
    for (int64_t i = 0; i < T * F; ++i) a[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
    const std::vector<double> dn = Linear(a, W("mlp.down_proj"), T, F, C);
    for (int64_t i = 0; i < T * C; ++i) x[i] += dn[i];
  }
  return Linear(RmsNorm(x, w.at("model.norm.weight"), T, C, c.rms_norm_eps), w.at("lm_head.weight"),
                T, C, V);
}

inline std::vector<int32_t> RowOf(const Tensor& t, int64_t b) {
  if (!t.defined()) return {};
  const int32_t* p = t.data<int32_t>() + b * t.dim(1);
  return std::vector<int32_t>(p, p + t.dim(1));
}

// Sum of token losses of the batch under the reference.
inline double RefLossSum(const LlamaConfig& c, const Weights& w, const Batch& batch) {
  const int64_t B = batch.tokens.dim(0), T = batch.tokens.dim(1), V = c.vocab_size;
  double sum = 0;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int32_t> pos = RowOf(batch.positions, b), seg = RowOf(batch.segment_ids, b);
    if (pos.empty())
      for (int64_t t = 0; t < T; ++t) pos.push_back(t);
    if (seg.empty()) seg.assign(T, 0);
    const std::vector<double> logits = RefLogits(c, w, RowOf(batch.tokens, b), pos, seg);
    const std::vector<int32_t> tg = RowOf(batch.targets, b);
    for (int64_t t = 0; t < T; ++t) {
      if (tg[t] == ops::kIgnoreIndex) continue;
      double mx = -INFINITY, z = 0;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, logits[t * V + v]);
      for (int64_t v = 0; v < V; ++v) z += std::exp(logits[t * V + v] - mx);
      sum += mx + std::log(z) - logits[t * V + tg[t]];
    }
  }
  return sum;
}

}  // namespace tandem::model::reference
