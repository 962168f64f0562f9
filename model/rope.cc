#include "model/rope.h"

#include <cmath>

namespace tandem::model {

namespace {

// torch's `scalar / tensor` is `tensor.reciprocal() * scalar`, with the scalar cast to the
// tensor's dtype (f32); we reproduce that order so results match bit for bit where the math
// library rounds as torch's does.
float RDiv(double scalar, float x) { return (1.0f / x) * static_cast<float>(scalar); }

std::vector<float> DefaultInvFreq(const LlamaConfig& c) {
  const int64_t d = c.head_dim > 0 ? c.head_dim : c.hidden_size / c.num_attention_heads;
  const float base = static_cast<float>(c.rope_theta);
  std::vector<float> inv(d / 2);
  for (int64_t i = 0; i < d / 2; ++i) {
    // arange(0, D, 2) as f32, divided by D in f32.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(d);
    // base ** exponent in f32: the correctly rounded f32 power (computed in double, rounded once).
    const float power =
        static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(exponent)));
    inv[i] = 1.0f / power;
  }
  return inv;
}

void ApplyLlama3(const RopeScaling& rs, std::vector<float>& inv) {
  const float factor = static_cast<float>(rs.factor);
  const float low = static_cast<float>(rs.low_freq_factor);
  const double old_len = static_cast<double>(rs.original_max_position_embeddings);
  // Python-float thresholds, compared against f32 tensors after a cast to f32.
  const float low_freq_wavelen = static_cast<float>(old_len / rs.low_freq_factor);
  const float high_freq_wavelen = static_cast<float>(old_len / rs.high_freq_factor);
  const float span = static_cast<float>(rs.high_freq_factor - rs.low_freq_factor);
  const double two_pi = 2.0 * M_PI;
  for (float& f : inv) {
    const float wavelen = RDiv(two_pi, f);
    float scaled = wavelen > low_freq_wavelen ? f / factor : f;
    const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
    if (medium) {
      const float smooth = (RDiv(old_len, wavelen) - low) / span;
      scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
    }
    f = scaled;
  }
}

}  // namespace

std::vector<float> RopeInvFreq(const LlamaConfig& config) {
  std::vector<float> inv = DefaultInvFreq(config);
  if (config.rope_scaling.rope_type == "llama3") ApplyLlama3(config.rope_scaling, inv);
  return inv;
}

}  // namespace tandem::model
