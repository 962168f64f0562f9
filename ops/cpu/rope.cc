// CPU rotary embedding (HF rotate_half convention).
#include <cmath>
#include <vector>

#include "ops/cpu/kernels.h"

namespace tandem::ops::cpu {

void Rope(float* y, int64_t y_token_stride, const float* x, int64_t x_token_stride,
          const int32_t* positions, const float* inv_freq, int64_t tokens, int64_t heads,
          int64_t head_dim, bool inverse) {
  const int64_t half = head_dim / 2;
#pragma omp parallel if (tokens * heads * head_dim > (1 << 14))
  {
    std::vector<float> cos_t(half), sin_t(half);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      // angle = float(position) * inv_freq in f32; the backward rotates by -angle.
      const float pos = static_cast<float>(positions[t]);
      for (int64_t i = 0; i < half; ++i) {
        const float angle = pos * inv_freq[i];
        cos_t[i] = std::cos(angle);
        sin_t[i] = inverse ? -std::sin(angle) : std::sin(angle);
      }
      for (int64_t h = 0; h < heads; ++h) {
        const float* xh = x + t * x_token_stride + h * head_dim;
        float* yh = y + t * y_token_stride + h * head_dim;  // may be xh: read both halves first
        for (int64_t i = 0; i < half; ++i) {
          const float x0 = xh[i], x1 = xh[i + half];
          yh[i] = x0 * cos_t[i] - x1 * sin_t[i];
          yh[i + half] = x1 * cos_t[i] + x0 * sin_t[i];
        }
      }
    }
  }
}

}  // namespace tandem::ops::cpu
