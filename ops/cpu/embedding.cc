// CPU embedding lookup and its gradient.
#include <cstring>
#include <vector>

#include "ops/cpu/kernels.h"

namespace tandem::ops::cpu {

void EmbeddingForward(float* out, const int32_t* ids, const float* table, int64_t tokens,
                      int64_t dim) {
#pragma omp parallel for schedule(static) if (tokens * dim > (1 << 16))
  for (int64_t t = 0; t < tokens; ++t) {
    std::memcpy(out + t * dim, table + static_cast<int64_t>(ids[t]) * dim, sizeof(float) * dim);
  }
}

void EmbeddingBackward(float* dtable, const float* dout, const int32_t* ids, int64_t tokens,
                       int64_t vocab, int64_t dim) {
  // Stable counting sort of token indices by id: each id's tokens end up in increasing order, so
  // every row of dtable is one independent, ordered sum (parallel over ids, deterministic).
  std::vector<int64_t> start(vocab + 1, 0);
  for (int64_t t = 0; t < tokens; ++t) ++start[ids[t] + 1];
  for (int64_t v = 0; v < vocab; ++v) start[v + 1] += start[v];
  std::vector<int64_t> order(tokens);
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < tokens; ++t) order[next[ids[t]]++] = t;

#pragma omp parallel if (tokens * dim > (1 << 14))
  {
    std::vector<float> sum(dim);
#pragma omp for schedule(dynamic, 64)
    for (int64_t v = 0; v < vocab; ++v) {
      if (start[v] == start[v + 1]) continue;
      std::memcpy(sum.data(), dout + order[start[v]] * dim, sizeof(float) * dim);
      for (int64_t i = start[v] + 1; i < start[v + 1]; ++i) {
        const float* row = dout + order[i] * dim;
        for (int64_t c = 0; c < dim; ++c) sum[c] += row[c];
      }
      float* dst = dtable + v * dim;
      for (int64_t c = 0; c < dim; ++c) dst[c] += sum[c];
    }
  }
}

}  // namespace tandem::ops::cpu
