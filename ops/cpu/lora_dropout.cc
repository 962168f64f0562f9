// The f32 reference of ops::LoraDropoutAt (ops/lora.h).
#include <cstdint>

#include "ops/internal/lora_kernels.h"

namespace tandem::ops::cpu {

void LoraDropoutAt(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t cols,
                   const int64_t* row_ids, int64_t col_offset, uint64_t seed, float p,
                   bool accumulate) {
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 15))
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t row = row_ids != nullptr ? row_ids[n] : n;
    for (int64_t c = 0; c < cols; ++c) {
      const float v = x[n * ldx + c] * lora::DropoutScale(seed, row, col_offset + c, p);
      y[n * ldy + c] = accumulate ? y[n * ldy + c] + v : v;
    }
  }
}

}  // namespace tandem::ops::cpu
