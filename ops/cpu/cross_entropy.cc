// CPU row-wise cross-entropy with its gradient, numerically stable (max subtracted).
#include <algorithm>
#include <cmath>

#include "ops/cpu/kernels.h"

namespace tandem::ops::cpu {

void CrossEntropy(float* losses, float* dlogits, const float* logits, const int32_t* targets,
                  int64_t rows, int64_t vocab, float grad_scale, int32_t ignore_index) {
#pragma omp parallel for schedule(static) if (rows * vocab > (1 << 15))
  for (int64_t n = 0; n < rows; ++n) {
    const float* x = logits + n * vocab;
    float* dx = dlogits == nullptr ? nullptr : dlogits + n * vocab;  // may be x
    const int32_t target = targets[n];
    if (target == ignore_index) {
      losses[n] = 0.0f;
      if (dx != nullptr) std::fill(dx, dx + vocab, 0.0f);
      continue;
    }
    const float max_x = *std::max_element(x, x + vocab);
    double sum = 0.0;
    for (int64_t j = 0; j < vocab; ++j) sum += std::exp(x[j] - max_x);  // f32 exp, f64 sum
    const double lse = static_cast<double>(max_x) + std::log(sum);
    losses[n] = static_cast<float>(lse - static_cast<double>(x[target]));
    if (dx == nullptr) continue;
    const float lse_f = static_cast<float>(lse);
    // Element j is read before it is written, so dx == x works.
    for (int64_t j = 0; j < vocab; ++j) {
      const float prob = std::exp(x[j] - lse_f);
      dx[j] = grad_scale * (j == target ? prob - 1.0f : prob);
    }
  }
}

}  // namespace tandem::ops::cpu
