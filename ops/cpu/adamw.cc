// CPU AdamW, PyTorch's order of operations.
#include <cmath>

#include "ops/cpu/kernels.h"

namespace tandem::ops::cpu {

void AdamW(float* master, float* m, float* v, void* model_weights, DType model_dtype,
           const float* grad, int64_t n, float lr, float beta1, float beta2, float eps,
           float weight_decay, int64_t step, float grad_scale) {
  // Step scalars in f64 (as PyTorch computes them in Python), rounded once to f32; the
  // per-element math below is f32 in the documented order.
  const double bias1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
  const float step_size = static_cast<float>(static_cast<double>(lr) / bias1);
  const float bias2_sqrt = static_cast<float>(std::sqrt(bias2));
  const float decay = static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay);
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

}  // namespace tandem::ops::cpu
