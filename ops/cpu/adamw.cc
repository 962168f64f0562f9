// CPU AdamW, PyTorch's order of operations.
#include <cmath>

#include "ops/cpu/kernels.h"
#include "ops/internal/stochastic_round.h"

namespace tandem::ops::cpu {
namespace {

// Step scalars in f64 (as PyTorch computes them in Python), rounded once to f32; the per-element
// math is f32 in the documented order.
struct StepScalars {
  float step_size, bias2_sqrt, decay;
};

StepScalars MakeStepScalars(float lr, float beta1, float beta2, float weight_decay, int64_t step) {
  const double bias1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
  return {static_cast<float>(static_cast<double>(lr) / bias1),
          static_cast<float>(std::sqrt(bias2)),
          static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay)};
}

}  // namespace

void AdamW(float* master, float* m, float* v, void* model_weights, DType model_dtype,
           const float* grad, int64_t n, float lr, float beta1, float beta2, float eps,
           float weight_decay, int64_t step, float grad_scale) {
  const StepScalars sc = MakeStepScalars(lr, beta1, beta2, weight_decay, step);
  const float step_size = sc.step_size, bias2_sqrt = sc.bias2_sqrt, decay = sc.decay;
  float* out_f32 = model_dtype == DType::kF32 ? static_cast<float*>(model_weights) : nullptr;
  Bf16* out_bf16 = model_dtype == DType::kBF16 ? static_cast<Bf16*>(model_weights) : nullptr;
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i] * grad_scale;
    float p = master[i] * decay;
    const float mi = m[i] + (1.0f - beta1) * (g - m[i]);
    const float vi = v[i] * beta2 + (1.0f - beta2) * g * g;
    const float denom = std::sqrt(vi) / bias2_sqrt + eps;
    p = p - step_size * (mi / denom);  // PyTorch: addcdiv_(m, denom, value=-step_size)
    master[i] = p;
    m[i] = mi;
    v[i] = vi;
    if (model_weights != nullptr) {
      if (out_f32 != nullptr) out_f32[i] = p;
      if (out_bf16 != nullptr) out_bf16[i] = FloatToBf16(p);
    }
  }
}

void AdamWBf16State(void* param, DType param_dtype, Bf16* m, Bf16* v, const float* grad, int64_t n,
                    float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step,
                    float grad_scale, uint64_t noise_key) {
  const StepScalars sc = MakeStepScalars(lr, beta1, beta2, weight_decay, step);
  const float step_size = sc.step_size, bias2_sqrt = sc.bias2_sqrt, decay = sc.decay;
  float* p_f32 = param_dtype == DType::kF32 ? static_cast<float*>(param) : nullptr;
  Bf16* p_bf16 = param_dtype == DType::kBF16 ? static_cast<Bf16*>(param) : nullptr;
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i] * grad_scale;
    float p = p_f32 != nullptr ? p_f32[i] : Bf16ToFloat(p_bf16[i]);
    const float m0 = Bf16ToFloat(m[i]), v0 = Bf16ToFloat(v[i]);
    p = p * decay;
    const float mi = m0 + (1.0f - beta1) * (g - m0);
    const float vi = v0 * beta2 + (1.0f - beta2) * g * g;
    const float denom = std::sqrt(vi) / bias2_sqrt + eps;
    p = p - step_size * (mi / denom);
    const internal::NoiseWords r = internal::ElementNoise(noise_key, i);
    if (p_f32 != nullptr) {
      p_f32[i] = p;
    } else {
      p_bf16[i] = Bf16{internal::StochasticBf16Bits(p, r.h1)};
    }
    m[i] = Bf16{internal::StochasticBf16Bits(mi, r.h1 >> 16)};
    v[i] = Bf16{internal::StochasticBf16Bits(vi, r.h2)};
  }
}

}  // namespace tandem::ops::cpu
