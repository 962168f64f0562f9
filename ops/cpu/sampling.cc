// CPU reference of ops::ArgmaxRows (ops/sampling.h): a plain scan per row.
#include <cmath>

#include "ops/internal/sampling_kernels.h"

namespace tandem::ops::cpu {

void ArgmaxRows(int32_t* ids, const float* logits, int64_t rows, int64_t row_stride, int64_t valid,
                int32_t invalid) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits + r * row_stride;
    int64_t best = 0;
    bool bad = false;
    for (int64_t i = 0; i < valid; ++i) {
      if (std::isnan(row[i]) || row[i] == INFINITY) bad = true;
      if (row[i] > row[best]) best = i;
    }
    bad = bad || row[best] == -INFINITY;  // every value -inf
    ids[r] = bad ? invalid : static_cast<int32_t>(best);
  }
}

}  // namespace tandem::ops::cpu
